"""Installing the SMART side on the Flask app: sign-in session cookies, the OAuth endpoints
(/auth/token, introspection, revocation), discovery documents and the optional demo app."""

from __future__ import annotations

import json
from typing import Any

from flask import (
    Flask,
    Request,
    Response,
    has_request_context,
    request,
)
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from ..fhir.interaction import is_fhir_path
from ..services import Services
from .secrets_store import session_secret, signing_key
from .views import make_smart_blueprint


def openid_configuration(svc: Services) -> dict[str, Any]:
    root = svc.settings.public_root
    return {
        "issuer": root,
        "authorization_endpoint": f"{root}/auth/authorize",
        "token_endpoint": f"{root}/auth/token",
        "jwks_uri": f"{root}/auth/jwks",
        "introspection_endpoint": f"{root}/auth/introspect",
        "revocation_endpoint": f"{root}/auth/revoke",
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "fhirUser", "profile", "launch", "launch/patient", "offline_access",
                             "online_access"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "profile"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post",
                                                  "private_key_jwt"],
        "code_challenge_methods_supported": ["S256"],
    }


class _TlsAwareSessions(SecureCookieSessionInterface):
    """The sign-in session cookie is `Secure` whenever the request came over TLS -- directly or
    through a TLS-terminating proxy (`proxy_hops`, X-Forwarded-Proto) -- or the public URL is https.

    The FHIR API has no session: it authenticates by bearer token alone, so a sign-in cookie a
    browser sends along there is neither read (it can carry no authority to /fhir, whatever a
    cross-site page makes the browser send) nor refreshed. Skipping it also spares every API
    request the cookie's signature check (~45 us in process)."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if is_fhir_path(request.path):
            return None  # Flask's null session: any write to it raises
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(super().get_cookie_secure(app)) or (has_request_context() and request.is_secure)


def install(app: Flask) -> None:
    svc: Services = app.extensions["fhirserver"]
    app.session_interface = _TlsAwareSessions()
    app.secret_key = session_secret(svc.settings.data_dir, svc.settings.session_secret)
    app.config.update(SESSION_COOKIE_NAME="fhirserver_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=svc.settings.public_root.startswith("https://"))
    signing_key(svc.settings.data_dir)  # generate at start, not on the first login
    app.register_blueprint(make_smart_blueprint())
    from .account import make_account_blueprint

    app.register_blueprint(make_account_blueprint())
    from ..admin_api import api_of
    from .admin import launch_blp, register_blp

    api_of(app).register_blueprint(launch_blp)
    api_of(app).register_blueprint(register_blp)
    if svc.settings.demo_app:
        from .demo_app import make_demo_app_blueprint

        app.register_blueprint(make_demo_app_blueprint())

    @app.get("/.well-known/openid-configuration")
    def oidc_discovery() -> Response:
        return Response(json.dumps(openid_configuration(svc)), mimetype="application/json")
