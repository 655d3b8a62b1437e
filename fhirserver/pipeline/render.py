"""Writing a response: resource headers, the body a caller may see, and searchset Bundles."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy import Connection

from ..audit.projection import project
from ..audit.redact import redact_body
from ..clock import now_us
from ..fhir.dates import instant_text
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..fhir.subsetting import apply_subsetting
from ..search.model import ParsedSearch, SearchPage
from ..storage.codec import dump_json, fragment, parse_json
from ..storage.repository import Stored
from .context import RequestContext, Result


def resource_headers(stored: Stored, base: str) -> dict[str, str]:
    return {
        "ETag": stored.etag,
        "Last-Modified": _http_date(stored.last_updated_us),
        "Content-Location": f"{base}/{stored.type}/{stored.id}/_history/{stored.version}",
    }


def _http_date(us: int) -> str:
    from email.utils import formatdate

    return formatdate(us / 1_000_000, usegmt=True)


OWN_READER_DETAILS = frozenset({"break-glass-reason"})


def output_body(ctx: RequestContext, stored: Stored, conn: Connection | None = None) -> bytes:
    """The stored JSON as this caller may see it: AuditEvents have the values of other requests'
    queries and details redacted unless the caller is an auditor permitted to see them, and a
    patient (or guardian) sees the per-patient projection of each (audit/projection.py)."""
    assert stored.body is not None
    if stored.type != "AuditEvent":
        return stored.body
    principal = ctx.principal
    decision = getattr(principal, "consent", None) if principal is not None else None
    own = principal is not None and principal.reads_own_records and decision is not None and bool(decision.own_patients)
    if principal is not None and principal.sees_audit_values:
        body = stored.body
    else:  # a patient is told why someone broke the glass on their record; other values stay redacted
        body = redact_body(stored.body, OWN_READER_DETAILS if own else frozenset())
    if own and decision is not None:
        gate = ctx.gate
        if conn is not None:  # the request's own connection (a searchset renders many events)
            event = project(parse_json(body), decision.own_patients, lambda refs: gate.compartments_of(conn, refs))
        else:
            own_conn = ctx.reading()
            event = project(parse_json(body), decision.own_patients, lambda refs: gate.compartments_of(own_conn, refs))
        body = dump_json(event)
    return body


def render_resource(ctx: RequestContext, stored: Stored) -> bytes | dict[str, Any]:
    params = dict(ctx.interaction.params)
    summary, elements = params.get("_summary"), params.get("_elements")
    body = output_body(ctx, stored)
    if summary not in (None, "false") or elements:
        if summary not in (None, "true", "false", "text", "data"):
            raise FhirError(400, "invalid", "_summary must be true, false, text or data")
        return apply_subsetting(parse_json(body), summary,
                                elements.split(",") if elements else None, ctx.services.summary_elements)
    return body


def write_result(ctx: RequestContext, stored: Stored, status: int) -> Result:
    base = ctx.services.settings.fhir_base
    headers = resource_headers(stored, base)
    if status == 201:
        headers["Location"] = f"{base}/{stored.type}/{stored.id}/_history/{stored.version}"
    pref = ctx.prefer.get("return", "representation")
    if pref == "minimal":
        return Result(status, None, headers)
    if pref == "OperationOutcome":
        outcome = operation_outcome([Issue("informational", f"{stored.type}/{stored.id} version {stored.version} "
                                                            f"{'created' if status == 201 else 'updated'}",
                                           severity="information")])
        return Result(status, outcome, headers)
    assert stored.body is not None
    return Result(status, stored.body, headers)


def searchset(ctx: RequestContext, conn: Connection, path: str, parsed: ParsedSearch, page: SearchPage,
              stored: list[Stored], included: list[Stored] | None = None) -> Result:
    """A searchset Bundle for one page (its rows, as the access gate returned them), with
    self/first/next/previous links; audits what it returns."""
    s = ctx.services
    included = included or []
    everything = stored + included
    ctx.record.query = ctx.interaction.query_string
    ctx.capture.disclosed(everything)
    base = s.settings.fhir_base
    subset = parsed.summary not in (None, "false") or bool(parsed.elements)
    entries: list[dict[str, Any]] = []
    for mode, group in (("match", stored), ("include", included)):
        for st in group:
            body = output_body(ctx, st, conn)
            res: dict[str, Any] | orjson.Fragment = (apply_subsetting(parse_json(body), parsed.summary, parsed.elements, s.summary_elements)
                        if subset and mode == "match" else fragment(body))
            entries.append({"fullUrl": f"{base}/{st.type}/{st.id}", "resource": res, "search": {"mode": mode}})
    if parsed.ignored:
        outcome = operation_outcome([Issue("not-supported", m, severity="warning") for m in parsed.ignored])
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})

    def link(cursor: str | None) -> str:
        query = urlencode(parsed.echo + ([("_cursor", cursor)] if cursor else []))
        return f"{base}/{path}" + (f"?{query}" if query else "")

    current = dict(ctx.interaction.params).get("_cursor")
    links = [{"relation": "self", "url": link(current)}, {"relation": "first", "url": link(None)}]
    if page.next_cursor:
        links.append({"relation": "next", "url": link(page.next_cursor)})
    if page.prev_cursor:
        links.append({"relation": "previous", "url": link(page.prev_cursor)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                              "meta": {"lastUpdated": instant_text(now_us())}, "type": "searchset"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    bundle["entry"] = entries
    return Result(200, dump_json(bundle))
