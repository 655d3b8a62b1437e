"""Row visibility inside a request: old versions checked by the database itself, conditional
matches, and what a request touched (for its audit record)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, case, literal, select

from ..db.schema import resource
from ..fhir.errors import FhirError
from ..search.executor import run_search
from ..search.parser import parse_search
from ..storage.codec import parse_json
from ..storage.repository import Head, PreparedWrite, Stored
from ..storage.visibility import patients_of, visible
from .context import Predicates, RequestContext


def patient_or_404(ctx: RequestContext, conn: Connection, pid: str, preds: list[Any]) -> Any:
    """The current Patient `pid` if `preds` let the caller see it (the head row); else 403 when
    the cross-border rule is what hides it, 404 otherwise -- absent or hidden look the same."""
    s = ctx.services
    head = s.repo.current(conn, "Patient", pid)
    if head is None or head.deleted or not visible(conn, head.pk, preds):
        if head is not None and not head.deleted:
            s.consent.explain_hidden(ctx, conn, head.pk, "Patient")
        raise FhirError(404, "not-found", f"Patient/{pid} is not known")
    return head


def refuse_hidden(ctx: RequestContext, conn: Connection, pk: int, rtype: str, what: str) -> FhirError:
    """The read's refusal of a row the caller may not see: raises 403 when the cross-border rule
    is what hides it (the consent stage says why), else returns the 404 for `what` -- the answer
    for an absent resource."""
    ctx.services.consent.explain_hidden(ctx, conn, pk, rtype)
    return FhirError(404, "not-found", f"{what} is not known")


def write_target(ctx: RequestContext, conn: Connection, rtype: str, rid: str, scope: Predicates,
                 lock: bool = False) -> Head | None:
    """The current row a write would change, or None when there is none. A live row the caller
    may not see -- its write scope (`scope`) and its consent read view (labels, denials, the
    cross-border rule) AND-ed -- refuses the write exactly as a read of it is refused."""
    head = ctx.services.repo.current(conn, rtype, rid, lock=lock)
    if head is not None and not head.deleted and not visible(conn, head.pk, [*scope, *ctx.access.consent_read]):
        raise refuse_hidden(ctx, conn, head.pk, rtype, f"{rtype}/{rid}")
    return head


def check_compartments(ctx: RequestContext, conn: Connection, prepared: PreparedWrite) -> None:
    """The written content adds to no patient's record the caller may not see: every patient whose
    compartment it joins lies within the scopes' compartments, and a stored Patient passes the
    caller's consent view of Patients (the cross-border rule included). Otherwise the write is
    refused as reading that Patient is -- 404, or 403 for a refused transfer -- without naming the
    patient. A Patient is not in its own way; the Patients a transaction creates in its other
    entries are not consulted. References to patients not stored here are allowed, as ever (HL7's
    own examples carry them): see docs/consent.md on what update-as-create can tell about ids."""
    wanted = [p for p in prepared.index.patients if not (prepared.type == "Patient" and p == prepared.id)
              and p not in ctx.bundle_patients]
    if not wanted:
        return
    unknown = FhirError(404, "not-found", f"The {prepared.type} belongs to the record of a patient who is not known",
                        [prepared.type])
    confined = ctx.access.patient_ids
    if confined is not None and any(p not in confined for p in wanted):
        raise unknown  # outside the token's compartments, whether that patient is stored or not
    preds = ctx.access.patient_rows
    seen = case((and_(*preds), 1), else_=0) if preds else literal(1)
    for pk, shown in conn.execute(select(resource.c.pk, seen).where(
            resource.c.type == "Patient", resource.c.id.in_(wanted), resource.c.deleted.is_(False))).all():
        if not shown:
            ctx.services.consent.explain_hidden(ctx, conn, pk, "Patient")
            raise unknown


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
        return visible(conn, stored.pk, ctx.access.read)
    finally:
        savepoint.rollback()


def record_touch(ctx: RequestContext, conn: Connection, stored: Stored, patients: list[str] | None = None) -> None:
    """Note the resource (and its patients: given for writes, else looked up) for the audit."""
    ctx.record.resources.append(f"{stored.type}/{stored.id}/_history/{stored.version}")
    ctx.record.patients = patients if patients is not None else patients_of(conn, [stored])


def search_matches(ctx: RequestContext, conn: Connection, rtype: str, query: list[tuple[str, str]],
                   limit: int = 2) -> list[int]:
    """Resource pks matching a conditional-interaction query (visible ones only)."""
    services = ctx.services
    parsed = parse_search(services.params, rtype, query, limit, limit, strict=True)
    if not parsed.clauses:
        raise FhirError(400, "invalid", "A conditional request needs at least one search parameter")
    parsed.total = "none"
    page = run_search(conn, parsed, services.compiler, ctx.access.search,
                      ctx.access_fn)
    return page.pks
