"""`/auth/account`: a signed-in user's own account, as JSON, for the patient portal (and any
client registered as an account manager): two-step sign-in enrolment, password change, and the
apps the user authorized. Only a user token of a client registered with the `account_manager`
setting may call it -- an ordinary app a user approved can read their data, never change how they
sign in. Every change is audited; a refused attempt too."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from ..audit.events import AuditRecord
from ..auth.tokens import TokenInfo, lookup_token
from ..clock import now_us
from ..db.engine import read_connection
from ..db.schema import app_user
from ..services import Services
from ..users import account
from ..users.registry import UserError


def _qr_svg(uri: str) -> str:
    import segno

    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=4, xmldecl=False, svgns=True, title="Setup QR code")
    return out.getvalue().decode()


def make_account_blueprint() -> Blueprint:
    bp = Blueprint("account", __name__, url_prefix="/auth/account")

    def caller() -> tuple[TokenInfo, str, str]:
        svc = current_app.extensions["fhirserver"]
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        info, _reason = lookup_token(svc.engine, token.strip()) if scheme.lower() == "bearer" else (None, "")
        fhir_user = (info.context.get("fhirUser") if info else None) or ""
        if info is None or not info.client_settings.get("account_manager") or not fhir_user:
            raise PermissionError
        with read_connection(svc.engine) as conn:
            username = conn.execute(select(app_user.c.username).where(app_user.c.fhir_user == fhir_user,
                                                                      app_user.c.disabled.is_(False))).scalar()
        if username is None:
            raise PermissionError
        return info, str(username), fhir_user

    def audited(code: str, status: int, info: TokenInfo, user: str, desc: str) -> None:
        svc = current_app.extensions["fhirserver"]
        rec = AuditRecord(interaction="update", request_id=request.headers.get("X-Request-Id", "")[:64] or "account",
                          network_address=request.remote_addr or "", recorded_us=now_us(), status=status,
                          client_id=info.client_id, client_name=info.client_name, user=user, outcome_desc=desc)
        rec.subtype_code = ("urn:fhirserver:account", code, code)
        rec.target = user
        with svc.engine.begin() as conn:
            svc.audit.append(conn, rec)

    @bp.errorhandler(PermissionError)
    def forbidden(_exc: PermissionError) -> ResponseReturnValue:
        return jsonify(error="forbidden", error_description="a user token of an account-manager client is needed"), 403

    @bp.get("")
    def overview() -> ResponseReturnValue:
        _info, username, fhir_user = caller()
        svc = current_app.extensions["fhirserver"]
        from ..users.registry import get_user

        record = get_user(svc.engine, username)
        assert record is not None
        return jsonify(username=username, fhirUser=fhir_user, totp=record.totp,
                       authorizations=account.authorizations(svc.engine, username))

    @bp.post("/totp")
    def totp_start() -> ResponseReturnValue:
        """A new setup key; while two-step sign-in is on, `current_code` (from the authenticator
        in use) is needed to replace it. Refusals are audited."""
        info, username, fhir_user = caller()
        svc = current_app.extensions["fhirserver"]
        body = request.get_json(silent=True) or {}
        try:
            setup = account.start_totp(svc.engine, svc.keys, username, svc.settings.totp_issuer,
                                       str(body.get("current_code", "")))
        except UserError as exc:
            audited("totp-start", 400, info, fhir_user, f"two-step sign-in setup refused: {exc}")
            return jsonify(error="invalid_request", error_description=str(exc)), 400
        return jsonify(**setup, qr_svg=_qr_svg(setup["uri"]))

    def change(code: str, apply: Callable[[Services, str, dict[str, Any]], object], done: str, refused: str,
               answer: dict[str, Any]) -> ResponseReturnValue:
        """Run one account change for the caller; audited whether it succeeds or is refused."""
        info, username, fhir_user = caller()
        body = request.get_json(silent=True) or {}
        try:
            apply(current_app.extensions["fhirserver"], username, body)
        except UserError as exc:
            audited(code, 400, info, fhir_user, f"{refused}: {exc}")
            return jsonify(error="invalid_request", error_description=str(exc)), 400
        audited(code, 200, info, fhir_user, done)
        return jsonify(**answer)

    @bp.post("/totp/confirm")
    def totp_confirm() -> ResponseReturnValue:
        return change("totp-enrol", lambda svc, user, b: account.confirm_totp(
            svc.engine, svc.keys, user, str(b.get("code", ""))),
            "two-step sign-in enabled by the user", "two-step sign-in not enabled", {"totp": True})

    @bp.post("/password")
    def password() -> ResponseReturnValue:
        return change("password-change", lambda svc, user, b: account.change_password(
            svc.engine, user, str(b.get("current", "")), str(b.get("new", ""))),
            "password changed by the user", "password not changed", {"changed": True})

    @bp.post("/authorizations/<family_id>/revoke")
    def revoke(family_id: str) -> ResponseReturnValue:
        info, username, fhir_user = caller()
        if not account.revoke_authorization(current_app.extensions["fhirserver"].engine, username, family_id[:64]):
            return jsonify(error="not_found"), 404
        audited("authorization-revoke", 200, info, fhir_user, f"authorization {family_id[:64]} revoked by the user")
        return jsonify(revoked=True)

    return bp
