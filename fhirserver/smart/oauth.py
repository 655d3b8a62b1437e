"""Authlib grant and endpoint classes for SMART App Launch, backed by `fhirserver.smart.grants`.

- Authorization code: PKCE is mandatory for every client and only `S256` is accepted (SMART App
  Launch 2.x); the code lives 60 s and is single use.
- OpenID Connect: an RS256 `id_token` with `fhirUser` (the user's FHIR resource URL) when the
  grant has `openid fhirUser` (or `profile`, SMART v1).
- Refresh: every use rotates the refresh token; a narrower scope may be asked, never a wider one.
- Introspection (RFC 7662) with SMART's fields, and revocation (RFC 7009).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import InvalidGrantError, InvalidRequestError, OAuth2Request
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, RefreshTokenGrant
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oidc.core import OpenIDCode, UserInfo
from joserfc.jwk import RSAKey
from sqlalchemy import Engine, select

from ..auth.grants import (
    GrantContext,
    StoredCode,
    StoredToken,
    claim_code,
    claim_refresh,
    find_code,
    find_refresh,
    find_token,
    new_family,
    nonce_used,
    revoke_token,
    save_code,
)
from ..config import Settings
from ..db.engine import transaction
from ..db.schema import app_user
from .secrets_store import signing_key

if TYPE_CHECKING:
    from .server import OAuthClient

APP_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"]


def user_active(engine: Engine, user_id: int) -> bool:
    with transaction(engine) as conn:
        row = conn.execute(select(app_user.c.disabled).where(app_user.c.id == user_id)).first()
    return row is not None and not row.disabled


class S256Only(CodeChallenge):
    """PKCE required for every client, `S256` only ("plain" is refused)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: AuthorizationCodeGrant, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: AuthorizationCodeGrant, result: object) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier'")
        super().validate_code_verifier(grant, result)


