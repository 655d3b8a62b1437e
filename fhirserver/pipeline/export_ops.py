"""Pipeline handlers for Bulk Data export (FHIR Bulk Data Access IG v2):

- kick-off `GET|POST [base]/$export`, `[base]/Patient/$export`, `[base]/Patient/[id]/$export`
  with `Prefer: respond-async` -> 202 and `Content-Location` of the status URL;
- status `GET [base]/$export-poll-status?_jobId=` -> 202 with `X-Progress`/`Retry-After`, 200
  with the manifest, or an OperationOutcome; `DELETE` cancels and deletes the output;
- output `GET [base]/$export-file?_jobId=&file=` -> NDJSON (`requiresAccessToken`: the same
  client, and the same user, that started the job).

They go through the pipeline like every interaction (token, scopes, consent hook, audit); the
scope check per exported type uses the pipeline's `access_fn`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import Connection

from ..auth.principal import principal_snapshot
from ..clock import now_us
from ..fhir.dates import instant_text, parse_range
from ..fhir.errors import FhirError
from ..search.parser import parse_search
from ..search.sources import source_of
from ..services import Services
from ..storage import export_jobs as jobs
from ..storage.codec import parse_json
from ..storage.errors import StorageError
from .context import RequestContext, Result
from .errors import fhir_error
from .handler import Handler
from .operation_params import parameters_of
from .request_body import parse_body

NDJSON_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
PATIENT_TYPES_EXCLUDED = {"AuditEvent"}  # the audit trail is not part of a record


def _values(ctx: RequestContext, name: str, params: list[tuple[str, str]] | None = None) -> list[str]:
    return [v for k, v in (ctx.interaction.params if params is None else params) if k == name]


def _one(ctx: RequestContext, name: str, params: list[tuple[str, str]] | None = None) -> str | None:
    values = _values(ctx, name, params)
    if len(values) > 1:
        raise FhirError(400, "invalid", f"{name} may be given once", [name])
    return values[0] if values else None


def _kickoff_params(ctx: RequestContext) -> list[tuple[str, str]]:
    """The kick-off's parameters: the query, and for a POST the Parameters resource in the body
    (Bulk Data 2.0), `patient` as a reference (`Patient/[id]`)."""
    params = list(ctx.interaction.params)
    if ctx.interaction.method != "POST" or not ctx.body:
        return params
    for param in parameters_of(parse_body(ctx), "a Bulk Data kick-off"):
        value = param.value
        if param.name == "patient":
            value = value.get("reference") if isinstance(value, dict) else None
        if not isinstance(value, str):
            raise FhirError(400, "invalid", f"Parameter '{param.name[:40]}' has no value this server reads", [param.path])
        params.append((param.name, value))
    return params


def _patients_asked(ctx: RequestContext, params: list[tuple[str, str]], level: str) -> list[str] | None:
    """The `patient` references a Patient- or Group-level kick-off names (None: not narrowed)."""
    refs = _values(ctx, "patient", params)
    if not refs:
        return None
    if level not in ("patient", "group"):
        raise FhirError(400, "invalid", "patient is a parameter of Patient/$export and Group/[id]/$export", ["patient"])
    ids = []
    for ref in refs:
        rtype, _sep, pid = ref.partition("/")
        if rtype != "Patient" or not pid or "/" in pid:
            raise FhirError(400, "invalid", f"patient must reference a Patient (Patient/[id]), not '{ref[:60]}'",
                            ["patient"])
        ids.append(pid)
    return ids


class ExportKickoff(Handler):
    def prepare(self, ctx: RequestContext) -> None:
        it = ctx.interaction
        svc = ctx.services
        params = _kickoff_params(ctx)
        if "respond-async" not in ctx.prefer:
            raise FhirError(400, "invalid", "Bulk export is asynchronous: send 'Prefer: respond-async'")
        fmt = _one(ctx, "_outputFormat", params)
        # an unencoded '+' arrives as a space (application/fhir ndjson): read it as the client meant it
        if fmt is not None and fmt.replace(" ", "+") not in NDJSON_FORMATS:
            raise FhirError(400, "not-supported", "_outputFormat must be application/fhir+ndjson", ["_outputFormat"])
        known = {k for k, _ in params}
        unsupported = known - {"_outputFormat", "_type", "_since", "_typeFilter", "_deidentify", "_elements", "patient",
                               "includeAssociatedData"}
        if unsupported and ctx.prefer.get("handling") == "strict":
            raise FhirError(400, "not-supported", f"Unsupported parameter(s): {', '.join(sorted(unsupported))}")
        level = ("system" if it.resource_type is None else "group" if it.resource_type == "Group"
                 else "instance" if it.id else "patient")
        principal = ctx.principal
        assert principal is not None
        if level != "instance" and "system" not in principal.scopes.contexts():
            # exports across patients are for backend services; a patient or user app may export
            # one record (Patient/[id]/$export) within its compartment
            raise FhirError(403, "forbidden", "Exports across patients need system/ scopes")
        all_types = svc.types.names()
        requested = [t.strip() for v in _values(ctx, "_type", params) for t in v.split(",") if t.strip()]
        unknown = [t for t in requested if t not in all_types]
        if unknown:
            raise FhirError(400, "not-supported", f"_type: unsupported type(s) {', '.join(unknown)}", ["_type"])
        candidates = requested or [t for t in all_types if t not in PATIENT_TYPES_EXCLUDED]
        if level != "system":
            candidates = [t for t in candidates if t not in PATIENT_TYPES_EXCLUDED]
        permitted = [t for t in candidates if ctx.access.others is not None
                     and ctx.access.others(t, source_of(t).res) is not None]
        provenance_of: list[str] | None = None
        associated = [a.strip() for v in _values(ctx, "includeAssociatedData", params) for a in v.split(",") if a.strip()]
        if any(a != "RelevantProvenanceResources" for a in associated):
            raise FhirError(400, "not-supported", "includeAssociatedData supports RelevantProvenanceResources only",
                            ["includeAssociatedData"])
        if associated and "Provenance" not in permitted:
            # the Provenance of what is exported: with the caller's access to Provenance, and (being
            # in the compartments of their targets) only that of the exported patients' resources
            if ctx.access.others is None or ctx.access.others("Provenance", source_of("Provenance").res) is None:
                raise FhirError(403, "forbidden", "The access token does not permit exporting Provenance")
            provenance_of = list(permitted)  # the Provenance whose targets are of the exported types
            permitted.append("Provenance")
        if requested and len(permitted) < len(set(requested)):
            denied = sorted(set(requested) - set(permitted))
            raise FhirError(403, "forbidden", f"The access token does not permit exporting {', '.join(denied)}")
        if not permitted:
            raise FhirError(403, "forbidden", "The access token permits exporting no resource type")
        since = _one(ctx, "_since", params)
        since_us = None
        if since is not None:
            try:
                since_us = parse_range(since)[0]
            except ValueError:
                raise FhirError(400, "invalid", "_since must be a FHIR instant", ["_since"]) from None
        deidentify = _one(ctx, "_deidentify", params)
        if deidentify not in (None, "safe-harbor"):
            raise FhirError(400, "not-supported", "_deidentify supports only safe-harbor",
                            ["_deidentify"])
        if "HRESCH" in (principal.purpose or []) and not deidentify:
            raise FhirError(403, "forbidden", "Exports for research (HRESCH) must be de-identified "
                                              "(_deidentify=safe-harbor)")
        ctx.plan = {
            "level": level, "patient": it.id if level == "instance" else None, "types": permitted,
            "since_us": since_us, "type_filters": type_filters(svc, _values(ctx, "_typeFilter", params), permitted),
            "deidentify": bool(deidentify),
        }
        if provenance_of is not None:
            ctx.plan["provenance_of"] = provenance_of
        elements = [e.strip() for v in _values(ctx, "_elements", params) for e in v.split(",") if e.strip()]
        if elements:
            ctx.plan["elements"] = elements
        asked = _patients_asked(ctx, params, level)
        if level == "group":
            members = _members(ctx, it.id or "")
            ctx.plan.update(group=it.id, patients=members if asked is None else [p for p in members if p in asked])
        elif asked is not None:  # Patient/$export for these patients only
            ctx.plan["patients"] = asked

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        svc = ctx.services
        spec: dict[str, Any] = ctx.plan_as(dict)  # the job spec (stored as JSON with the job)
        if spec["level"] == "instance":
            ctx.gate.patient(conn, it.id or "")
            ctx.record.patients = [it.id or ""]
        principal = ctx.principal
        assert principal is not None
        if spec["level"] == "group":
            ctx.record.target = f"Group/{it.id}"
        path = "$export" if spec["level"] == "system" else (
            f"Patient/{it.id}/$export" if spec["level"] == "instance" else
            f"Group/{it.id}/$export" if spec["level"] == "group" else "Patient/$export")
        request_url = f"{svc.settings.fhir_base}/{path}" + (f"?{it.query_string}" if it.params else "")
        job_id = jobs.create_job(conn, principal.client_id, request_url, spec, principal_snapshot(principal))
        ctx.record.outcome_desc = f"export job {job_id} accepted: {', '.join(spec['types'])}"
        status_url = f"{svc.settings.fhir_base}/$export-poll-status?{urlencode({'_jobId': job_id})}"
        return Result(202, None, {"Content-Location": status_url})


MEMBER_FILTER = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/member-filter"


def _members(ctx: RequestContext, group_id: str) -> list[str]:
    """The Patient ids a Group lists as current members (not `inactive`, `period` not over),
    read as the caller may read the Group (hidden or absent: 404). The export then applies the
    caller's scopes and each member's Consents to every resource, when the job runs."""
    try:
        stored = ctx.gate.read(ctx.reading(), "Group", group_id, preds=ctx.access.search)
    except StorageError as err:
        raise fhir_error(err) from None
    group = parse_json(stored.body or b"{}")
    filters = [(i, str((e.get("valueExpression") or {}).get("expression") or ""))
               for i, e in enumerate(group.get("modifierExtension") or [])
               if isinstance(e, dict) and e.get("url") == MEMBER_FILTER]
    if filters:
        return _filtered_members(ctx, filters)
    if group.get("actual") is False and group.get("characteristic"):
        # A definitional Group: FHIR leaves how `characteristic` selects patients to each server.
        # Exporting it as empty would be a silent wrong answer; the Bulk Data way is member-filter.
        raise FhirError(422, "not-supported", "This Group is defined by characteristics, which this server does not "
                                              "evaluate; define the cohort with member-filter modifier extensions "
                                              "(FHIR queries) or list its members", ["Group.characteristic"])
    now = now_us()
    members: list[str] = []
    for member in group.get("member") or []:
        ref = str((member.get("entity") or {}).get("reference") or "") if isinstance(member, dict) else ""
        if not ref.startswith("Patient/") or member.get("inactive"):
            continue
        end = (member.get("period") or {}).get("end") if isinstance(member.get("period"), dict) else None
        try:
            if isinstance(end, str) and parse_range(end)[1] < now:
                continue  # the membership ended
        except ValueError:
            pass  # not a date (the Group was validated when written): the member counts
        pid = ref.split("/", 1)[1]
        if pid and pid not in members:
            members.append(pid)
    return members


def _filtered_members(ctx: RequestContext, expressions: list[tuple[int, str]]) -> list[str]:
    """A Group defined by member-filters (Bulk Data's `member-filter` modifier extension, each a
    FHIR query such as `Condition?code=http://snomed.info/sct|44054006`): the patients that meet
    every one, evaluated as searches of the caller's (its scopes, the patients' Consents, the
    cross-border rule) when the export is asked for. Each comes with its index among the Group's
    modifier extensions, which a refusal names."""
    members: set[str] | None = None
    for i, expression in expressions:
        rtype, _sep, query = expression.partition("?")
        where = [f"Group.modifierExtension[{i}]"]
        if rtype not in ctx.services.types.names():
            raise FhirError(400, "invalid", f"A member-filter is a query on a resource type: '{expression[:80]}'", where)
        try:
            found = ctx.gate.matching_patients(ctx.reading(), rtype, parse_qsl(query, keep_blank_values=True))
        except FhirError as err:
            raise FhirError(400, "invalid", f"member-filter '{expression[:80]}': {err}", where) from None
        if found is None:
            raise FhirError(403, "forbidden", f"A member-filter searches {rtype}, which this client may not read", where)
        members = found if members is None else members & found
    return sorted(members or ())


def _own_job(ctx: RequestContext, conn: Connection) -> jobs.Job:
    job_id = _one(ctx, "_jobId") or ""
    job = jobs.get_job(conn, job_id) if 0 < len(job_id) <= 64 else None
    principal = ctx.principal
    assert principal is not None
    # another client's (or another user's) job is indistinguishable from an unknown one
    if job is None or job.client_id != principal.client_id or job.principal.get("fhir_user") != principal.fhir_user:
        raise FhirError(404, "not-found", "Unknown export job")
    if job.status == "cancelled" or (job.expires_us is not None and job.expires_us < now_us()):
        raise FhirError(404, "not-found", "The export job was cancelled or has expired")
    ctx.record.target = f"export/{job.id}"
    return job


class ExportStatus(Handler):
    def read_only(self, ctx: RequestContext) -> bool:
        return ctx.interaction.method == "GET"

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        job = _own_job(ctx, conn)
        svc = ctx.services
        if ctx.interaction.method == "DELETE":
            jobs.cancel(conn, job.id)
            ctx.record.outcome_desc = f"export job {job.id} cancelled; output deleted"
            return Result(202, None)
        if job.status in ("queued", "running"):
            return Result(202, None, {"X-Progress": job.progress or job.status, "Retry-After": "2"})
        if job.status == "failed":
            raise FhirError(500, "exception", job.error or "The export failed")
        files = jobs.files_of(conn, job.id)
        base = svc.settings.fhir_base
        manifest: dict[str, Any] = {
            "transactionTime": instant_text(job.transaction_us),
            "request": job.request,
            "requiresAccessToken": True,
            "output": [{"type": f.type, "url": f"{base}/$export-file?{urlencode({'_jobId': job.id, 'file': f.name})}",
                        "count": f.count} for f in files],
            "deleted": [],
            "error": [],
        }
        if job.spec.get("deidentify"):
            manifest["extension"] = {"deidentified": "safe-harbor"}
        headers = {"Content-Type": "application/json"}
        if job.expires_us:
            from email.utils import formatdate

            headers["Expires"] = formatdate(job.expires_us / 1e6, usegmt=True)
        return Result(200, manifest, headers)


class ExportFile(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        job = _own_job(ctx, conn)
        if job.status != "complete":
            raise FhirError(404, "not-found", "The export is not complete")
        name = _one(ctx, "file") or ""
        data = jobs.read_file(conn, ctx.services.keys, job.id, name) if len(name) <= 128 else None
        if data is None:
            raise FhirError(404, "not-found", "Unknown export file")
        ctx.record.outcome_desc = f"export file {name} of job {job.id} downloaded"
        return Result(200, data, {"Content-Type": "application/fhir+ndjson"})


def type_filters(svc: Services, values: list[str], types: list[str]) -> dict[str, list[list[tuple[str, str]]]]:
    """`_typeFilter=Observation?category=laboratory,...`: per type, alternative queries."""
    out: dict[str, list[list[tuple[str, str]]]] = {}
    for value in values:
        for item in value.split(","):
            rtype, _, query = item.strip().partition("?")
            if rtype not in types or not query:
                raise FhirError(400, "invalid", f"_typeFilter '{item[:80]}' must be Type?query for an exported type",
                                ["_typeFilter"])
            params = parse_qsl(query, keep_blank_values=True)
            parse_search(svc.params, rtype, params, 1, 1, strict=True)  # validated now, compiled when run
            out.setdefault(rtype, []).append(params)
    return out
