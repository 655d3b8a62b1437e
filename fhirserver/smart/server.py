"""The OAuth 2.0 authorization server, built on Authlib.

SMART Backend Services: `client_credentials` with a `private_key_jwt` client assertion signed
RS384 or ES384 by a key from the client's registered JWKS (inline or fetched from its JWKS URL).
Authlib validates the assertion (signature, iss, sub, aud, exp); we add SMART's rules: the
algorithm allow-list, a 5-minute maximum lifetime and single-use `jti`.

SMART App Launch: `authorization_code` (PKCE S256 mandatory for every client, `fhirserver.smart`
holds the grant state and the login/approval pages) and `refresh_token` with rotation. Apps
authenticate as public clients (`none`), with a client secret, or with `private_key_jwt`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, InvalidClientError, InvalidScopeError, OAuth2Request
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from flask import Flask
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import Engine, delete, insert
from sqlalchemy.exc import IntegrityError

from ..auth.clients import ClientRecord, get_client
from ..auth.scopes import intersect
from ..auth.tokens import issue_token, lookup_token
from ..clock import now_us
from ..config import Settings
from ..db.engine import transaction
from ..db.schema import assertion_jti

ALLOWED_ASSERTION_ALGS = ["RS384", "ES384"]
AUTH_METHOD = "private_key_jwt"


BEARER_AUTH_METHOD = "bearer_access_token"


class OAuthClient(ClientMixin):
    def __init__(self, record: ClientRecord, known_types: list[str]) -> None:
        self.record = record
        self.known_types = known_types

    def get_client_id(self) -> str:
        return self.record.client_id

    def get_default_redirect_uri(self) -> str | None:
        # Only a single registered URI may be implied; otherwise the request must name one.
        uris = self.record.redirect_uris
        return uris[0] if self.record.kind == "app" and len(uris) == 1 else None

    def get_allowed_scope(self, scope: str) -> str:
        return intersect(scope or "", self.record.scopes, self.known_types).render()

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return self.record.kind == "app" and redirect_uri in self.record.redirect_uris  # exact match

    def check_client_secret(self, client_secret: str) -> bool:
        return self.record.check_secret(client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.record.disabled:
            return False
        registered = self.record.auth_method
        if method == BEARER_AUTH_METHOD:
            # a resource server presenting its own access token (introspection only)
            return endpoint == "introspection" and bool(self.record.settings.get("introspect_any"))
        if registered == "client_secret_basic":
            return method in ("client_secret_basic", "client_secret_post")
        return method == registered

    def check_response_type(self, response_type: str) -> bool:
        return self.record.kind == "app" and not self.record.disabled and response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        if self.record.kind == "backend":
            return grant_type == "client_credentials"
        return grant_type in ("authorization_code", "refresh_token")


class JwksCache:
    """Fetches registered JWKS URLs, caching them briefly."""

    def __init__(self, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def get(self, url: str) -> dict[str, Any]:
        with self._lock:
            hit = self._cache.get(url)
            if hit and hit[0] > time.monotonic():
                return hit[1]
        try:
            resp = requests.get(url, timeout=5, headers={"Accept": "application/json"})
            resp.raise_for_status()
            jwks: dict[str, Any] = resp.json()
        except (requests.RequestException, ValueError) as exc:
            raise InvalidClientError(description="The client's JWKS URL could not be fetched") from exc
        with self._lock:
            self._cache[url] = (time.monotonic() + self.ttl_s, jwks)
        return jwks


class SmartClientAssertion(JWTBearerClientAssertion):
    CLIENT_AUTH_METHOD = AUTH_METHOD

    def __init__(self, engine: Engine, settings: Settings, jwks: JwksCache) -> None:
        super().__init__(leeway=30)
        self.engine = engine
        self.settings = settings
        self.jwks = jwks

    def get_audiences(self) -> list[str]:
        root = self.settings.public_root
        return [self.settings.token_url, f"{root}/auth/introspect", f"{root}/auth/revoke"]

    def resolve_client_public_key(self, client: OAuthClient) -> KeySet:
        record = client.record
        if record.disabled:
            raise InvalidClientError(description="The client is disabled.")
        jwks = record.jwks or (self.jwks.get(record.jwks_uri) if record.jwks_uri else None)
        if not jwks:
            raise InvalidClientError(description="The client has no registered keys.")
        public = {"keys": [k for k in jwks.get("keys", []) if "d" not in k]}
        return KeySet.import_key_set(public)  # type: ignore[arg-type]  # a JWKS document

    def process_assertion_claims(self, assertion: str, resolve_key: KeySet) -> dict[str, Any]:
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=ALLOWED_ASSERTION_ALGS)
        except JoseError as exc:
            raise InvalidClientError(description=f"Client assertion rejected: {exc.description or exc.error}") from exc
        except (ValueError, TypeError) as exc:
            raise InvalidClientError(description="Client assertion rejected: malformed") from exc
        self.verify_claims(token.claims)
        self._check_audience_and_client_id(token.claims)
        exp = token.claims.get("exp")
        if not isinstance(exp, (int, float)) or exp - time.time() > self.settings.client_assertion_max_lifetime + self.leeway:
            raise InvalidClientError(description="Client assertion 'exp' must be at most 5 minutes in the future.")
        return token.claims

    @staticmethod
    def _check_audience_and_client_id(claims: dict[str, Any]) -> None:
        """SMART Backend Services: `aud` is this server's endpoint URL alone (a string, or an array
        holding only it: RFC 7519 allows arrays, but an extra audience means the assertion was
        also meant for someone else, who could replay it here). A form `client_id`, when sent,
        must be the assertion's issuer: a client cannot authenticate as one client for another."""
        from flask import has_request_context
        from flask import request as http_request

        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) != 1:
            raise InvalidClientError(description="Client assertion 'aud' must be the token URL alone.")
        form_client = http_request.form.get("client_id") if has_request_context() else None
        if form_client is not None and form_client != claims.get("sub"):
            raise InvalidClientError(description="client_id does not match the client assertion's issuer.")

    def validate_jti(self, claims: dict[str, Any], jti: object) -> bool:
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            return False
        now = now_us()
        expires = int(claims["exp"] * 1_000_000) + self.leeway * 1_000_000
        try:
            with transaction(self.engine) as conn:
                conn.execute(delete(assertion_jti).where(assertion_jti.c.expires_us < now))
                conn.execute(insert(assertion_jti).values(client_id=claims["sub"], jti=jti, expires_us=expires))
        except IntegrityError:
            return False
        return True


