"""Shared fixtures: a real server app per test (SQLite file, or a throwaway PostgreSQL), real
backend clients with generated keys, and real tokens from the /auth/token endpoint."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from fhirserver.config import Settings, load_settings
from tests.support.apps import fresh_app

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO.parent / "shared" / "fhir-examples"
BASE = "http://testserver/fhir"
_counter = itertools.count()


def example_files(prefix: str = "") -> list[Path]:
    if not EXAMPLES.is_dir():
        return []
    return sorted(p for p in EXAMPLES.glob(f"{prefix}*.json") if p.name != "SOURCES.md")


def load_example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    if os.environ.get("FHIRSERVER_TEST_SKIP_PG") == "1":
        pytest.skip("PostgreSQL tests disabled by FHIRSERVER_TEST_SKIP_PG=1")
    from tests.support.pg import ThrowawayPostgres

    pg = ThrowawayPostgres()
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def durable_postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL with its default durable settings (fsync, synchronous commit)."""
    if os.environ.get("FHIRSERVER_TEST_SKIP_PG") == "1":
        pytest.skip("PostgreSQL tests disabled by FHIRSERVER_TEST_SKIP_PG=1")
    from tests.support.pg import ThrowawayPostgres

    pg = ThrowawayPostgres()
    pg.start(durable=True)
    yield pg
    pg.stop()


def db_path(settings: Settings) -> Path:
    url = settings.effective_database_url
    assert url.startswith("sqlite:///"), url
    return Path(url[len("sqlite:///"):])


@contextmanager
def raw_db(settings: Settings) -> Iterator[sqlite3.Connection]:
    """A raw connection to the SQLite file: the view of an attacker (or operator) with the disk."""
    cx = sqlite3.connect(db_path(settings), timeout=30, isolation_level=None)
    try:
        yield cx
    finally:
        cx.close()


def make_settings(tmp_path: Path, database_url: str = "", **kw: Any) -> Settings:
    kw.setdefault("audit_sequencer", False)  # tests sequence explicitly (audit verify, $proof)
    kw.setdefault("privacy_jobs", False)  # tests run snooping and retention explicitly
    return load_settings(data_dir=str(tmp_path / "data"), base_url=BASE, database_url=database_url or None, **kw)


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Database for the `app` fixture. Tests parametrize it indirectly with "postgres" too."""
    if request.param == "postgres":
        pg = request.getfixturevalue("postgres")
        return pg.create_database(f"t{next(_counter)}_{os.getpid()}")
    return ""


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path, db_url)


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    application = fresh_app(settings)
    yield application
    application.extensions["fhirserver"].engine.dispose()


@pytest.fixture
def svc(app):  # type: ignore[no-untyped-def]
    return app.extensions["fhirserver"]


@pytest.fixture
def http(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@dataclass
class BackendClient:
    """A registered SMART backend client that gets real tokens through /auth/token."""

    http: Any
    client_id: str
    key: Any
    token_url: str
    default_scope: str = "system/*.cruds"
    _tokens: dict[str, str] = field(default_factory=dict)

    def token(self, scope: str) -> str:
        if scope not in self._tokens:
            resp = self.http.post("/auth/token", data=token_request_form(self.key, self.client_id, self.token_url, scope))
            assert resp.status_code == 200, resp.get_data(as_text=True)
            self._tokens[scope] = resp.get_json()["access_token"]
        return self._tokens[scope]

    def headers(self, scope: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scope or self.default_scope)}", **extra}


@pytest.fixture
def make_client(app, http, settings):  # type: ignore[no-untyped-def]
    svc = app.extensions["fhirserver"]

    def _make(scopes: str = "system/*.cruds", alg: str = "ES384", default_scope: str = "system/*.cruds",
              **kw: Any) -> BackendClient:
        key = generate_key(alg)
        rec = register_backend_client(svc.engine, f"test client {next(_counter)}", scopes, jwks=public_jwks(key), **kw)
        return BackendClient(http, rec.client_id, key, settings.token_url, default_scope)

    return _make


# a privacy-office client: reads AuditEvents (explicit scope), query values included (docs/security.md)
AUDITOR_SETTINGS: dict[str, Any] = {"auditor": True, "audit_query_values": True, "purposes": ["HOPERAT"]}


@pytest.fixture
def auditor(make_client) -> BackendClient:  # type: ignore[no-untyped-def]
    return make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS, default_scope="system/AuditEvent.rs")


@pytest.fixture
def admin(make_client) -> BackendClient:  # type: ignore[no-untyped-def]
    """A backend client allowed everything on every type."""
    return make_client("system/*.cruds")
