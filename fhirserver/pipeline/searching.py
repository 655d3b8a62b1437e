"""Search and the search-like operations: type search, Patient/$everything, Observation/$lastn."""

from __future__ import annotations

from sqlalchemy import Connection

from ..fhir.dates import parse_range
from ..fhir.errors import FhirError
from ..search.model import ParsedSearch, SearchPage
from ..search.parser import parse_search
from .context import RequestContext, Result
from .handler import Handler
from .render import searchset


class Search(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        s = ctx.services
        rtype = it.resource_type or ""
        strict = ctx.prefer.get("handling") == "strict"
        parsed = parse_search(s.params, rtype, it.params, s.settings.default_page_size, s.settings.max_page_size, strict)
        if rtype == "AuditEvent":
            check_own_audit_query(ctx, parsed)
        page, matches = ctx.gate.search(conn, parsed)
        included = ctx.gate.includes(conn, parsed.includes, matches)
        return searchset(ctx, conn, rtype, parsed, page, matches, included)


OWN_AUDIT_PARAMS = frozenset({"date", "action", "outcome", "type", "subtype", "agent", "patient", "_lastUpdated"})


def check_own_audit_query(ctx: RequestContext, parsed: ParsedSearch) -> None:
    """A patient (or guardian) searching the AuditEvents about them sees each event's per-patient
    projection; the search itself must not probe what the projection hides (whether another
    patient, or another patient's resource, was part of an access). So it may name only its own
    patients and accessors that are not other patients, and no chains, `_has` or includes."""
    principal = ctx.principal
    decision = getattr(principal, "consent", None)
    if principal is None or not principal.reads_own_records or decision is None:
        return
    own = set(decision.own_patients)
    if parsed.includes:
        raise FhirError(400, "not-supported", "_include/_revinclude are not available on your own audit trail")
    for clause in parsed.clauses:
        if clause.code not in OWN_AUDIT_PARAMS or clause.chain or clause.has:
            raise FhirError(400, "not-supported", f"'{clause.code}' is not available on your own audit trail; "
                                                  f"use {', '.join(sorted(OWN_AUDIT_PARAMS))}", [clause.code])
        for value in clause.values if clause.code in ("patient", "agent") else []:
            rtype, _s, rid = value.rpartition("/")
            if clause.code == "patient" and rid not in own or \
                    clause.code == "agent" and rtype.endswith(("Patient", "RelatedPerson")) and rid not in own and \
                    f"{rtype.rsplit('/', 1)[-1]}/{rid}" != principal.fhir_user:
                raise FhirError(403, "forbidden", "You may search only the accesses to your own records",
                                [clause.code])


class Everything(Handler):
    """Patient/[id]/$everything: the patient and everything in its compartment the caller may see.
    Paged like a search (keyset over pk); `_since`, `_type`, `_count`."""

    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        it = ctx.interaction
        s = ctx.services
        pid = it.id or ""
        ctx.gate.patient(conn, pid)
        known = ("_count", "_cursor", "_since", "_type", "_summary", "_elements", "_format", "_pretty")
        unknown = sorted({k for k, _v in it.params if k not in known})
        if unknown and ctx.prefer.get("handling") == "strict":
            raise FhirError(400, "not-supported", f"$everything does not support: {', '.join(unknown)[:200]}", unknown)
        params = [(k, v) for k, v in it.params if k in known[:6]]
        types = s.types.names()
        wanted = types
        since_us = None
        passthrough = []
        for k, v in params:
            if k == "_type":
                wanted = [t.strip() for t in v.split(",") if t.strip()]
                unknown = [t for t in wanted if t not in types]
                if unknown:
                    raise FhirError(400, "not-supported", f"_type: unsupported type(s) {', '.join(unknown)}", ["_type"])
            elif k == "_since":
                try:
                    since_us = parse_range(v)[0]
                except ValueError:
                    raise FhirError(400, "invalid", "_since must be a FHIR instant", ["_since"]) from None
            else:
                passthrough.append((k, v))
        parsed = parse_search(s.params, "*", passthrough, s.settings.default_page_size, s.settings.max_page_size, False)
        parsed.echo += [(k, v) for k, v in params if k in ("_type", "_since")]
        page, rows = ctx.gate.everything(conn, pid, parsed, wanted, since_us)
        return searchset(ctx, conn, f"Patient/{pid}/$everything", parsed, page, rows)


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
        rows = ctx.gate.lastn(conn, parsed, max_n, s.settings.max_page_size)
        parsed.echo.append(("max", str(max_n)))
        page = SearchPage([st.pk for st in rows], len(rows), None, None)
        return searchset(ctx, conn, "Observation/$lastn", parsed, page, rows)
