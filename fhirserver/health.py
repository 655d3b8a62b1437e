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
