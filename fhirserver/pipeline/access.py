"""Row visibility inside a request: old versions checked by the database itself, conditional
matches, and what a request touched (for its audit record)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from ..fhir.errors import FhirError
from ..search.executor import run_search
from ..search.parser import parse_search
from ..storage.codec import parse_json
from ..storage.repository import Stored
from ..storage.visibility import patients_of, visible
from .context import RequestContext


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
