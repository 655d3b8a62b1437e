"""/livez and /readyz (issue "Production at scale", operations): ready only when the database
answers at the migrations' head and the keys are loaded; 503 naming the failed check otherwise,
while the process stays live."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fhirserver.smart.secrets_store import SIGNING_KEY_FILE
from tests.conftest import db_path, make_settings
from tests.support.apps import fresh_app


def ready(http: Any) -> tuple[int, dict[str, Any]]:
    resp = http.get("/readyz")
    assert resp.headers["Cache-Control"] == "no-store"
    return resp.status_code, resp.get_json()


def test_ready_when_everything_is_in_place(http: Any) -> None:
    assert http.get("/livez").get_json() == {"status": "ok"}
    status, body = ready(http)
    assert status == 200 and body == {"status": "ready", "checks": {"database": "ok", "keys": "ok",
                                                                     "signing_key": "ok"}}


def test_not_ready_when_the_schema_is_not_at_head(http: Any, settings: Any) -> None:
    with sqlite3.connect(db_path(settings)) as db:
        db.execute("UPDATE alembic_version SET version_num = '0001'")
    status, body = ready(http)
    assert status == 503 and body["checks"]["database"] == "failed" and body["checks"]["keys"] == "ok"
    assert http.get("/livez").status_code == 200


def test_not_ready_without_the_signing_key(http: Any, settings: Any) -> None:
    (settings.data_dir / SIGNING_KEY_FILE).unlink()
    status, body = ready(http)
    assert status == 503 and body["checks"]["signing_key"] == "failed"


@pytest.mark.postgres
def test_not_ready_with_the_database_down(postgres: Any, tmp_path: Path) -> None:
    import psycopg

    name = "readyz_down"
    settings = make_settings(tmp_path, postgres.create_database(name))
    app = fresh_app(settings, bulk_worker=False)
    http = app.test_client()
    try:
        assert ready(http)[0] == 200
        with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        status, body = ready(http)
        assert status == 503 and body["checks"]["database"] == "failed"
        assert http.get("/livez").status_code == 200
    finally:
        app.extensions["fhirserver"].engine.dispose()