class SmartClientCredentialsGrant(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = [AUTH_METHOD]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        requested = self.request.payload.scope or ""
        if not requested.strip():
            raise InvalidScopeError(description="A scope is required.")
        client = self.request.client
        granted = intersect(requested, client.record.scopes, client.known_types)
        if not granted.resource:
            raise InvalidScopeError(description="None of the requested scopes can be granted to this client.")


class SmartAuthorizationServer(AuthorizationServer):
    """Also accepts an already-built OAuth2Request: the approval page replays the authorization
    request it stored when the user first arrived, not the form the user submitted."""

    def create_oauth2_request(self, request: object) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        return super().create_oauth2_request(request)


def build_authorization_server(app: Flask, engine: Engine, settings: Settings,
                               known_types: list[str]) -> AuthorizationServer:
    from ..auth.grants import REFRESH_SCOPES, GrantContext, issue_refresh
    from .oauth import register_smart_grants

    def query_client(client_id: str) -> OAuthClient | None:
        record = get_client(engine, client_id) if isinstance(client_id, str) and len(client_id) <= 64 else None
        return OAuthClient(record, known_types) if record else None

    def save_token(token: dict[str, Any], request: OAuth2Request) -> None:
        pass  # the generator stores the token (hash) itself

    server = SmartAuthorizationServer(app, query_client=query_client, save_token=save_token)

    def generate(grant_type: str, client: OAuthClient, user: GrantContext | None = None, scope: str | None = None,
                 expires_in: int | None = None, include_refresh_token: bool = True) -> dict[str, Any]:
        lifetime = settings.access_token_lifetime
        if not isinstance(user, GrantContext):  # client_credentials: the client acts for itself
            granted = client.get_allowed_scope(scope or "")
            with transaction(engine) as conn:
                token, _exp = issue_token(conn, client.record.client_id, granted, lifetime, {"grant_type": grant_type})
            return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "scope": granted}
        granted = scope or user.scope
        words = granted.split()
        lifetime = settings.user_access_token_lifetime
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": lifetime, "scope": granted,
                                "need_patient_banner": user.need_patient_banner,
                                "smart_style_url": f"{settings.public_root}/auth/smart-style.json"}
        with transaction(engine) as conn:
            body["access_token"], _exp = issue_token(conn, client.record.client_id, granted, lifetime,
                                                     user.token_context(grant_type), user.family_id)
            refresh = [w for w in REFRESH_SCOPES if w in words]
            if include_refresh_token and refresh:
                days = settings.offline_refresh_days if "offline_access" in refresh else \
                    settings.online_refresh_days
                body["refresh_token"] = issue_refresh(conn, client.record.client_id, user, granted,
                                                      int(float(days) * 86400))
        if user.patient:
            body["patient"] = user.patient
        if user.encounter:
            body["encounter"] = user.encounter
        return body

    server.register_token_generator("default", generate)
    assertion = SmartClientAssertion(engine, settings, JwksCache(settings.jwks_cache_seconds))
    server.register_client_auth_method(AUTH_METHOD, assertion)

    def bearer(query: Callable[[str], OAuthClient | None], request: OAuth2Request) -> OAuthClient | None:
        """RFC 7662 section 2.1 lets a protected resource authenticate with a bearer token: here its
        own unexpired, unrevoked backend-services access token (SMART's suggestion)."""
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        info, _reason = lookup_token(engine, header[7:].strip())
        if info is None or info.context.get("grant_type") != "client_credentials":
            return None
        client = query(info.client_id)
        return client if client is not None and client.check_endpoint_auth_method(BEARER_AUTH_METHOD,
                                                                                   "introspection") else None

    server.register_client_auth_method(BEARER_AUTH_METHOD, bearer)
    server.register_grant(SmartClientCredentialsGrant)
    register_smart_grants(server, engine, settings)
    return server
