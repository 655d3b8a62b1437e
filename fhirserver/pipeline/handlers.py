"""Execute: one handler per FHIR interaction kind, registered in HANDLERS.

A handler has `prepare(ctx)` (outside the transaction: parse and validate the body, assign ids,
index, fetch data keys) and `execute(ctx, conn)` (inside the request's transaction, which also
writes the AuditEvent). Handlers never check scopes or write audit records themselves: they use
`ctx.access[...]` predicates computed by the authorize and consent stages, and fill
`ctx.record` for the audit stage.
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import ColumnElement, Connection, and_, false, func, or_, select

from ..audit.redact import redact_body
from ..clock import now_us
from ..db.engine import read_connection
from ..db.schema import compartment, idx_date, idx_reference, idx_token, resource
from ..fhir.dates import instant_text, parse_range
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..fhir.structure import check_depth
from ..fhir.subsetting import apply_subsetting
from ..search.query import (
    Include,
    ParsedSearch,
    SearchPage,
    decode_cursor,
    encode_cursor,
    parse_search,
    run_search,
)
from ..storage.codec import DuplicateKeyError, dump_json, fragment, parse_json
from ..storage.repository import PreparedWrite, Stored
from .capability import capability_statement, smart_configuration
from .context import RequestContext, Result

MAX_VERSION = 2**63 - 1  # version numbers are 64-bit integers in the database
BODY_WRAPPING_DEPTH = 6  # Bundle.entry[n].resource / Parameters.parameter[n].resource: 4 levels, and slack
ETAG_RE = re.compile(r'^(?:W/)?"(\d+)"$')


# ---------------------------------------------------------------- helpers
def parse_etag(value: str | None, header: str) -> int | None:
    if value is None:
        return None
    m = ETAG_RE.match(value.strip())
    if not m or int(m.group(1)) > MAX_VERSION:
        raise FhirError(400, "invalid", f"{header} must be an ETag like W/\"3\"")
    return int(m.group(1))


def resource_headers(stored: Stored, base: str) -> dict[str, str]:
    return {
        "ETag": stored.etag,
        "Last-Modified": _http_date(stored.last_updated_us),
        "Content-Location": f"{base}/{stored.type}/{stored.id}/_history/{stored.version}",
    }


def _http_date(us: int) -> str:
    from email.utils import formatdate

    return formatdate(us / 1_000_000, usegmt=True)


def visible(conn: Connection, pk: int, preds: list[ColumnElement[bool]]) -> bool:
    if not preds:
        return True
    return conn.execute(select(resource.c.pk).where(resource.c.pk == pk, *preds)).first() is not None


def patients_of(conn: Connection, pks: list[int]) -> list[str]:
    if not pks:
        return []
    rows = conn.execute(select(compartment.c.patient_id).where(compartment.c.resource_pk.in_(pks)).distinct()).all()
    return sorted({r[0] for r in rows})


def version_visible(ctx: RequestContext, conn: Connection, stored: Stored) -> bool:
    """Would this (possibly older) version pass the read predicates if it were current?

    Evaluated by the database itself: inside a savepoint the resource's index rows are replaced by
    the version's, the same predicates are checked, and the savepoint is rolled back. Access rules
    thus have one implementation (SQL) for current and historical content alike.
    """
    if stored.body is None:
        return True  # a deletion marker reveals no content
    repo = ctx.services.repo
    savepoint = conn.begin_nested()
    try:
        repo.reindex(conn, stored.pk, stored.type, parse_json(stored.body))
        return visible(conn, stored.pk, ctx.access["read"])
    finally:
        savepoint.rollback()


def parse_body(ctx: RequestContext) -> dict[str, Any]:
    ctype = (ctx.header("content-type") or "").split(";")[0].strip().lower()
    if ctype and ctype not in ("application/fhir+json", "application/json", "application/json+fhir", "text/json"):
        if "xml" in ctype:
            raise FhirError(415, "not-supported", "XML request bodies are not supported; send application/fhir+json")
        raise FhirError(415, "not-supported", "Send the resource as application/fhir+json")
    if not ctx.body:
        raise FhirError(400, "structure", "The request body is empty")
    try:
        body = parse_json(ctx.body)
    except DuplicateKeyError as exc:
        raise FhirError(400, "structure", f"The request body repeats a property: {exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FhirError(400, "structure", "The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise FhirError(400, "structure", "The request body must be a JSON object (a FHIR resource)")
    # checked here, before any code walks the body; a Bundle or Parameters wraps resources a few
    # levels down, and each of those is then held to max_json_depth itself by the validator
    wrapping = BODY_WRAPPING_DEPTH if body.get("resourceType") in ("Bundle", "Parameters") else 0
    check_depth(body, ctx.services.settings.max_json_depth + wrapping,
                "The request body" if wrapping else "The resource")
    return body


def validated(ctx: RequestContext) -> dict[str, Any]:
    body = parse_body(ctx)
    rtype = ctx.interaction.resource_type
    ctx.services.validator.validate(body, rtype)
    return body


def output_body(ctx: RequestContext, stored: Stored) -> bytes:
    """The stored JSON as this caller may see it: AuditEvents have the values of other requests'
    queries and details redacted unless the caller is an auditor permitted to see them."""
    assert stored.body is not None
    if stored.type == "AuditEvent" and not (ctx.principal is not None and ctx.principal.sees_audit_values):
        return redact_body(stored.body)
    return stored.body


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


def record_touch(ctx: RequestContext, conn: Connection, stored: Stored, patients: list[str] | None = None) -> None:
    """Note the resource (and its patients: given for writes, else looked up) for the audit."""
    ctx.record.resources.append(f"{stored.type}/{stored.id}/_history/{stored.version}")
    ctx.record.patients = patients if patients is not None else patients_of(conn, [stored.pk])


def search_matches(ctx: RequestContext, conn: Connection, rtype: str, query: list[tuple[str, str]],
                   limit: int = 2) -> list[int]:
    """Resource pks matching a conditional-interaction query (visible ones only)."""
    services = ctx.services
    parsed = parse_search(services.params, rtype, query, limit, limit, strict=True)
    if not parsed.clauses:
        raise FhirError(400, "invalid", "A conditional request needs at least one search parameter")
    parsed.total = "none"
    page = run_search(conn, parsed, services.compiler, ctx.access.get("search-type", ctx.access.get("read", [])),
                      ctx.access_fn)
    return page.pks


# ---------------------------------------------------------------- handlers
class Handler:
    def prepare(self, ctx: RequestContext) -> None:
        return None

    reads_only = False

    def read_only(self, ctx: RequestContext) -> bool:
        """True when execute() only reads: it then runs without the write lock, and only the
        AuditEvent append takes it (briefly)."""
        return self.reads_only

    def expected_audit(self, ctx: RequestContext) -> dict[str, Any] | None:
        """The audit fields execute() will most likely set (None: unknown). The pipeline builds
        and encrypts that AuditEvent before taking the write lock, and uses it if it matched."""
        return None

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        raise NotImplementedError


class Capabilities(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        s = ctx.services
        cs = capability_statement(s.types, s.params, s.settings.fhir_base, s.settings.public_root, _START_DATE,
                                  profiles=s.validator.profiles.urls_by_type())
        return Result(200, cs)


class SmartConfiguration(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        s = ctx.services
        scopes = [f"{c}/{t}.{p}" for c in ("patient", "user", "system") for t in ("*", *s.types.names())
                  for p in ("rs", "cruds", "read", "write")]
        return Result(200, smart_configuration(s.settings.public_root, scopes),
                      {"Content-Type": "application/json"})


class Read(Handler):
    def read_only(self, ctx: RequestContext) -> bool:
        # restricted access probes old versions (vread) in a savepoint; a plain read does not
        return ctx.interaction.kind == "read" or not ctx.access.get("read")

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        assert it.resource_type and it.id
        version = None
        if it.kind == "vread":
            text = it.version or ""
            # this server's version ids are 64-bit integers: any other id names no version
            if not text.isascii() or not text.isdigit() or int(text) > MAX_VERSION:
                raise FhirError(404, "not-found", "Unknown version")
            version = int(text)
        try:
            stored = ctx.services.repo.read(conn, it.resource_type, it.id, version)
        except FhirError as err:
            if err.status == 410:
                head = ctx.services.repo.current(conn, it.resource_type, it.id)
                if head is not None and not visible(conn, head.pk, ctx.access["read"]):
                    raise FhirError(404, "not-found", f"{it.resource_type}/{it.id} is not known") from None
            raise
        if not visible(conn, stored.pk, ctx.access["read"]):
            raise FhirError(404, "not-found", f"{it.resource_type}/{it.id} is not known")
        if version is not None and ctx.access["read"] and not version_visible(ctx, conn, stored):
            raise FhirError(404, "not-found", f"{it.resource_type}/{it.id}/_history/{version} is not known")
        record_touch(ctx, conn, stored)
        headers = resource_headers(stored, ctx.services.settings.fhir_base)
        if_none_match = (ctx.header("if-none-match") or "").strip()
        if if_none_match and (if_none_match == "*" or stored.version in
                              {parse_etag(tag, "If-None-Match") for tag in if_none_match.split(",")}):
            return Result(304, None, headers)
        return Result(200, render_resource(ctx, stored), headers)


class Create(Handler):
    def prepare(self, ctx: RequestContext) -> None:
        body = validated(ctx)
        body.pop("id", None)  # the server assigns ids on create
        ctx.prepared = ctx.services.repo.prepare(ctx.interaction.resource_type or "", body, ctx.assigned_id)

    def expected_audit(self, ctx: RequestContext) -> dict[str, Any] | None:
        if ctx.interaction.conditional:
            return None
        p: PreparedWrite = ctx.prepared
        return {"status": 201, "resources": [f"{p.type}/{p.id}/_history/1"], "patients": list(p.index.patients),
                "outcome_desc": ""}

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        prepared: PreparedWrite = ctx.prepared
        if ctx.interaction.conditional:
            query = parse_qsl(ctx.header("if-none-exist") or "", keep_blank_values=True)
            matches = search_matches(ctx, conn, prepared.type, query)
            if len(matches) > 1:
                raise FhirError(412, "duplicate", "If-None-Exist matched more than one resource")
            if matches:
                existing = ctx.services.repo.load_current(conn, matches)[0]
                record_touch(ctx, conn, existing)
                ctx.record.outcome_desc = "conditional create matched an existing resource"
                return write_result(ctx, existing, 200)
        stored = ctx.services.repo.create(conn, prepared, fresh_id=True)
        if not visible(conn, stored.pk, ctx.access["create"]):
            raise FhirError(403, "forbidden", "The access token does not permit creating this resource "
                                              "(outside the permitted compartment or scope restriction)")
        record_touch(ctx, conn, stored, prepared.index.patients)
        if not visible(conn, stored.pk, ctx.access.get("consent-read", [])):
            ctx.prefer["return"] = "minimal"  # accepted, but consent does not let the writer read it back
        return write_result(ctx, stored, 201)


AMENDMENT_TAG = {"system": "http://fhirserver.dev/CodeSystem/record-origin", "code": "patient-amended",
                 "display": "Amended by the patient or their representative; review against the prior version"}
PATIENT_OWNED = {"Patient", "Consent", "QuestionnaireResponse"}  # the patient's own statements


def flag_patient_amendment(ctx: RequestContext, body: dict[str, Any]) -> None:
    """A patient (or guardian) correcting a clinical record does not silently overwrite the
    clinician's data: the new version carries a `patient-amended` tag, the prior version stays in
    history, and the AuditEvent names the user. Their own demographics, Consents and answers are
    theirs to correct without a flag."""
    principal = ctx.principal
    user = (principal.fhir_user or "") if principal else ""
    if user.startswith(("Patient/", "RelatedPerson/")) and ctx.interaction.resource_type not in PATIENT_OWNED:
        meta = body.setdefault("meta", {})
        tags = [t for t in meta.get("tag", []) if t.get("code") != AMENDMENT_TAG["code"]]
        meta["tag"] = [*tags, dict(AMENDMENT_TAG)]


class Update(Handler):
    def prepare(self, ctx: RequestContext) -> None:
        it = ctx.interaction
        body = validated(ctx)
        flag_patient_amendment(ctx, body)
        rtype = it.resource_type or ""
        if it.conditional:
            with read_connection(ctx.services.engine) as conn:
                matches = search_matches(ctx, conn, rtype, it.params)
            if len(matches) > 1:
                raise FhirError(412, "multiple-matches", "The conditional update matched more than one resource")
            target = None
            if matches:
                with read_connection(ctx.services.engine) as conn:
                    target = conn.execute(select(resource.c.id).where(resource.c.pk == matches[0])).scalar_one()
            if target and body.get("id") not in (None, target):
                raise FhirError(400, "invalid", "Resource id does not match the resource found by the condition",
                                ["id"])
            rid = target or body.get("id") or str(uuid.uuid4())
            ctx.interaction.id = rid
            ctx.prepared = (ctx.services.repo.prepare(rtype, body, rid), matches[:1])
            return
        if "id" not in body:
            raise FhirError(400, "required", "The resource must contain an id matching the URL", [f"{rtype}.id"])
        if body["id"] != it.id:
            raise FhirError(400, "invalid", f"Resource id '{str(body['id'])[:64]}' does not match the URL id '{it.id}'",
                            [f"{rtype}.id"])
        ctx.prepared = (ctx.services.repo.prepare(rtype, body, it.id), None)

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        prepared, expected = ctx.prepared
        repo = ctx.services.repo
        if expected is not None:
            now = search_matches(ctx, conn, prepared.type, ctx.interaction.params)
            if now != expected:
                raise FhirError(412, "conflict", "The resources matching the condition changed; retry")
        head = repo.current(conn, prepared.type, prepared.id)
        if head is not None and not head.deleted and not visible(conn, head.pk, ctx.access["update"]):
            raise FhirError(403, "forbidden", "The access token does not permit updating this resource")
        if (head is None or head.deleted) and "create" not in ctx.access:
            # update-as-create needs create permission too
            raise FhirError(403, "forbidden", "The access token does not permit creating resources of this type")
        if_match = parse_etag(ctx.header("if-match"), "If-Match")
        stored, created = repo.update(conn, prepared, if_match)
        check = ctx.access["create"] if created else ctx.access["update"]
        if not visible(conn, stored.pk, check):
            raise FhirError(403, "forbidden", "The access token does not permit this resource content "
                                              "(outside the permitted compartment or scope restriction)")
        record_touch(ctx, conn, stored, prepared.index.patients)
        if not visible(conn, stored.pk, ctx.access.get("consent-read", [])):
            ctx.prefer["return"] = "minimal"  # accepted, but consent does not let the writer read it back
        return write_result(ctx, stored, 201 if created else 200)


class Delete(Handler):
    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        rtype = it.resource_type or ""
        repo = ctx.services.repo
        if it.conditional:
            matches = search_matches(ctx, conn, rtype, it.params)
            if len(matches) > 1:
                raise FhirError(412, "multiple-matches", "The conditional delete matched more than one resource")
            if not matches:
                return Result(204)
            it.id = conn.execute(select(resource.c.id).where(resource.c.pk == matches[0])).scalar_one()
        assert it.id
        head = repo.current(conn, rtype, it.id)
        if head is not None and not visible(conn, head.pk, ctx.access["delete"]):
            # indistinguishable from deleting something that does not exist (which is a 204)
            ctx.record.outcome_desc = "target not visible to this client: nothing deleted"
            return Result(204)
        stored = repo.delete(conn, rtype, it.id, parse_etag(ctx.header("if-match"), "If-Match"))
        if stored is None:
            return Result(204)
        record_touch(ctx, conn, stored)
        return Result(204, None, {"ETag": stored.etag})


def _history_params(ctx: RequestContext) -> tuple[int, int | None, int | None]:
    params = dict(ctx.interaction.params)
    settings = ctx.services.settings
    try:
        count = min(int(params.get("_count", settings.default_page_size)), settings.history_max_page_size)
    except ValueError:
        raise FhirError(400, "invalid", "_count must be an integer", ["_count"]) from None
    since = None
    if "_since" in params:
        try:
            since = parse_range(params["_since"])[0]
        except ValueError:
            raise FhirError(400, "invalid", "_since must be a FHIR instant", ["_since"]) from None
    cursor = None
    if "_cursor" in params:
        cursor = decode_cursor(params["_cursor"]).pk  # the same cursor format as search, keyed on version pk
    return max(count, 1), since, cursor


class History(Handler):
    def read_only(self, ctx: RequestContext) -> bool:
        return not ctx.access.get("read")  # restricted access probes old versions in a savepoint

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        rtype = it.resource_type or ""
        count, since, cursor = _history_params(ctx)
        repo = ctx.services.repo
        if it.kind == "history-instance":
            head = repo.current(conn, rtype, it.id or "")
            if head is None or not visible(conn, head.pk, ctx.access["read"]):
                raise FhirError(404, "not-found", f"{rtype}/{it.id} is not known")
            rows = repo.history(conn, rtype, head.pk, since, count + 1, cursor)
        else:
            rows = repo.history(conn, rtype, None, since, count + 1, cursor, access=ctx.access["read"])
        page = raw_page = rows[:count]
        if ctx.access["read"]:
            # Restricted access (compartment, granular scope, consent): earlier versions may not
            # have matched; check each against the same predicates.
            page = [(v, st) for v, st in page if version_visible(ctx, conn, st)]
        base = ctx.services.settings.fhir_base
        entries = []
        for _vpk, st in page:
            entry: dict[str, Any] = {"fullUrl": f"{base}/{st.type}/{st.id}"}
            if st.body is not None:
                entry["resource"] = fragment(output_body(ctx, st))
            entry["request"] = {"method": st.method,
                                "url": st.type if st.method == "POST" else f"{st.type}/{st.id}"}
            entry["response"] = {"status": {"POST": "201", "PUT": "200", "DELETE": "204"}.get(st.method, "200"),
                                 "etag": st.etag, "lastModified": instant_text(st.last_updated_us)}
            entries.append(entry)
            ctx.record.resources.append(f"{st.type}/{st.id}/_history/{st.version}")
        ctx.record.patients = patients_of(conn, sorted({st.pk for _v, st in page}))
        path = f"{base}/{rtype}/{it.id}/_history" if it.kind == "history-instance" else f"{base}/{rtype}/_history"
        keep = [(k, v) for k, v in it.params if k != "_cursor"]
        links = [{"relation": "self", "url": path + ("?" + urlencode(it.params) if it.params else "")}]
        if len(rows) > count:
            links.append({"relation": "next", "url": path + "?" + urlencode(keep + [("_cursor", encode_cursor(True, [], raw_page[-1][0]))])})
        bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": instant_text(now_us())},
                  "type": "history", "link": links, "entry": entries}
        return Result(200, dump_json(bundle))


MAX_INCLUDED = 1000


def _include_targets(ctx: RequestContext, conn: Connection, inc: Include, sources: list[Stored]) -> list[int]:
    """pks that one _include / _revinclude adds for `sources`, through the caller's access rules."""
    types = ctx.services.types.names()
    alias = resource.alias()
    if not inc.reverse:
        src = [st.pk for st in sources if st.type == inc.source_type]
        if not src:
            return []
        ref = idx_reference.alias()
        allowed = []
        for t in ([inc.target_type] if inc.target_type else types):
            preds = ctx.access_fn(t, alias) if t in types else None
            if preds is not None:
                allowed.append(and_(alias.c.type == t, *preds))
        if not allowed:
            return []
        stmt = (select(alias.c.pk).join(ref, and_(ref.c.target_type == alias.c.type, ref.c.target_id == alias.c.id))
                .where(ref.c.resource_pk.in_(src), ref.c.param == inc.param, alias.c.deleted.is_(False), or_(*allowed))
                .distinct().limit(MAX_INCLUDED))
    else:
        preds = ctx.access_fn(inc.source_type, alias)
        if preds is None:
            return []
        ref = idx_reference.alias()
        targets = [(st.type, st.id) for st in sources if inc.target_type in (None, st.type)]
        if not targets:
            return []
        by_type: dict[str, list[str]] = {}
        for t, rid in targets:
            by_type.setdefault(t, []).append(rid)
        match = or_(*[and_(ref.c.target_type == t, ref.c.target_id.in_(ids)) for t, ids in by_type.items()])
        stmt = (select(alias.c.pk).join(ref, ref.c.resource_pk == alias.c.pk)
                .where(alias.c.type == inc.source_type, alias.c.deleted.is_(False), ref.c.param == inc.param,
                       match, *preds).distinct().limit(MAX_INCLUDED))
    return [r[0] for r in conn.execute(stmt).all()]


