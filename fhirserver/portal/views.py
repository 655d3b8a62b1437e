"""The portal's pages (docs/portal.md lists each with the FHIR interactions it uses).

Server-rendered HTML with no script at all; every state-changing form is a POST carrying the
session's CSRF token. A page that needs a sign-in sends the visitor to the landing page."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    redirect,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue

from ..consent.labels import load_sensitive_codes
from . import account_pages, rights
from .api import Api, SignedOut, begin_sign_in, finish_sign_in, switch
from .i18n import gettext as _
from .pages import DATE, diagnostics, need, page, posted
from .record import access_rows, build_record, name_of
from .sharing import apply_current, blocked, choices, consent_body, org_block_body


def _consents(api: Api) -> list[dict[str, Any]]:
    return api.all_pages("Consent", patient=api.patient, _count="100")


def _choices(api: Api, consents: list[dict[str, Any]] | None = None) -> list[Any]:
    svc = current_app.extensions["fhirserver"]
    codes = load_sensitive_codes(svc.settings.profiles_dir)
    opt_out = frozenset(p.strip() for p in svc.settings.consent_opt_out_purposes.split(",") if p.strip())
    categories = [(codes.label_system, c, d) for c, d in sorted(codes.labels.items())]
    return apply_current(choices(opt_out, categories), consents if consents is not None else _consents(api))


def _organizations(api: Api) -> dict[str, str]:
    """Organizations the user may choose to block -- those their record names (a patient's token
    does not reach the organization directory): `Organization/id` -> name (the reference's
    display, else the id)."""
    found: dict[str, str] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and re.fullmatch(r"Organization/[A-Za-z0-9\-.]{1,64}", ref):
                found[ref] = str(node.get("display") or found.get(ref) or ref.split("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(api.all_pages(f"Patient/{api.patient}/$everything", _count="200"))
    return found


def make_portal_blueprint() -> Blueprint:
    bp = Blueprint("portal", __name__, url_prefix="/portal", template_folder="templates", static_folder="static")

    @bp.errorhandler(SignedOut)
    def signed_out(_exc: SignedOut) -> ResponseReturnValue:
        session.pop("portal", None)
        return redirect(url_for("portal.landing", error=_("Your sign-in has ended. Please sign in again.")))

    @bp.get("/")
    def landing() -> ResponseReturnValue:
        if Api.current() is not None:
            return redirect(url_for("portal.record"))
        return page("landing.html", error=request.args.get("error"))

    @bp.get("/login")
    def login() -> ResponseReturnValue:
        return redirect(begin_sign_in())

    @bp.get("/callback")
    def callback() -> ResponseReturnValue:
        if request.args.get("error"):
            return redirect(url_for("portal.landing", error=_("The sign-in was cancelled or refused.")))
        problem = finish_sign_in(request.args.get("code", ""), request.args.get("state", ""))
        if problem:
            return redirect(url_for("portal.landing", error=_(problem)))
        return redirect(url_for("portal.record"))

    @bp.get("/record")
    def record() -> ResponseReturnValue:
        api = need()
        everything = api.all_pages(f"Patient/{api.patient}/$everything", _count="200")
        if not everything:
            abort(404)
        rec = build_record(everything)
        return page("record.html", api, rec=rec, name=name_of(rec.patient))

    @bp.get("/access")
    def access() -> ResponseReturnValue:
        api = need()
        pairs = [("patient", f"Patient/{api.patient}"), ("_sort", "-date"), ("_count", "20")]
        since, until = request.args.get("from", ""), request.args.get("to", "")
        accessor = request.args.get("accessor", "").strip()
        if DATE.match(since):
            pairs.append(("date", f"ge{since}"))
        if DATE.match(until):
            pairs.append(("date", f"le{until}"))
        if re.fullmatch(r"(Device|Practitioner|PractitionerRole|Organization)/[A-Za-z0-9\-._]{1,64}", accessor):
            pairs.append(("agent", accessor))
        if request.args.get("cursor"):
            pairs.append(("_cursor", request.args["cursor"][:500]))
        reply = api.get("AuditEvent", pairs)
        if reply.status != 200:
            abort(502)
        events = [e["resource"] for e in reply.body.get("entry", []) if e.get("search", {}).get("mode") == "match"]
        nxt = next((lk["url"] for lk in reply.body.get("link", []) if lk.get("relation") == "next"), None)
        cursor = dict(parse_qsl(urlsplit(nxt).query)).get("_cursor") if nxt else None
        return page("access.html", api, rows=access_rows(events, str((session.get("portal") or {}).get("fhir_user") or f"Patient/{api.patient}")), since=since, until=until, accessor=accessor,
                     cursor=cursor, total=reply.body.get("total"))

    @bp.get("/sharing")
    def sharing() -> ResponseReturnValue:
        api = need()
        consents = _consents(api)
        orgs = _organizations(api)
        blocks = [{**b, "name": orgs.get(b["org"], b["org"])} for b in blocked(consents)]
        return page("sharing.html", api, choices=_choices(api, consents), done=request.args.get("done"),
                     orgs={k: v for k, v in orgs.items() if k not in {b["org"] for b in blocks}}, blocks=blocks)

    @bp.post("/sharing")
    def review() -> ResponseReturnValue:
        api = need()
        posted()
        changes = []
        for c in _choices(api):
            wanted = request.form.get(c.key)
            until = request.form.get(f"{c.key}-until", "")
            until = until if DATE.match(until) else ""
            if wanted not in ("allow", "deny"):
                continue
            allowed = wanted == "allow"
            if allowed != c.allowed or (allowed and until != c.until):
                changes.append({"key": c.key, "title": c.title, "allowed": allowed, "until": until,
                                "effect": c.effect(allowed, until, _)})
        org = request.form.get("block", "")
        if org:
            name = _organizations(api).get(org)
            if name is None:
                abort(404)
            changes.append({"key": f"org-{org.split('/', 1)[1]}", "title": name, "allowed": False, "until": "",
                            "effect": _("%(who)s will no longer receive %(what)s.", who=name, what=_("your data"))})
        return page("review.html", api, changes=changes)

    @bp.post("/sharing/save")
    def save() -> ResponseReturnValue:
        api = need()
        posted()
        current = {c.key: c for c in _choices(api)}
        keys = request.form.getlist("key")
        # only the choices the pages offer: the purposes and categories, and the organizations the
        # record names -- anything else is refused before a Consent is written
        offered = {f"org-{ref.split('/', 1)[1]}" for ref in _organizations(api)} if any(
            k.startswith("org-") for k in keys) else set()
        if any(k not in current and k not in offered for k in keys):
            abort(400)
        for key in keys:
            if key in offered:
                if request.form.get(f"{key}-allowed") != "deny":
                    abort(400)
                reply = api.post("Consent", org_block_body(api.patient, f"Organization/{key[4:]}"))
                if reply.status != 201:
                    abort(502)
                continue
            choice = current[key]
            allowed = request.form.get(f"{key}-allowed") == "allow"
            until = request.form.get(f"{key}-until", "")
            body = consent_body(choice, api.patient, allowed, until if DATE.match(until) else "")
            reply = api.put(f"Consent/{choice.consent_id}", body) if choice.consent_id else api.post("Consent", body)
            if reply.status not in (200, 201):
                return page("sharing.html", api, choices=_choices(api), done=None,
                             error=_("Your choice for %(title)s could not be saved (%(why)s).", title=_(choice.title),
                                     why=diagnostics(reply.body)))
        return redirect(url_for("portal.sharing", done="saved"))

    @bp.post("/sharing/withdraw")
    def withdraw() -> ResponseReturnValue:
        api = need()
        posted()
        consents = _consents(api)
        key = request.form.get("key", "")
        consent_id = next((b["consent"] for b in blocked(consents) if b["key"] == key), None) if key.startswith("org-") \
            else next((c.consent_id for c in _choices(api, consents) if c.key == key and c.consent_id), None)
        if consent_id is None:
            abort(404)
        current_body = api.get(f"Consent/{consent_id}").body
        reply = api.put(f"Consent/{consent_id}", {**current_body, "status": "inactive"})
        if reply.status != 200:
            abort(502)
        return redirect(url_for("portal.sharing", done="withdrawn"))

    @bp.post("/switch")
    def switch_patient() -> ResponseReturnValue:
        need()
        posted()
        if not switch(request.form.get("patient", "")):
            abort(404)
        return redirect(url_for("portal.record"))

    @bp.post("/logout")
    def logout() -> ResponseReturnValue:
        posted()
        api = Api.current()
        if api is not None:
            api.revoke()
        # also the sign-in at the authorization server (the same cookie): on a shared device the
        # next person must sign in as themselves
        for key in ("portal", "portal_csrf", "login", "mfa", "authz"):
            session.pop(key, None)
        return redirect(url_for("portal.landing"))

    rights.add_routes(bp)
    account_pages.add_routes(bp)
    return bp
