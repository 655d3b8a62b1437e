"""Admin/OAuth JSON APIs for SMART: EHR launch creation and RFC 7591 dynamic registration.

Dynamic registration is off unless `dynamic_registration = true` is configured, and even then
needs the initial access token configured as `registration_token` (or FHIRSERVER_REGISTRATION_TOKEN).
Only apps can register themselves this way (public or confidential-symmetric); backend clients
with system scopes are registered by an administrator.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint, abort
from marshmallow import Schema, fields, validate

from ..admin_api import bearer_token, require_admin
from ..auth.clients import ClientError, register_app_client
from ..services import current_services
from .audit import audit_oauth
from .launch import LaunchError, new_launch

launch_blp = Blueprint("admin-launch", __name__, url_prefix="/api/launch",
                       description="Create SMART EHR launch contexts (admin clients only).")
register_blp = Blueprint("registration", __name__, url_prefix="/auth/register",
                         description="RFC 7591 dynamic client registration (disabled by default).")


class LaunchIn(Schema):
    client_id = fields.String(required=True)
    patient = fields.String(required=True, metadata={"example": "Patient/123"})
    encounter = fields.String()
    user = fields.String(metadata={"description": "username of the user the launch is for"})


class LaunchOut(Schema):
    launch = fields.String(required=True)
    launch_url = fields.String(allow_none=True)
    expires_in = fields.Integer(required=True)


class RegistrationIn(Schema):
    client_name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    redirect_uris = fields.List(fields.String(), required=True, validate=validate.Length(min=1, max=10))
    scope = fields.String(required=True)
    token_endpoint_auth_method = fields.String(load_default="none",
                                               validate=validate.OneOf(["none", "client_secret_basic"]))
    grant_types = fields.List(fields.String(), load_default=["authorization_code"])
    response_types = fields.List(fields.String(), load_default=["code"])
    initiate_login_uri = fields.String()


class RegistrationOut(RegistrationIn):
    client_id = fields.String(required=True)
    client_secret = fields.String()
    client_id_issued_at = fields.Integer()
    client_secret_expires_at = fields.Integer()




@launch_blp.route("")
class LaunchCreate(MethodView):
    @launch_blp.arguments(LaunchIn)
    @launch_blp.response(201, LaunchOut)
    @launch_blp.doc(security=[{"bearer": []}])
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a single-use launch for an app, patient (and user)."""
        require_admin()
        svc = current_services()
        try:
            made = new_launch(svc, body["client_id"], body["patient"], body.get("encounter"), body.get("user"))
        except LaunchError as exc:
            abort(422, message=str(exc))
        return {"launch": made.launch, "launch_url": made.url, "expires_in": made.expires_in}


@register_blp.route("")
class Register(MethodView):
    @register_blp.arguments(RegistrationIn)
    @register_blp.response(201, RegistrationOut)
    @register_blp.doc(security=[{"bearer": []}])
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Register a SMART app (RFC 7591), with the configured initial access token."""
        import time

        svc = current_services()
        expected = svc.settings.registration_token
        if not svc.settings.dynamic_registration or not expected:
            abort(404, message="Dynamic registration is disabled on this server")
        if not hmac.compare_digest(bearer_token().encode(), expected.encode()):
            audit_oauth(svc, "authorize", 401, None, None, "dynamic registration refused: bad initial access token")
            abort(401, message="A valid initial access token is required",
                  headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        bad = [g for g in body["grant_types"] if g not in ("authorization_code", "refresh_token")]
        if bad or body["response_types"] != ["code"]:
            abort(400, message="only authorization_code/refresh_token and response type code are supported")
        allowed = svc.settings.registration_max_scopes
        from ..auth.scopes import intersect

        granted = intersect(body["scope"], allowed).render()
        if not granted:
            abort(400, message="none of the requested scopes may be self-registered")
        try:
            rec, secret = register_app_client(svc.engine, body["client_name"], granted, body["redirect_uris"],
                                              body["token_endpoint_auth_method"],
                                              launch_url=body.get("initiate_login_uri"),
                                              settings={"dynamically_registered": True})
        except ClientError as exc:
            abort(400, message=str(exc))
        audit_oauth(svc, "authorize", 201, rec, None, f"client registered dynamically; scope: {granted}")
        out = {**body, "client_id": rec.client_id, "scope": granted, "client_id_issued_at": int(time.time())}
        if secret:
            out.update(client_secret=secret, client_secret_expires_at=0)
        return out