def resolve_includes(ctx: RequestContext, conn: Connection, includes: list[Include], matches: list[Stored]) -> list[Stored]:
    if not includes:
        return []
    seen = {st.pk for st in matches}
    included: list[Stored] = []
    for iterate in (False, True):
        for inc in includes:
            if inc.iterate != iterate:
                continue
            sources = matches + included if iterate else matches
            new = [pk for pk in _include_targets(ctx, conn, inc, sources) if pk not in seen]
            seen.update(new)
            included.extend(ctx.services.repo.load_current(conn, new))
    return included[:MAX_INCLUDED]


def searchset(ctx: RequestContext, conn: Connection, path: str, parsed: ParsedSearch, page: SearchPage,
              included: list[Stored] | None = None, matches: list[Stored] | None = None) -> Result:
    """A searchset Bundle for one page, with self/first/next/previous links; audits what it returns."""
    s = ctx.services
    stored = matches if matches is not None else s.repo.load_current(conn, page.pks)
    included = included or []
    everything = stored + included
    ctx.record.query = ctx.interaction.query_string
    ctx.record.patients = patients_of(conn, [st.pk for st in everything])
    ctx.record.resources = [f"{st.type}/{st.id}/_history/{st.version}" for st in everything]
    base = s.settings.fhir_base
    subset = parsed.summary not in (None, "false") or bool(parsed.elements)
    entries: list[dict[str, Any]] = []
    for mode, group in (("match", stored), ("include", included)):
        for st in group:
            body = output_body(ctx, st)
            res: Any = (apply_subsetting(parse_json(body), parsed.summary, parsed.elements, s.summary_elements)
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


class Search(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        s = ctx.services
        rtype = it.resource_type or ""
        strict = ctx.prefer.get("handling") == "strict"
        parsed = parse_search(s.params, rtype, it.params, s.settings.default_page_size, s.settings.max_page_size, strict)
        page = run_search(conn, parsed, s.compiler, ctx.access["search-type"], ctx.access_fn)
        matches = s.repo.load_current(conn, page.pks)
        included = resolve_includes(ctx, conn, parsed.includes, matches)
        return searchset(ctx, conn, rtype, parsed, page, included, matches)


class Everything(Handler):
    """Patient/[id]/$everything: the patient and everything in its compartment the caller may see.
    Paged like a search (keyset over pk); `_since`, `_type`, `_count`."""

    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        s = ctx.services
        pid = it.id or ""
        head = s.repo.current(conn, "Patient", pid)
        if head is None or head.deleted or not visible(conn, head.pk, ctx.access["search-type"]):
            raise FhirError(404, "not-found", f"Patient/{pid} is not known")
        params = [(k, v) for k, v in it.params if k in ("_count", "_cursor", "_since", "_type", "_summary", "_elements")]
        types = s.types.names()
        wanted = types
        extra: list[Any] = []
        passthrough = []
        for k, v in params:
            if k == "_type":
                wanted = [t.strip() for t in v.split(",") if t.strip()]
                unknown = [t for t in wanted if t not in types]
                if unknown:
                    raise FhirError(400, "not-supported", f"_type: unsupported type(s) {', '.join(unknown)}", ["_type"])
            elif k == "_since":
                try:
                    extra.append(resource.c.last_updated_us >= parse_range(v)[0])
                except ValueError:
                    raise FhirError(400, "invalid", "_since must be a FHIR instant", ["_since"]) from None
            else:
                passthrough.append((k, v))
        allowed = []
        for t in wanted:
            if t == "AuditEvent":
                continue  # the audit trail about a patient is not part of their record
            preds = ctx.access_fn(t, resource)
            if preds is not None:
                allowed.append(and_(resource.c.type == t, *preds))
        comp = compartment.alias()
        member = or_(and_(resource.c.type == "Patient", resource.c.id == pid),
                     resource.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id == pid)))
        extra.extend([member, or_(*allowed) if allowed else false()])
        parsed = parse_search(s.params, "*", passthrough, s.settings.default_page_size, s.settings.max_page_size, False)
        parsed.echo += [(k, v) for k, v in params if k in ("_type", "_since")]
        page = run_search(conn, parsed, s.compiler, [], ctx.access_fn, extra)
        return searchset(ctx, conn, f"Patient/{pid}/$everything", parsed, page)


