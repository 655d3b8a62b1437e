"""The portal's pages for the patient's rights over their record: the printable summary, corrections,
erasure requests and downloads (docs/portal.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, current_app, redirect, request, session, url_for
from flask.typing import ResponseReturnValue

from ..clock import now_us
from ..fhir.dates import instant_text
from ..pipeline.summary_op import describe
from .api import AMENDABLE, Api
from .i18n import gettext as _
from .pages import diagnostics, need, page, posted
from .record import build_record, details_of, name_of, with_details

ENTRY = re.compile(r"[A-Za-z]{1,64}/[A-Za-z0-9\-.]{1,64}")


def add_routes(bp: Blueprint) -> None:
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
        html = page("summary.html", None if for_pdf else api, name=name_of(rec.patient), patient=rec.patient,
                     sections=sections, trends=rec.trends, made=str(composition.get("date", ""))[:10], pdf=for_pdf)
        return html

    @bp.get("/summary")
    def summary() -> ResponseReturnValue:
        return summary_page(need())

    @bp.get("/summary.pdf")
    def summary_pdf() -> ResponseReturnValue:
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
    def corrections() -> ResponseReturnValue:
        api = need()
        patient = api.get(f"Patient/{api.patient}").body
        everything = api.all_pages(f"Patient/{api.patient}/$everything", _count="200")
        entries = [(f"{r['resourceType']}/{r['id']}", describe(r)) for r in everything if r["resourceType"] in AMENDABLE]
        return page("corrections.html", api, details=details_of(patient), entries=entries,
                     done=request.args.get("done"))

    @bp.post("/corrections/details")
    def correct_details() -> ResponseReturnValue:
        api = need()
        posted()
        patient = api.get(f"Patient/{api.patient}").body
        corrected = with_details(patient, request.form)
        if corrected == {k: v for k, v in patient.items() if k != "meta"}:
            return redirect(url_for("portal.corrections", done=_("Nothing was changed.")))
        reply = api.put(f"Patient/{api.patient}", corrected)
        if reply.status != 200:
            return page("corrections.html", api, details=details_of(patient), entries=[],
                         error=_("Your details could not be saved (%(why)s).", why=diagnostics(reply.body)))
        return redirect(url_for("portal.corrections", done=_("Your details are saved.")))

    @bp.post("/corrections/flag")
    def flag_entry() -> ResponseReturnValue:
        api = need()
        posted()
        ref, note = request.form.get("entry", ""), request.form.get("note", "").strip()[:1000]
        # an entry is `Type/id` of an amendable type -- no version, query or path beyond it
        if not ENTRY.fullmatch(ref) or ref.split("/", 1)[0] not in AMENDABLE or not note:
            abort(400)
        body = api.get(ref).body  # 404 unless it is one of the user's records
        if body.get("resourceType") != ref.split("/", 1)[0]:
            abort(404)
        body["note"] = [*body.get("note", []), {"text": f"Patient reports: {note}", "time": instant_text(now_us())}]
        reply = api.put(ref, body)
        if reply.status != 200:
            abort(502 if reply.status >= 500 else 400)
        return redirect(url_for("portal.corrections", done=_("Your note was added; your care team will review it.")))

    @bp.get("/erasure")
    def erasure() -> ResponseReturnValue:
        api = need()
        reply = api.get(f"Patient/{api.patient}/$erasure-request")
        requests = [{p["name"]: p["valueString"] for p in part["part"]} for part in reply.body.get("parameter", [])]
        return page("erasure.html", api, requests=requests, done=request.args.get("done"),
                     pending=any(r.get("status") == "pending" for r in requests))

    @bp.post("/erasure")
    def erasure_request() -> ResponseReturnValue:
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
    def download() -> ResponseReturnValue:
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
        return page("download.html", api, export=export)

    @bp.post("/download/ndjson")
    def ndjson_start() -> ResponseReturnValue:
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
    def ndjson_file(n: int) -> ResponseReturnValue:
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
    def download_json() -> ResponseReturnValue:
        api = need()
        entries = api.all_pages(f"Patient/{api.patient}/$everything", limit=1000, _count="500")
        bundle = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"fullUrl": f"{current_app.extensions['fhirserver'].settings.fhir_base}/"
                                        f"{r['resourceType']}/{r['id']}", "resource": r} for r in entries]}
        return Response(json.dumps(bundle, indent=1), mimetype="application/fhir+json",
                        headers={"Content-Disposition": 'attachment; filename="my-health-record.json"'})
