"""The portal's pages (docs/portal.md lists each with the FHIR interactions it uses).

Server-rendered HTML with no script at all; every state-changing form is a POST carrying the
session's CSRF token. A page that needs a sign-in sends the visitor to the landing page."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from ..clock import now_us
from ..consent.labels import load_sensitive_codes
from ..fhir.dates import instant_text
from ..pipeline.summary_op import describe
from . import i18n
from .api import AMENDABLE, Api, SignedOut, begin_sign_in, csrf_ok, csrf_token, finish_sign_in, switch
from .i18n import gettext as _
from .record import access_rows, build_record, details_of, name_of, with_details
from .sharing import apply_current, blocked, choices, consent_body, org_block_body

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
CSRF_FAILED = "The form expired or did not come from this site (CSRF check failed). Go back and try again."


def _page(template: str, api: Api | None = None, **kw: Any) -> str:
    state = session.get("portal") or {}
    return render_template(f"portal/{template}", csrf=csrf_token(), signed_in=api is not None, _=_,
                           lang=i18n.current(), languages=i18n.LANGUAGES,
                           warning=state.get("warning"), people=state.get("patients", []),
                           current=state.get("patient"), **kw)


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

    def walk(node: Any) -> None:
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

    def need() -> Api:
        api = Api.current()
        if api is None:
            abort(redirect(url_for("portal.landing")))
        return api

    def posted() -> None:
        if not csrf_ok(request.form.get("csrf")):
            abort(Response(_(CSRF_FAILED), status=400, mimetype="text/plain"))

    @bp.errorhandler(SignedOut)
    def signed_out(_exc: SignedOut) -> Any:
        session.pop("portal", None)
        return redirect(url_for("portal.landing", error=_("Your sign-in has ended. Please sign in again.")))

    @bp.get("/")
    def landing() -> Any:
        if Api.current() is not None:
            return redirect(url_for("portal.record"))
        return _page("landing.html", error=request.args.get("error"))

    @bp.get("/login")
    def login() -> Any:
        return redirect(begin_sign_in())

    @bp.get("/callback")
    def callback() -> Any:
        if request.args.get("error"):
            return redirect(url_for("portal.landing", error=_("The sign-in was cancelled or refused.")))
        problem = finish_sign_in(request.args.get("code", ""), request.args.get("state", ""))
        if problem:
            return redirect(url_for("portal.landing", error=_(problem)))
        return redirect(url_for("portal.record"))

    @bp.get("/record")
    def record() -> Any:
        api = need()
        everything = api.all_pages(f"Patient/{api.patient}/$everything", _count="200")
        if not everything:
            abort(404)
        rec = build_record(everything)
        return _page("record.html", api, rec=rec, name=name_of(rec.patient))

    @bp.get("/access")
    def access() -> Any:
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
        return _page("access.html", api, rows=access_rows(events, str((session.get("portal") or {}).get("fhir_user") or f"Patient/{api.patient}")), since=since, until=until, accessor=accessor,
                     cursor=cursor, total=reply.body.get("total"))

    @bp.get("/sharing")
    def sharing() -> Any:
        api = need()
        consents = _consents(api)
        orgs = _organizations(api)
        blocks = [{**b, "name": orgs.get(b["org"], b["org"])} for b in blocked(consents)]
        return _page("sharing.html", api, choices=_choices(api, consents), done=request.args.get("done"),
                     orgs={k: v for k, v in orgs.items() if k not in {b["org"] for b in blocks}}, blocks=blocks)

    @bp.post("/sharing")
    def review() -> Any:
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
        return _page("review.html", api, changes=changes)

    @bp.post("/sharing/save")
    def save() -> Any:
        api = need()
        posted()
        current = {c.key: c for c in _choices(api)}
        for key in request.form.getlist("key"):
            if key.startswith("org-") and request.form.get(f"{key}-allowed") == "deny":
                reply = api.post("Consent", org_block_body(api.patient, f"Organization/{key[4:]}"))
                if reply.status != 201:
                    abort(502)
                continue
            choice = current.get(key)
            if choice is None:
                continue
            allowed = request.form.get(f"{key}-allowed") == "allow"
            until = request.form.get(f"{key}-until", "")
            body = consent_body(choice, api.patient, allowed, until if DATE.match(until) else "")
            reply = api.put(f"Consent/{choice.consent_id}", body) if choice.consent_id else api.post("Consent", body)
            if reply.status not in (200, 201):
                return _page("sharing.html", api, choices=_choices(api), done=None,
                             error=_("Your choice for %(title)s could not be saved (%(why)s).", title=_(choice.title),
                                     why=_diagnostics(reply.body)))
        return redirect(url_for("portal.sharing", done="saved"))

    @bp.post("/sharing/withdraw")
    def withdraw() -> Any:
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
    def switch_patient() -> Any:
        need()
        posted()
        if not switch(request.form.get("patient", "")):
            abort(404)
        return redirect(url_for("portal.record"))

    def summary_page(api: Api, for_pdf: bool = False) -> str:
        reply = api.get(f"Patient/{api.patient}/$summary")
        if reply.status != 200:
            abort(404)
        resources = [e["resource"] for e in reply.body.get("entry", [])]
        composition = resources[0]
        by_ref = {f"{r['resourceType']}/{r['id']}": r for r in resources[1:]}
        sections = [{"title": s["title"], "items": [describe(by_ref[e["reference"]]) for e in s.get("entry", [])
                                                     if e["reference"] in by_ref]}
                    for s in composition.get("section", [])]
        rec = build_record(resources[1:])
        html = _page("summary.html", None if for_pdf else api, name=name_of(rec.patient), patient=rec.patient,
                     sections=sections, trends=rec.trends, made=str(composition.get("date", ""))[:10], pdf=for_pdf)
        return html

    @bp.get("/summary")
    def summary() -> Any:
        return summary_page(need())

    @bp.get("/summary.pdf")
    def summary_pdf() -> Any:
        try:
            from weasyprint import CSS, HTML
        except (ImportError, OSError):  # the system's Pango is missing (scripts/ensure_pango.sh)
            return Response(_("The PDF summary is not available on this server; print the summary page instead."),
                            status=503, mimetype="text/plain")
        page = summary_page(need(), for_pdf=True)
        css = CSS(filename=str(Path(bp.static_folder or "") / "portal.css"))
        pdf = HTML(string=page).write_pdf(stylesheets=[css])  # the page links nothing: nothing is fetched
        return Response(pdf, mimetype="application/pdf",
                        headers={"Content-Disposition": 'attachment; filename="health-summary.pdf"'})

    @bp.get("/corrections")
    def corrections() -> Any:
        api = need()
        patient = api.get(f"Patient/{api.patient}").body
        everything = api.all_pages(f"Patient/{api.patient}/$everything", _count="200")
        entries = [(f"{r['resourceType']}/{r['id']}", describe(r)) for r in everything if r["resourceType"] in AMENDABLE]
        return _page("corrections.html", api, details=details_of(patient), entries=entries,
                     done=request.args.get("done"))

    @bp.post("/corrections/details")
    def correct_details() -> Any:
        api = need()
        posted()
        patient = api.get(f"Patient/{api.patient}").body
        reply = api.put(f"Patient/{api.patient}", with_details(patient, request.form))
        if reply.status != 200:
            return _page("corrections.html", api, details=details_of(patient), entries=[],
                         error=_("Your details could not be saved (%(why)s).", why=_diagnostics(reply.body)))
        return redirect(url_for("portal.corrections", done=_("Your details are saved.")))

    @bp.post("/corrections/flag")
    def flag_entry() -> Any:
        api = need()
        posted()
        ref, note = request.form.get("entry", ""), request.form.get("note", "").strip()[:1000]
        if ref.split("/", 1)[0] not in AMENDABLE or not note:
            abort(400)
        body = api.get(ref).body  # 404 unless it is one of the user's records
        if body.get("resourceType") != ref.split("/", 1)[0]:
            abort(404)
        body["note"] = [*body.get("note", []), {"text": f"Patient reports: {note}", "time": instant_text(now_us())}]
        reply = api.put(ref, body)
        if reply.status != 200:
            abort(502)
        return redirect(url_for("portal.corrections", done=_("Your note was added; your care team will review it.")))

    @bp.get("/security")
    def security() -> Any:
        api = need()
        return _page("security.html", api, account=api.account("GET").body, setup=None, done=request.args.get("done"))

    @bp.post("/security/totp")
    def totp_start() -> Any:
        api = need()
        posted()
        setup = api.account("POST", "/totp").body
        return _page("security.html", api, account=api.account("GET").body, setup=setup)

    def account_change(path: str, body: dict[str, str], done: str, failed: str) -> Any:
        api = need()
        posted()
        reply = api.account("POST", path, body)
        if reply.status != 200:
            return _page("security.html", api, account=api.account("GET").body, setup=None,
                         error=_(reply.body.get("error_description", failed)))
        return redirect(url_for("portal.security", done=_(done)))

    @bp.post("/security/totp/confirm")
    def totp_confirm() -> Any:
        return account_change("/totp/confirm", {"secret": request.form.get("secret", ""),
                                                "code": request.form.get("code", "")},
                              "Two-step sign-in is on.", "Two-step sign-in was not turned on.")

    @bp.post("/security/password")
    def change_password() -> Any:
        return account_change("/password", {"current": request.form.get("current", ""),
                                             "new": request.form.get("new", "")},
                              "Your password is changed.", "The password was not changed.")

    @bp.post("/security/revoke")
    def revoke_app() -> Any:
        api = need()
        posted()
        reply = api.account("POST", f"/authorizations/{request.form.get('id', '')[:64]}/revoke")
        if reply.status != 200:
            abort(404)
        return redirect(url_for("portal.security", done=_("The app's access is revoked.")))

    @bp.get("/erasure")
    def erasure() -> Any:
        api = need()
        reply = api.get(f"Patient/{api.patient}/$erasure-request")
        requests = [{p["name"]: p["valueString"] for p in part["part"]} for part in reply.body.get("parameter", [])]
        return _page("erasure.html", api, requests=requests, done=request.args.get("done"),
                     pending=any(r.get("status") == "pending" for r in requests))

    @bp.post("/erasure")
    def erasure_request() -> Any:
        api = need()
        posted()
        if request.form.get("understood") != "yes":
            abort(400)
        body = {"resourceType": "Parameters", "parameter": [{"name": "reason",
                                                            "valueString": request.form.get("reason", "")[:2000]}]}
        reply = api.post(f"Patient/{api.patient}/$erasure-request", body)
        if reply.status != 201:
            abort(409 if reply.status == 409 else 502)
        return redirect(url_for("portal.erasure", done=_("Your request is filed. You will see the decision here.")))

    @bp.get("/download")
    def download() -> Any:
        api = need()
        job = session.get("portal_export")
        export: dict[str, Any] | None = None
        if job and job.get("patient") == api.patient:
            status = api.raw(job["status"], {"Accept": "application/json"})
            if status.status_code == 202:
                export = {"state": "running", "progress": status.headers.get("X-Progress", "")}
            elif status.status_code == 200:
                files = (status.get_json(silent=True) or {}).get("output", [])
                export = {"state": "done", "files": [{"n": i, "type": f.get("type"), "count": f.get("count")}
                                                    for i, f in enumerate(files)]}
                session["portal_export"] = {**job, "files": [urlsplit(f["url"]).path + "?" + urlsplit(f["url"]).query
                                                             for f in files]}
            else:
                export = {"state": "failed"}
        return _page("download.html", api, export=export)

    @bp.post("/download/ndjson")
    def ndjson_start() -> Any:
        api = need()
        posted()
        resp = api.raw(f"/fhir/Patient/{api.patient}/$export", {"Prefer": "respond-async",
                                                                 "Accept": "application/fhir+json"})
        if resp.status_code != 202:
            abort(502)
        where = urlsplit(resp.headers["Content-Location"])
        session["portal_export"] = {"patient": api.patient, "status": f"{where.path}?{where.query}"}
        return redirect(url_for("portal.download"))

    @bp.get("/download/ndjson/<int:n>")
    def ndjson_file(n: int) -> Any:
        api = need()
        job = session.get("portal_export") or {}
        files = job.get("files", []) if job.get("patient") == api.patient else []
        if not 0 <= n < len(files):
            abort(404)
        resp = api.raw(files[n], {"Accept": "application/fhir+ndjson"})
        if resp.status_code != 200:
            abort(404)
        return Response(resp.get_data(), mimetype="application/fhir+ndjson",
                        headers={"Content-Disposition": f'attachment; filename="my-record-{n + 1}.ndjson"'})

    @bp.get("/download/record.json")
    def download_json() -> Any:
        api = need()
        entries = api.all_pages(f"Patient/{api.patient}/$everything", limit=1000, _count="500")
        bundle = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"fullUrl": f"{current_app.extensions['fhirserver'].settings.fhir_base}/"
                                        f"{r['resourceType']}/{r['id']}", "resource": r} for r in entries]}
        return Response(json.dumps(bundle, indent=1), mimetype="application/fhir+json",
                        headers={"Content-Disposition": 'attachment; filename="my-health-record.json"'})

    @bp.post("/logout")
    def logout() -> Any:
        posted()
        api = Api.current()
        if api is not None:
            api.revoke()
        # also the sign-in at the authorization server (the same cookie): on a shared device the
        # next person must sign in as themselves
        for key in ("portal", "portal_csrf", "login", "mfa", "authz"):
            session.pop(key, None)
        return redirect(url_for("portal.landing"))

    return bp


def _diagnostics(body: dict[str, Any]) -> str:
    issue: dict[str, Any] = next(iter(body.get("issue", []) or []), {})
    return str(issue.get("diagnostics", "error"))[:200]
