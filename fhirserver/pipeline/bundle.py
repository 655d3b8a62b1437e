"""Batch and transaction Bundles (`POST [base]`).

Each entry becomes a request of its own that goes through the same stages as any other
(`Pipeline.prepare_entry`: scopes, compartment, consent checks, validation, encryption;
`Pipeline.execute_entry`: execution and its own AuditEvent), all inside the Bundle's one
database transaction.

- transaction: all or nothing. `urn:uuid:` (and absolute) fullUrls of created entries get their server ids
  before anything is prepared, and every reference to them is rewritten; entries run in FHIR's
  order (DELETE, POST, PUT/PATCH, GET); the first failing entry fails the whole Bundle with its
  status (e.g. 403 for a denied entry), and nothing is stored.
- batch: entries are independent; each runs in a savepoint and answers with its own status and
  OperationOutcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import Connection

from ..audit.events import AuditRecord
from ..clock import now_us
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..fhir.interaction import parse_interaction
from ..fhir.references import CONDITIONAL, conditional_references, rewrite_references, unresolved_urns
from ..storage.codec import dump_json, parse_json
from ..storage.repository import new_id
from .context import RequestContext, Result
from .handler import Handler
from .request_body import parse_body

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
INTERACTION = "http://hl7.org/fhir/restful-interaction"


class Entry:
    def __init__(self, index: int, raw: dict[str, Any]) -> None:
        self.index = index
        self.raw = raw
        request: dict[str, Any] = raw["request"] if isinstance(raw.get("request"), dict) else {}
        self.method = str(request.get("method", "")).upper()
        self.url = str(request.get("url", ""))
        self.request = request
        self.ctx: RequestContext | None = None
        self.handler: Handler | None = None
        self.error: FhirError | None = None
        self.result: Result | None = None

    def where(self) -> str:
        return f"entry {self.index} ({self.method} {self.url[:80]})"


@dataclass(frozen=True)
class _Plan:
    kind: str  # batch | transaction
    entries: list[Entry]  # each prepared (or failed, in a batch) before the transaction
    resolved: dict[str, list[tuple[int, str]]]  # conditional reference -> its one match (pk, id)


class BundleHandler(Handler):
    def prepare(self, ctx: RequestContext) -> None:
        body = parse_body(ctx)
        if body.get("resourceType") != "Bundle" or body.get("type") not in ("batch", "transaction"):
            raise FhirError(400, "invalid", "POST to the base URL takes a Bundle of type batch or transaction")
        kind = body["type"]
        ctx.record.subtype_code = (INTERACTION, kind, kind)
        raw_entries = body.get("entry", [])
        if not isinstance(raw_entries, list) or not all(isinstance(e, dict) for e in raw_entries):
            raise FhirError(400, "structure", "Bundle.entry must be a list of objects", ["Bundle.entry"])
        limit = ctx.services.settings.bundle_max_entries
        if len(raw_entries) > limit:
            raise FhirError(413, "too-costly", f"A Bundle may have at most {limit} entries")
        entries = [Entry(i, e) for i, e in enumerate(raw_entries)]
        for e in entries:
            if e.method not in ORDER or not e.url:
                raise FhirError(400, "invalid", f"{e.where()}: request.method and request.url are required",
                                [f"Bundle.entry[{e.index}].request"])
        mapping: dict[str, str] = {}
        assigned: dict[int, str] = {}
        if kind == "transaction":
            seen: set[str] = set()
            for e in entries:
                full = e.raw.get("fullUrl")
                if isinstance(full, str):
                    if full in seen:
                        raise FhirError(400, "invalid", f"{e.where()}: fullUrl {full[:80]} appears twice")
                    seen.add(full)
                if e.method == "POST" and isinstance(full, str) and full.startswith("urn:uuid:"):
                    assigned[e.index] = new_id()
                    rtype = urlsplit(e.url).path.strip("/")
                    mapping[full] = f"{rtype}/{assigned[e.index]}"
                elif e.method == "POST" and isinstance(full, str) and full.startswith(("http://", "https://")):
                    # an absolute fullUrl (.../Patient/a2, HL7's XDS example): references to it, full or
                    # in the relative form Patient/a2, name the resource this entry creates
                    rtype = urlsplit(e.url).path.strip("/")
                    tail = "/".join(urlsplit(full).path.rstrip("/").split("/")[-2:])
                    if tail.split("/")[0] == rtype:
                        assigned[e.index] = new_id()
                        mapping[full] = mapping[tail] = f"{rtype}/{assigned[e.index]}"
            for e in entries:
                dangling = unresolved_urns(e.raw.get("resource"), mapping)
                if dangling:
                    raise FhirError(400, "invalid", f"{e.where()}: the reference {dangling[0][:80]} names no entry "
                                                    "created in this transaction (no POST entry has it as fullUrl)",
                                    [f"Bundle.entry[{e.index}].resource"])
        resolved = self._conditional_references(ctx, kind, entries, mapping)
        # the Patients this transaction writes (POST with an assigned id, PUT by id): entries of
        # theirs count as present for the others' compartment check, whatever the entry order
        creates = frozenset(
            assigned[e.index] if e.method == "POST" else urlsplit(e.url).path.strip("/").split("/")[1]
            for e in entries if kind == "transaction" and urlsplit(e.url).path.strip("/").split("/")[0] == "Patient"
            and ((e.method == "POST" and e.index in assigned)
                 or (e.method == "PUT" and len(urlsplit(e.url).path.strip("/").split("/")) == 2)))
        for e in entries:
            if e.error is not None:
                continue  # a batch entry whose conditional reference did not resolve
            try:
                e.ctx = self._entry_context(ctx, e, mapping, assigned.get(e.index))
                e.ctx.bundle_patients = creates
                e.handler = ctx.runner.prepare_entry(e.ctx)
            except FhirError as err:
                if kind == "transaction":
                    raise _entry_error(e, err) from None
                e.error = err
        ctx.plan = _Plan(kind, entries, resolved)
        ctx.record.outcome_desc = f"{kind} of {len(entries)} entries"

    def _conditional_references(self, ctx: RequestContext, kind: str, entries: list[Entry],
                                mapping: dict[str, str]) -> dict[str, list[tuple[int, str]]]:
        """Resolve each conditional reference (`Patient?identifier=sys|val`) of the entries'
        resources by a search as the caller (their search access to the target type): exactly
        one match becomes a plain reference (added to `mapping`); none or several is a 412 for
        the entry -- the whole transaction, or that batch entry. Returns each reference's match,
        re-checked inside the transaction (`execute`)."""
        found: dict[str, list[tuple[int, str]]] = {}
        types = ctx.services.types.names()
        for e in entries:
            for ref in conditional_references(e.raw.get("resource")):
                try:
                    if ref not in found:
                        match = CONDITIONAL.match(ref)
                        assert match is not None
                        rtype, query = match.group(1), parse_qsl(match.group(2), keep_blank_values=True)
                        if rtype not in types:
                            raise FhirError(400, "not-supported", f"The conditional reference {ref[:80]} names an "
                                                                  "unknown resource type")
                        found[ref] = ctx.gate.referenced(ctx.reading(), rtype, query)
                    matches = found[ref]
                    if len(matches) != 1:
                        raise FhirError(412, "not-found" if not matches else "multiple-matches",
                                        f"The conditional reference {ref[:80]} matched "
                                        f"{'no resource' if not matches else 'more than one resource'}")
                    mapping[ref] = f"{ref.split('?', 1)[0]}/{matches[0][1]}"
                except FhirError as err:
                    if kind == "transaction":
                        raise _entry_error(e, err) from None
                    e.error = err
                    break
        return {ref: m for ref, m in found.items() if len(m) == 1}

    def _entry_context(self, ctx: RequestContext, e: Entry, mapping: dict[str, str],
                       assigned_id: str | None) -> RequestContext:
        parts = urlsplit(e.url)
        path = parts.path
        base = ctx.services.settings.fhir_base
        if path.startswith(base):
            path = path[len(base):]
        headers = {k: v for k, v in ctx.headers.items() if k not in ("if-match", "if-none-match", "if-none-exist",
                                                                        "content-type", "prefer")}
        for field, header in (("ifMatch", "if-match"), ("ifNoneMatch", "if-none-match"),
                              ("ifNoneExist", "if-none-exist"), ("ifModifiedSince", "if-modified-since")):
            if isinstance(e.request.get(field), str):
                headers[header] = e.request[field]
        body = b""
        if e.method in ("POST", "PUT", "PATCH"):
            res = e.raw.get("resource")
            if not isinstance(res, dict):
                raise FhirError(400, "required", f"{e.where()}: a resource is required",
                                [f"Bundle.entry[{e.index}].resource"])
            body = dump_json(rewrite_references(res, mapping))
            headers["content-type"] = "application/fhir+json"
        rec = AuditRecord(interaction="unknown", request_id=ctx.record.request_id, network_address=ctx.record.network_address,
                          recorded_us=now_us(), client_id=ctx.record.client_id, client_name=ctx.record.client_name,
                          user=ctx.record.user)
        sub = RequestContext(ctx.services, ctx.interaction, rec, headers, body, principal=ctx.principal,
                             prefer=dict(ctx.prefer), pipeline=ctx.pipeline, assigned_id=assigned_id,
                             snapshot=ctx.snapshot)
        sub.interaction = parse_interaction(e.method, path, _rewrite_query(parts.query, mapping), None,
                                            ctx.services.types, "if-none-exist" in headers)
        if sub.interaction.kind == "bundle":
            raise FhirError(400, "not-supported", f"{e.where()}: Bundles cannot be nested")
        rec.interaction = sub.interaction.kind
        rec.resource_type = sub.interaction.resource_type
        if sub.interaction.id:
            rec.target = f"{sub.interaction.resource_type}/{sub.interaction.id}"
        return sub

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        plan = ctx.plan_as(_Plan)
        kind, entries = plan.kind, plan.entries
        pipeline = ctx.runner
        # a transaction's conditional references still have their one match inside the transaction
        # (a batch keeps what its entries resolved to on the request's snapshot)
        for ref, expected in plan.resolved.items() if kind == "transaction" else ():
            rtype, _sep, query = ref.partition("?")
            if ctx.gate.referenced(conn, rtype, parse_qsl(query, keep_blank_values=True)) != expected:
                raise FhirError(412, "conflict", f"The resources matching the conditional reference {ref[:80]} "
                                                 "changed while the Bundle was processed; retry")
        if kind == "transaction":
            for e in sorted(entries, key=lambda x: (ORDER[x.method], x.index)):
                assert e.ctx is not None and e.handler is not None
                try:
                    e.result = pipeline.execute_entry(e.ctx, e.handler, conn)
                except FhirError as err:
                    raise _entry_error(e, err) from None
        else:
            for e in entries:
                if e.error is not None:
                    if e.ctx is not None:
                        pipeline.audit_entry_failure(e.ctx, conn, e.error.status, e.error.issues)
                    continue
                assert e.ctx is not None and e.handler is not None
                savepoint = conn.begin_nested()
                try:
                    e.result = pipeline.execute_entry(e.ctx, e.handler, conn)
                    savepoint.commit()
                except FhirError as err:
                    savepoint.rollback()
                    e.error = err
                    pipeline.audit_entry_failure(e.ctx, conn, err.status, err.issues)
        failed = sum(1 for e in entries if e.error is not None)
        ctx.record.outcome_desc = f"{kind} of {len(entries)} entries" + (f", {failed} failed" if failed else "")
        return Result(200, {"resourceType": "Bundle", "type": f"{kind}-response",
                            "entry": [_response_entry(ctx, e) for e in entries]})


def _rewrite_query(query: str, mapping: dict[str, str]) -> str:
    for urn, ref in mapping.items():
        query = query.replace(urn, ref)
    return query


def _entry_error(e: Entry, err: FhirError) -> FhirError:
    """The Bundle fails with the entry's status; the issues say which entry (expressions point
    into the Bundle)."""
    issues = [Issue(i.code, f"{e.where()}: {i.diagnostics}", i.severity,
                    [f"Bundle.entry[{e.index}].resource.{x}" if not x.startswith("Bundle") else x for x in i.expression])
              for i in err.issues]
    return FhirError(err.status, issues[0].code, issues[0].diagnostics, issues=issues)


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _response_entry(ctx: RequestContext, e: Entry) -> dict[str, Any]:
    if e.error is not None:
        return {"response": {"status": _status_line(e.error.status),
                             "outcome": operation_outcome(e.error.issues, ctx.record.request_id)}}
    assert e.result is not None
    headers = e.result.headers
    response: dict[str, Any] = {"status": _status_line(e.result.status)}
    for header, key in (("Location", "location"), ("ETag", "etag"), ("Last-Modified", "lastModified")):
        if headers.get(header):
            response[key] = headers[header]
    if "lastModified" in response:
        from email.utils import parsedate_to_datetime

        response["lastModified"] = parsedate_to_datetime(response["lastModified"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    out: dict[str, Any] = {"response": response}
    body = e.result.body
    if isinstance(body, (bytes, bytearray)):
        body = parse_json(bytes(body))
    if isinstance(body, dict):
        if body.get("resourceType") == "OperationOutcome":
            response["outcome"] = body
        else:
            out["resource"] = body
            if body.get("resourceType") and body.get("id"):
                out["fullUrl"] = f"{ctx.services.settings.fhir_base}/{body['resourceType']}/{body['id']}"
    return out
