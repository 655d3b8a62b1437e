"""Liveness and readiness for load balancers and orchestrators.

`/livez`: the process answers (nothing else is checked, so a slow database never gets a live
process restarted). `/readyz`: this instance can serve -- the database answers, its schema is at
the migrations' head, the master key unwraps the system data keys and the OpenID signing key is
loaded; 503 naming the failed checks otherwise. Neither carries patient data or key material.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from alembic.script import ScriptDirectory
from flask import Flask, Response, jsonify
from sqlalchemy import text

from .db.engine import read_connection
from .db.migrations import alembic_config
from .services import Services

log = logging.getLogger("fhirserver.health")


def _head_revision(settings_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(settings_url)).get_current_head()


def install(app: Flask, svc: Services, signing_key_loaded: Callable[[], bool]) -> None:
    head = _head_revision(svc.settings.effective_database_url)

    def database() -> bool:
        with read_connection(svc.engine) as conn:
            conn.execute(text("SELECT 1")).scalar_one()
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head

    def keys() -> bool:
        return all(svc.keys.ensure(scope) for scope in ("audit", "shared"))

    checks: dict[str, Callable[[], bool]] = {"database": database, "keys": keys, "signing_key": signing_key_loaded}

    @app.get("/livez")
    def livez() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                results[name] = "ok" if check() else "failed"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready; its kind is logged
                log.warning("readiness check %s failed: %s", name, type(exc).__name__)
                results[name] = "failed"
        ready = all(v == "ok" for v in results.values())
        resp = jsonify(status="ready" if ready else "not ready", checks=results)
        resp.status_code = 200 if ready else 503
        resp.headers["Cache-Control"] = "no-store"
        return resp


def db_gauges(svc: Services) -> Callable[[], dict[tuple[str, str, tuple[str, ...]], list[tuple[tuple[str, ...], float]]]]:
    """What /metrics reads from the database at each scrape: the audit log's progress (checkpoint
    age, records still waiting for the sequencer, tree size) and export jobs by state."""
    from sqlalchemy import func, select

    from .clock import now_us
    from .db.schema import access_record, audit_checkpoint, export_job

    def read() -> dict[tuple[str, str, tuple[str, ...]], list[tuple[tuple[str, ...], float]]]:
        with read_connection(svc.engine) as conn:
            last = conn.execute(select(func.max(audit_checkpoint.c.time_us))).scalar()
            pending = conn.execute(select(func.count()).select_from(access_record)
                                   .where(access_record.c.seq.is_(None))).scalar_one()
            top = conn.execute(select(func.max(access_record.c.seq))).scalar()
            jobs: dict[str, int] = {s: n for s, n in conn.execute(
                select(export_job.c.status, func.count()).group_by(export_job.c.status)).all()}
        states = ("queued", "running", "complete", "failed", "cancelled")
        age = (now_us() - last) / 1e6 if last is not None else -1.0
        return {
            ("fhirserver_audit_checkpoint_age_seconds", "Seconds since the newest signed audit checkpoint "
                                                        "(-1: none yet)", ()): [((), age)],
            ("fhirserver_audit_unsequenced_records", "Access records not yet in the Merkle tree", ()):
                [((), float(pending))],
            ("fhirserver_audit_tree_size", "Access records in the Merkle tree", ()):
                [((), float(0 if top is None else top + 1))],
            ("fhirserver_export_jobs", "Bulk export jobs by state", ("state",)):
                [((s,), float(jobs.get(s, 0))) for s in states],
        }

    return read
