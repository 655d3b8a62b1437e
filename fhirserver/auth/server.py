"""The OAuth 2.0 authorization server, built on Authlib.

SMART Backend Services: `client_credentials` with a `private_key_jwt` client assertion signed
RS384 or ES384 by a key from the client's registered JWKS (inline or fetched from its JWKS URL).
Authlib validates the assertion (signature, iss, sub, aud, exp); we add SMART's rules: the
algorithm allow-list, a 5-minute maximum lifetime and single-use `jti`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, InvalidClientError, InvalidScopeError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import Engine, delete, insert
from sqlalchemy.exc import IntegrityError

from ..config import Settings
from ..db.engine import transaction
from ..db.schema import assertion_jti
from ..search.dates import now_us
from .clients import ClientRecord, get_client
from .scopes import intersect
from .tokens import issue_token

ALLOWED_ASSERTION_ALGS = ["RS384", "ES384"]
AUTH_METHOD = "private_key_jwt"


class OAuthClient(ClientMixin):
    def __init__(self, record: ClientRecord, known_types: list[str]) -> None:
        self.record = record
        self.known_types = known_types

    def get_client_id(self) -> str:
        return self.record.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        return intersect(scope or "", self.record.scopes, self.known_types).render()

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return self.record.kind == "backend" and method == AUTH_METHOD

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return self.record.kind == "backend" and grant_type == "client_credentials"


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
            jwks = resp.json()
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
        return [self.settings.token_url]

    def resolve_client_public_key(self, client: OAuthClient) -> KeySet:
        record = client.record
        if record.disabled:
            raise InvalidClientError(description="The client is disabled.")
        jwks = record.jwks or (self.jwks.get(record.jwks_uri) if record.jwks_uri else None)
        if not jwks:
            raise InvalidClientError(description="The client has no registered keys.")
        public = {"keys": [k for k in jwks.get("keys", []) if "d" not in k]}
        return KeySet.import_key_set(public)

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=ALLOWED_ASSERTION_ALGS)
        except JoseError as exc:
            raise InvalidClientError(description=f"Client assertion rejected: {exc.description or exc.error}") from exc
        except (ValueError, TypeError) as exc:
            raise InvalidClientError(description="Client assertion rejected: malformed") from exc
        self.verify_claims(token.claims)
        exp = token.claims.get("exp")
        if not isinstance(exp, (int, float)) or exp - time.time() > self.settings.client_assertion_max_lifetime + self.leeway:
            raise InvalidClientError(description="Client assertion 'exp' must be at most 5 minutes in the future.")
        return token.claims

    def validate_jti(self, claims: dict[str, Any], jti: Any) -> bool:
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


def build_authorization_server(app: Any, engine: Engine, settings: Settings,
                               known_types: list[str]) -> AuthorizationServer:
    def query_client(client_id: str) -> OAuthClient | None:
        record = get_client(engine, client_id)
        return OAuthClient(record, known_types) if record else None

    def save_token(token: dict[str, Any], request: Any) -> None:
        pass  # the generator stores the token (hash) itself

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)

    def generate(grant_type: str, client: OAuthClient, user: Any = None, scope: str | None = None,
                 expires_in: int | None = None, include_refresh_token: bool = True) -> dict[str, Any]:
        granted = client.get_allowed_scope(scope or "")
        lifetime = settings.access_token_lifetime
        with transaction(engine) as conn:
            token, _exp = issue_token(conn, client.record.client_id, granted, lifetime, {"grant_type": grant_type})
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "scope": granted}

    server.register_token_generator("default", generate)
    server.register_client_auth_method(AUTH_METHOD, SmartClientAssertion(engine, settings, JwksCache(settings.jwks_cache_seconds)))
    server.register_grant(SmartClientCredentialsGrant)
    return server
