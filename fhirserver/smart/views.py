"""The browser side of SMART App Launch: `/auth/authorize` (login, TOTP, approval, patient
choice), plus discovery (`/.well-known/openid-configuration`, `/auth/jwks`), introspection,
revocation and the SMART style sheet.

Plain server-rendered HTML forms, no JavaScript. State between steps lives in Flask's signed
session cookie: the pending authorization request (as the client sent it), the signed-in user
and a CSRF token that every form posts back. The password is never kept; after a correct
password the session only records "second factor pending" for five minutes.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import OAuth2Payload, OAuth2Request
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant
from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    render_template,
    request,
    session,
)
from werkzeug.datastructures import MultiDict

from ..auth.clients import get_client
from ..auth.grants import GrantContext, claim_launch
from ..auth.tokens import lookup_token
from ..services import Services, current_services
from ..users.login import authenticate_second_factor, authenticate_user
from ..users.registry import UserRecord, get_user
from .audit import audit_oauth
from .describe import describe_scope
from .patients import _own_patients, _patient_choices, _patient_exists
from .secrets_store import signing_key

PENDING_MAX = 5
PENDING_TTL_S = 15 * 60
MFA_TTL_S = 5 * 60
NEUTRAL_LOGIN_ERROR = "The username or password is wrong, or the account cannot sign in right now."




class _OAuthServer(Protocol):
    """What the pages use of Authlib's AuthorizationServer (Authlib ships no type hints)."""

    def get_consent_grant(self, request: OAuth2Request) -> AuthorizationCodeGrant: ...

    def handle_error_response(self, request: OAuth2Request | None, error: OAuth2Error) -> Response: ...

    def create_authorization_response(self, request: OAuth2Request, grant_user: GrantContext | None,
                                      grant: AuthorizationCodeGrant) -> Response: ...

    def create_endpoint_response(self, name: str) -> Response: ...


def _server() -> _OAuthServer:
    server: _OAuthServer = current_app.extensions["fhirserver.oauth"]
    return server


class _Payload(OAuth2Payload):
    def __init__(self, data: MultiDict[str, str]) -> None:
        self._data = data

    @property
    def data(self) -> MultiDict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return {k: self._data.getlist(k) for k in self._data}


class StoredAuthorizationRequest(OAuth2Request):
    """The authorization request as the client sent it, replayed at each later step."""

    def __init__(self, params: list[tuple[str, str]], uri: str) -> None:
        super().__init__("GET", uri)
        self._params: MultiDict[str, str] = MultiDict(params)
        self.payload = _Payload(self._params)

    @property
    def args(self) -> MultiDict[str, str]:
        return self._params

    @property
    def form(self) -> MultiDict[str, str]:
        return MultiDict()


# ---- pages

