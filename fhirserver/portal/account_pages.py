"""The portal's security settings: two-step sign-in, password, authorized apps -- through the
user's own account API (/auth/account)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, redirect, request, url_for
from flask.typing import ResponseReturnValue

from ..smart.describe import describe_scope
from .api import Api
from .i18n import gettext as _
from .pages import need, page, posted


def _account(api: Api) -> dict[str, Any]:
    """The user's account with each authorization's access in words (as the approval page says it)."""
    body = api.account("GET").body
    for a in body.get("authorizations", []):
        said = [describe_scope(s) for s in str(a.get("scope", "")).split()]
        a["described"] = list(dict.fromkeys(_(s) for s in said))
    return body


def add_routes(bp: Blueprint) -> None:
    @bp.get("/security")
    def security() -> ResponseReturnValue:
        api = need()
        return page("security.html", api, account=_account(api), setup=None, done=request.args.get("done"))

    @bp.post("/security/totp")
    def totp_start() -> ResponseReturnValue:
        api = need()
        posted()
        reply = api.account("POST", "/totp", {"current_code": request.form.get("current_code", "")})
        if reply.status != 200:
            return page("security.html", api, account=_account(api), setup=None,
                         error=_(reply.body.get("error_description", "Two-step sign-in was not set up.")))
        return page("security.html", api, account=_account(api), setup=reply.body)

    def account_change(path: str, body: dict[str, str], done: str, failed: str) -> ResponseReturnValue:
        api = need()
        posted()
        reply = api.account("POST", path, body)
        if reply.status != 200:
            return page("security.html", api, account=_account(api), setup=None,
                         error=_(reply.body.get("error_description", failed)))
        return redirect(url_for("portal.security", done=_(done)))

    @bp.post("/security/totp/confirm")
    def totp_confirm() -> ResponseReturnValue:
        return account_change("/totp/confirm", {"code": request.form.get("code", "")},
                              "Two-step sign-in is on.", "Two-step sign-in was not turned on.")

    @bp.post("/security/password")
    def change_password() -> ResponseReturnValue:
        return account_change("/password", {"current": request.form.get("current", ""),
                                             "new": request.form.get("new", "")},
                              "Your password is changed.", "The password was not changed.")

    @bp.post("/security/revoke")
    def revoke_app() -> ResponseReturnValue:
        api = need()
        posted()
        reply = api.account("POST", f"/authorizations/{request.form.get('id', '')[:64]}/revoke")
        if reply.status != 200:
            abort(404)
        return redirect(url_for("portal.security", done=_("The app's access is revoked.")))