class LastN(Handler):
    reads_only = True

    """Observation/$lastn: the most recent `max` Observations per code among those matching the
    search parameters (patient, category, code, ...), newest first within each code."""

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        s = ctx.services
        params = [(k, v) for k, v in it.params if k != "max"]
        try:
            max_n = int(dict(it.params).get("max", "1"))
        except ValueError:
            raise FhirError(400, "invalid", "max must be a positive integer", ["max"]) from None
        if max_n < 1:
            raise FhirError(400, "invalid", "max must be a positive integer", ["max"])
        max_n = min(max_n, s.settings.max_page_size)  # more per code could never fit in one page
        strict = ctx.prefer.get("handling") == "strict"
        parsed = parse_search(s.params, "Observation", params, s.settings.max_page_size, s.settings.max_page_size, strict)
        r = resource.alias()
        access = ctx.access_fn("Observation", r)
        conds = [r.c.type == "Observation", r.c.deleted.is_(False), *s.compiler.where(parsed, r, ctx.access_fn),
                 *(access if access is not None else [false()])]
        tok, dat = idx_token.alias(), idx_date.alias()
        code_key = (select(func.min(func.coalesce(tok.c.system, "") + "|" + tok.c.code))
                    .where(tok.c.resource_pk == r.c.pk, tok.c.param == "code").scalar_subquery())
        when = (select(func.max(dat.c.high_us)).where(dat.c.resource_pk == r.c.pk, dat.c.param == "date")
                .scalar_subquery())
        ranked = (select(r.c.pk.label("pk"), code_key.label("code_key"), when.label("when"),
                         func.row_number().over(partition_by=code_key,
                                                order_by=(func.coalesce(when, -(2**62)).desc(), r.c.pk.desc()))
                         .label("rn"))
                  .where(*conds).subquery())
        rows = conn.execute(select(ranked.c.pk).where(ranked.c.rn <= max_n)
                            .order_by(ranked.c.code_key, ranked.c.rn).limit(s.settings.max_page_size)).all()
        pks = [row[0] for row in rows]
        parsed.echo.append(("max", str(max_n)))
        page = SearchPage(pks, len(pks), None, None)
        return searchset(ctx, conn, "Observation/$lastn", parsed, page)


_START_DATE = instant_text(now_us())[:10]

HANDLERS: dict[str, Handler] = {
    "capabilities": Capabilities(),
    "smart-configuration": SmartConfiguration(),
    "read": Read(),
    "vread": Read(),
    "create": Create(),
    "update": Update(),
    "delete": Delete(),
    "history-instance": History(),
    "history-type": History(),
    "search-type": Search(),
    "$everything": Everything(),
    "$lastn": LastN(),
}