def _page(template: str, status: int = 200, **kw: object) -> Response:
    kw.setdefault("csrf_token", _csrf())
    resp = Response(render_template(template, **kw), status=status, mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'self'; form-action 'self' *; frame-ancestors 'none'"
    return resp


def _error_page(message: str, status: int = 400) -> Response:
    return _page("error.html", status, message=message)


def _csrf() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return str(session["csrf"])


def _pending() -> dict[str, Any]:
    now = time.time()
    pend = {k: v for k, v in dict(session.get("authz", {})).items() if v.get("created", 0) + PENDING_TTL_S > now}
    return pend


def _save_pending(pend: dict[str, Any]) -> None:
    newest = sorted(pend.items(), key=lambda kv: kv[1]["created"])[-PENDING_MAX:]
    session["authz"] = dict(newest)


def _signed_in(svc: Services) -> UserRecord | None:
    login = session.get("login")
    if not login or login.get("expires", 0) < time.time():
        return None
    user = get_user(svc.engine, login["username"])
    if user is None or user.disabled or user.locked() or user.id != login["user_id"]:
        session.pop("login", None)
        return None
    return user


# ---- authorization request handling

def _redirect_error(stored: StoredAuthorizationRequest, err: OAuth2Error) -> Response:
    err.state = stored.payload.state
    return _server().handle_error_response(stored, err)


def _validate(stored: StoredAuthorizationRequest, launch_ctx: dict[str, Any] | None) -> tuple[Any, Response | None]:
    """Authlib's validation (client, exact redirect URI, response type, scope, PKCE S256) plus
    SMART's: `aud` must be our FHIR base URL, a `launch` needs the `launch` scope."""
    from authlib.oauth2.rfc6749 import InvalidRequestError

    server = _server()
    try:
        grant = server.get_consent_grant(request=stored)
    except OAuth2Error as err:
        if getattr(err, "redirect_uri", None):
            return None, _redirect_error(stored, err)
        return None, _error_page(f"This sign-in request is not valid: {(err.description or err.error).rstrip('.')}.")
    aud = (stored.payload.data.get("aud") or "").rstrip("/")
    settings = current_services().settings
    if aud != settings.fhir_base:
        bad_aud = InvalidRequestError(f"'aud' must be this server's FHIR base URL ({settings.fhir_base})",
                                      redirect_uri=grant.redirect_uri)
        return None, _redirect_error(stored, bad_aud)
    if launch_ctx is not None and "launch" not in (stored.payload.scope or "").split():
        no_launch = InvalidRequestError("an EHR launch needs the 'launch' scope", redirect_uri=grant.redirect_uri)
        return None, _redirect_error(stored, no_launch)
    return grant, None


def _start(params: list[tuple[str, str]]) -> Response:
    from authlib.oauth2.rfc6749 import InvalidRequestError

    svc = current_services()
    stored = StoredAuthorizationRequest(params, request.url)
    grant, failure = _validate(stored, None)
    if failure is not None:
        return failure
    launch_ctx = None
    launch = stored.payload.data.get("launch")
    if launch:
        launch_ctx = claim_launch(svc.engine, launch, grant.client.get_client_id())
        if launch_ctx is None:
            err = InvalidRequestError("unknown, expired or already used 'launch'", redirect_uri=grant.redirect_uri)
            return _redirect_error(stored, err)
        grant, failure = _validate(stored, launch_ctx)
        if failure is not None:
            return failure
    pend = _pending()
    txn = secrets.token_urlsafe(12)
    pend[txn] = {"params": params, "created": time.time(), "launch": launch_ctx}
    _save_pending(pend)
    return _show(txn, grant)


def _show(txn: str, grant: AuthorizationCodeGrant, error: str = "", status: int = 200) -> Response:
    svc = current_services()
    user = _signed_in(svc)
    client = grant.client.record
    if user is None:
        return _page("login.html", 401 if error else status, txn=txn, client_name=client.name, error=error)
    entry = _pending()[txn]
    launch_ctx = entry.get("launch")
    if launch_ctx and launch_ctx.get("user") and launch_ctx["user"] != user.username:
        return _error_page("This launch was created for another user. Sign in as that user.", 403)
    scopes = grant.request.scope.split() if grant.request.scope else []
    mode, options = _patient_choices(svc, user, launch_ctx, scopes)
    return _page("approve.html", status, txn=txn, client_name=client.name, username=user.username,
                 scopes=[(s, describe_scope(s)) for s in scopes], mode=mode, options=options, error=error)


def _continue() -> Response:
    svc = current_services()
    form = request.form
    if not hmac.compare_digest(str(form.get("csrf_token", "")), str(session.get("csrf", ""))):
        return _error_page("The form expired or did not come from this server. Start the sign-in again.", 403)
    txn = form.get("txn", "")
    entry = _pending().get(txn)
    if entry is None:
        return _error_page("This sign-in request expired. Start again from the app.")
    stored = StoredAuthorizationRequest([tuple(p) for p in entry["params"]], request.url)
    grant, failure = _validate(stored, entry.get("launch"))
    if failure is not None:
        return failure
    client = grant.client.record
    addr = request.remote_addr or ""
    if "password" in form:
        result = authenticate_user(svc, form.get("username", ""), form.get("password", ""), None, addr,
                                   client_id=client.client_id, client_name=client.name)
        if result.reason == "totp-required":
            session["mfa"] = {"username": result.username, "since": time.time(), "txn": txn}
            return _page("totp.html", txn=txn, client_name=client.name, error="")
        if not result.ok:
            return _show(txn, grant, NEUTRAL_LOGIN_ERROR)
        _sign_in(result.user_id, result.username)
        return _show(txn, grant)
    if "totp" in form:
        mfa = session.get("mfa")
        if not mfa or mfa.get("since", 0) + MFA_TTL_S < time.time():
            session.pop("mfa", None)
            return _show(txn, grant, "The sign-in took too long. Enter your password again.")
        result = authenticate_second_factor(svc, mfa["username"], form.get("totp", "").strip(), addr,
                                            client_id=client.client_id, client_name=client.name)
        if not result.ok:
            if result.reason in ("locked", "disabled"):
                session.pop("mfa", None)
                return _show(txn, grant, NEUTRAL_LOGIN_ERROR)
            return _page("totp.html", 401, txn=txn, client_name=client.name, error="That code is not right.")
        session.pop("mfa", None)
        _sign_in(result.user_id, result.username)
        return _show(txn, grant)
    user = _signed_in(svc)
    if user is None:
        return _show(txn, grant, "Please sign in.")
    denied = "deny" in form or form.get("action") == "deny"
    approved = "approve" in form or form.get("action") == "approve"
    if not (denied or approved):
        return _show(txn, grant, "Choose Allow or Deny.", 400)
    pend = _pending()
    pend.pop(txn, None)
    _save_pending(pend)
    if denied:
        audit_oauth(svc, "authorize", 403, client, user.fhir_user, "the user denied the app access")
        return _server().create_authorization_response(request=stored, grant_user=None, grant=grant)
    return _approve(svc, stored, grant, user, entry.get("launch"))


def _sign_in(user_id: int | None, username: str) -> None:
    ttl = current_services().settings.login_session_seconds
    session["login"] = {"user_id": user_id, "username": username, "expires": time.time() + ttl}
    session["csrf"] = secrets.token_urlsafe(24)  # a new token once signed in


def _approve(svc: Services, stored: StoredAuthorizationRequest, grant: AuthorizationCodeGrant, user: UserRecord,
             launch_ctx: dict[str, Any] | None) -> Response:
    allowed = grant.request.scope.split() if grant.request.scope else []
    ticked = set(request.form.getlist("scope"))
    scopes = [s for s in allowed if s in ticked]
    client = grant.client.record
    mode, options = _patient_choices(svc, user, launch_ctx, scopes)
    patient = None
    if mode == "fixed":
        patient = options[0][0]
    elif mode == "choose":
        patient = request.form.get("patient", "") or (options[0][0] if len(options) == 1 else "")
        if patient not in {o[0] for o in options}:
            return _repeat(stored, launch_ctx, "Choose one of the listed patients.")
    elif mode == "search":
        patient = request.form.get("patient", "").strip().removeprefix("Patient/")
        if not _patient_exists(svc, patient):
            return _repeat(stored, launch_ctx, "No patient with that id.")
    if launch_ctx is None:
        scopes = [s for s in scopes if s != "launch"]
    if not [s for s in scopes if "/" in s and not s.startswith("launch")]:
        audit_oauth(svc, "authorize", 403, client, user.fhir_user, "no data scope approved")
        return _server().create_authorization_response(request=stored, grant_user=None, grant=grant)
    ctx = GrantContext(
        user_id=user.id, username=user.username, fhir_user=user.fhir_user, scope=" ".join(scopes),
        patient=patient, encounter=(launch_ctx or {}).get("encounter"),
        linked_patients=_own_patients(user)[1:] if user.fhir_user.startswith("Patient/") else _own_patients(user),
        need_patient_banner=launch_ctx is None, auth_time=int(session.get("login", {}).get("expires", 0)
                                                              - svc.settings.login_session_seconds),
        launch=launch_ctx is not None,
    )
    resp = _server().create_authorization_response(request=stored, grant_user=ctx, grant=grant)
    audit_oauth(svc, "authorize", 200 if resp.status_code == 302 and "code=" in resp.headers.get("Location", "") else 400,
                client, user.fhir_user, f"authorization code issued; scope: {ctx.scope}"
                + (f"; patient {patient}" if patient else ""))
    return resp


def _repeat(stored: StoredAuthorizationRequest, launch_ctx: dict[str, Any] | None, error: str) -> Response:
    """Show the approval page again for the same request (under a new transaction id)."""
    pend = _pending()
    txn = secrets.token_urlsafe(12)
    pend[txn] = {"params": list(stored.args.items(multi=True)), "created": time.time(), "launch": launch_ctx}
    _save_pending(pend)
    grant, failure = _validate(stored, launch_ctx)
    return failure or _show(txn, grant, error, 400)


# ---- blueprint

def _endpoint_view(name: str) -> Callable[[], Response]:
    def view() -> Response:
        svc = current_services()
        try:
            resp = _server().create_endpoint_response(name)
        except OAuth2Error as err:
            resp = _server().handle_error_response(None, err)
        body = resp.get_json(silent=True) or {}
        auth = request.authorization
        claimed = request.form.get("client_id") or (auth.username if auth and auth.type == "basic" else None)
        if claimed is None and auth is not None and auth.type == "bearer" and auth.token:
            info, _reason = lookup_token(svc.engine, auth.token)  # a resource server's own token
            claimed = info.client_id if info else None
        record = get_client(svc.engine, claimed) if isinstance(claimed, str) and len(claimed) <= 64 else None
        refused: tuple[str | None, bool] | None = None
        if resp.status_code == 200:
            desc = (f"token introspected: active={body.get('active')}" if name == "introspection"
                    else "token revoked (or already unknown)")
        else:
            desc = f"{name} refused: {body.get('error', 'error')}"
            if body.get("error") in ("invalid_client", "unauthorized_client"):
                # failed client authentication: the claimed id is not who asked (it may be forged)
                claim = str(claimed)[:64] if claimed else None
                desc += f" (claimed client {claim}, not authenticated)" if claim else ""
                refused, record = (claim, record is not None), None
        audit_oauth(svc, name, resp.status_code, record, None, desc, refused)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    view.__name__ = f"{name}_view"
    return view


def make_smart_blueprint() -> Blueprint:
    bp = Blueprint("smart", __name__, url_prefix="/auth", template_folder="templates",
                   static_folder="static", static_url_path="/static")

    @bp.route("/authorize", methods=["GET", "POST"])
    def authorize() -> Response:
        try:
            if request.method == "POST" and "txn" in request.form:
                return _continue()
            source = request.form if request.method == "POST" else request.args
            return _start([(k, v) for k, v in source.items(multi=True)])
        except OAuth2Error as err:  # e.g. insecure_transport: nothing is trusted, no redirect
            return _error_page(f"This sign-in request is not valid: {err.description or err.error}")

    @bp.get("/jwks")
    def jwks() -> Response:
        key = signing_key(current_services().settings.data_dir)
        return jsonify({"keys": [key.as_dict(private=False)]})

    @bp.get("/smart-style.json")
    def smart_style() -> Response:
        return jsonify({"color_background": "#ffffff", "color_error": "#b00020", "color_highlight": "#00539b",
                        "color_modal_backdrop": "", "color_success": "#2e7d32", "color_text": "#1a1a1a",
                        "dim_border_radius": "4px", "dim_font_size": "16px", "dim_spacing_size": "16px",
                        "font_family_body": "system-ui, sans-serif", "font_family_heading": "system-ui, sans-serif"})

    for name, path in (("introspection", "/introspect"), ("revocation", "/revoke")):
        bp.add_url_rule(path, name, _endpoint_view(name), methods=["POST"])
    return bp