def build_code_grant(engine: Engine, settings: Settings) -> type[AuthorizationCodeGrant]:
    class SmartAuthorizationCodeGrant(AuthorizationCodeGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = APP_AUTH_METHODS

        def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
            ctx: GrantContext = request.user
            with transaction(engine) as conn:
                ctx.family_id = new_family(conn, request.client.get_client_id(), ctx.user_id)
                save_code(conn, code, request.client.get_client_id(), request.payload.redirect_uri or
                          request.client.get_default_redirect_uri(), request.payload.data.get("code_challenge"),
                          request.payload.data.get("nonce"), ctx,
                          settings.authorization_code_lifetime)

        def query_authorization_code(self, code: str, client: OAuthClient) -> StoredCode | None:
            if not isinstance(code, str) or len(code) > 200:
                return None
            return find_code(engine, code, client.get_client_id())

        def authenticate_user(self, authorization_code: StoredCode) -> GrantContext | None:
            with transaction(engine) as conn:
                if not claim_code(conn, authorization_code):
                    raise InvalidGrantError("The authorization code was already used")
            if not user_active(engine, authorization_code.context.user_id):
                return None
            return authorization_code.context

        def delete_authorization_code(self, authorization_code: StoredCode) -> None:
            pass  # already marked used by authenticate_user (kept to detect reuse)

    return SmartAuthorizationCodeGrant


def build_refresh_grant(engine: Engine) -> type[RefreshTokenGrant]:
    class SmartRefreshTokenGrant(RefreshTokenGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = APP_AUTH_METHODS
        INCLUDE_NEW_REFRESH_TOKEN = True

        def authenticate_refresh_token(self, refresh_token: str) -> StoredToken | None:
            if not isinstance(refresh_token, str) or len(refresh_token) > 200:
                return None
            return find_refresh(engine, refresh_token)

        def authenticate_user(self, refresh_token: StoredToken) -> GrantContext | None:
            with transaction(engine) as conn:
                if not claim_refresh(conn, refresh_token):
                    raise InvalidGrantError("The refresh token was already used")
            ctx = GrantContext(**{k: v for k, v in refresh_token.context.items()})
            if not user_active(engine, ctx.user_id):
                raise InvalidGrantError("The user account is disabled")
            return ctx

        def revoke_old_credential(self, refresh_token: StoredToken) -> None:
            pass  # rotated (claimed) in authenticate_user, atomically

    return SmartRefreshTokenGrant


class SmartOpenIDCode(OpenIDCode):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        super().__init__(require_nonce=False)
        self.engine = engine
        self.settings = settings
        self.key = signing_key(settings.data_dir)

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        return nonce_used(self.engine, request.payload.client_id, nonce)

    def resolve_client_private_key(self, client: OAuthClient) -> RSAKey:
        return self.key

    def get_client_algorithm(self, client: OAuthClient) -> str:
        return "RS256"

    def get_encode_header(self, client: OAuthClient) -> dict[str, Any]:
        return {"alg": "RS256", "kid": self.key.kid}

    def get_client_claims(self, client: OAuthClient) -> dict[str, Any]:
        return {"iss": self.settings.public_root, "aud": [client.get_client_id()]}

    def generate_user_info(self, user: GrantContext, scope: str) -> UserInfo:
        info = UserInfo(sub=str(user.user_id))
        words = scope.split()
        url = f"{self.settings.fhir_base}/{user.fhir_user}"
        if "fhirUser" in words:
            info["fhirUser"] = url
        if "profile" in words:
            info["profile"] = url  # SMART v1
        return info


def _introspection_payload(token: StoredToken, settings: Settings) -> dict[str, Any]:
    ctx = token.context
    body: dict[str, Any] = {
        "active": True, "scope": token.scope, "client_id": token.client_id,
        "exp": token.expires_us // 1_000_000, "iat": token.issued_us // 1_000_000,
        "token_type": "Bearer" if token.kind == "access" else "refresh_token",
        "iss": settings.public_root,
    }
    user_id = ctx.get("user_id")
    if user_id is not None:
        body["sub"] = str(user_id)
        body["username"] = ctx.get("user") or ctx.get("username")
    if ctx.get("fhirUser") or ctx.get("fhir_user"):
        body["fhirUser"] = f"{settings.fhir_base}/{ctx.get('fhirUser') or ctx.get('fhir_user')}"
    for key in ("patient", "encounter"):
        if ctx.get(key):
            body[key] = ctx[key]
    return body


def _query_token(engine: Engine, token_string: object, hint: str | None) -> StoredToken | None:
    if not isinstance(token_string, str) or len(token_string) > 512:
        return None
    return find_token(engine, token_string, hint)


def build_introspection(engine: Engine, settings: Settings) -> type[IntrospectionEndpoint]:
    class SmartIntrospection(IntrospectionEndpoint):
        CLIENT_AUTH_METHODS = [*APP_AUTH_METHODS, "bearer_access_token"]

        def query_token(self, token_string: str, token_type_hint: str | None) -> StoredToken | None:
            return _query_token(engine, token_string, token_type_hint)

        def check_permission(self, token: StoredToken, client: OAuthClient, request: OAuth2Request) -> bool:
            # A client may introspect its own tokens; a resource server registered with
            # `introspect_any` may introspect every token.
            return token.client_id == client.get_client_id() or bool(client.record.settings.get("introspect_any"))

        def introspect_token(self, token: StoredToken) -> dict[str, Any]:
            return _introspection_payload(token, settings)

    return SmartIntrospection


def build_revocation(engine: Engine) -> type[RevocationEndpoint]:
    class SmartRevocation(RevocationEndpoint):
        CLIENT_AUTH_METHODS = APP_AUTH_METHODS

        def query_token(self, token_string: str, token_type_hint: str | None) -> StoredToken | None:
            return _query_token(engine, token_string, token_type_hint)

        def revoke_token(self, token: StoredToken, request: OAuth2Request) -> None:
            with transaction(engine) as conn:
                revoke_token(conn, token)

    return SmartRevocation


def register_smart_grants(server: AuthorizationServer, engine: Engine, settings: Settings) -> None:
    server.register_grant(build_code_grant(engine, settings),
                          [S256Only(required=True), SmartOpenIDCode(engine, settings)])
    server.register_grant(build_refresh_grant(engine))
    server.register_endpoint(build_introspection(engine, settings))
    server.register_endpoint(build_revocation(engine))
