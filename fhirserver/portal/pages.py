"""What every portal page shares: rendering with the session's state and language, the sign-in
and CSRF checks, the date format of the forms."""

from __future__ import annotations

import re
from typing import Any

from flask import Response, abort, redirect, render_template, request, session, url_for

from . import i18n
from .api import Api, csrf_ok, csrf_token
from .i18n import gettext as _

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
CSRF_FAILED = "The form expired or did not come from this site (CSRF check failed). Go back and try again."


def page(template: str, api: Api | None = None, **kw: object) -> str:
    state = session.get("portal") or {}
    return render_template(f"portal/{template}", csrf=csrf_token(), signed_in=api is not None, _=_,
                           lang=i18n.current(), languages=i18n.LANGUAGES,
                           warning=state.get("warning"), people=state.get("patients", []),
                           current=state.get("patient"), **kw)


def need() -> Api:
    """The signed-in user's API; a visitor who is not signed in goes to the landing page."""
    api = Api.current()
    if api is None:
        abort(redirect(url_for("portal.landing")))
    return api


def posted() -> None:
    """A state-changing form must carry the session's CSRF token (400 otherwise)."""
    if not csrf_ok(request.form.get("csrf")):
        abort(Response(_(CSRF_FAILED), status=400, mimetype="text/plain"))


def diagnostics(body: dict[str, Any]) -> str:
    issue: dict[str, Any] = next(iter(body.get("issue", []) or []), {})
    return str(issue.get("diagnostics", "error"))[:200]

