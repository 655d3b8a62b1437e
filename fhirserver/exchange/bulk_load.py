"""Bulk loading through the same validation, indexing and encryption as the REST API, in
batched transactions (one AuditEvent per batch). Used by benchmarks and imports."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine

from ..audit.events import AuditRecord
from ..clock import now_us
from ..services import Services


def load_resources(svc: Services, resources: Iterable[dict[str, Any]], batch: int = 500,
                   source: str = "bulk load", validate: bool = True) -> int:
    """Store resources (client ids kept when present). Returns how many were stored."""
    count = 0
    pending: list[Any] = []

    def flush() -> None:
        nonlocal count
        if not pending:
            return
        rec = AuditRecord(interaction="create", request_id="bulk-load", network_address="localhost",
                          recorded_us=now_us(), status=201)
        rec.subtype_code = ("http://hl7.org/fhir/restful-interaction", "create", source)
        patients: set[str] = set()
        with svc.engine.begin() as conn:
            for prepared in pending:
                if prepared.body.get("id") and svc.repo.current(conn, prepared.type, prepared.id) is not None:
                    svc.repo.update(conn, prepared)
                else:
                    svc.repo.create(conn, prepared, fresh_id=True)
                patients.update(prepared.index.patients)
            rec.outcome_desc = f"{source}: {len(pending)} resources"
            rec.patients = sorted(patients)
            svc.audit.append(conn, rec)
        count += len(pending)
        pending.clear()

    for res in resources:
        if validate:
            svc.validator.validate(res, res.get("resourceType"))
        pending.append(svc.repo.prepare(res["resourceType"], res, res.get("id")))
        if len(pending) >= batch:
            flush()
    flush()
    analyze(svc.engine)
    return count


def analyze(engine: Engine) -> None:
    """Refresh planner statistics after bulk changes: without them PostgreSQL plans chained and
    _has searches over freshly loaded data as nested loops over estimated single rows."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA analysis_limit=1000")
        conn.exec_driver_sql("ANALYZE")
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA analysis_limit=0")  # pooled connection: later ANALYZEs stay exact
