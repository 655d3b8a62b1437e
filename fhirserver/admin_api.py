"""The non-FHIR JSON APIs (administration, SMART launch, dynamic registration, alerts).

They are flask-smorest blueprints registered on one `Api`, so a single OpenAPI document describes
them all (`/api/openapi.json`, browsable at `/api/docs`). Admin endpoints take a bearer token from
`/auth/token` whose client was registered as an administrator (`client register --admin`); every
call is audited by the endpoint's own business function, not here.
"""

from __future__ import annotations

from flask import Flask, current_app, request
from flask_smorest import Api, abort

from .auth.tokens import TokenInfo, lookup_token
from .db.engine import read_connection

API_EXTENSION = "fhirserver.api"


def build_api(app: Flask) -> Api:
    app.config.update(
        API_TITLE="fhirserver admin and OAuth APIs", API_VERSION="1", OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api", OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH=None,
    )
    api = Api(app, spec_kwargs={"components": {"securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer"}}}})
    app.extensions[API_EXTENSION] = api
    return api


def bearer_token() -> str:
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_admin() -> TokenInfo:
    """The calling admin client's token, or abort 401/403 (JSON error body)."""
    token = bearer_token()
    if not token:
        abort(401, message="An access token is required (Authorization: Bearer ...)",
              headers={"WWW-Authenticate": 'Bearer realm="fhirserver-admin"'})
    with read_connection(current_app.extensions["fhirserver"].engine) as conn:
        info, reason = lookup_token(conn, token)
    if info is None:
        abort(401, message=f"The access token is not valid ({reason})",
              headers={"WWW-Authenticate": 'Bearer realm="fhirserver-admin", error="invalid_token"'})
    assert info is not None
    if not info.client_settings.get("admin"):
        abort(403, message="This client is not registered as an administrator")
    return info


def api_of(app: Flask) -> Api:
    api: Api = app.extensions[API_EXTENSION]
    return api
