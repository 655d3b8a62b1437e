"""AuditEvents of the old hash chain (before migration 0009: resource rows linked by
`audit_chain` under one `audit_head`) move into access records at the next start, read back
exactly as before, and `audit verify` passes; a broken old chain is refused, nothing moved."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from click.testing import CliRunner

from fhirserver.app import create_app
from fhirserver.audit.events import AuditIndexer, AuditRecord, build_audit_event
from fhirserver.cli import main
from fhirserver.clock import now_us
from tests.conftest import AUDITOR_SETTINGS
from tests.conftest import raw_db as db


def _old_link(key: bytes, prev: str, seq: int, event_id: str, recorded_us: int, content_hash: str) -> str:
    """The old chain's link, as the pre-0009 server wrote it."""
    return hmac.new(key, f"{prev}|{seq}|{event_id}|{recorded_us}|{content_hash}".encode(), hashlib.sha256).hexdigest()


def _write_old_chain(svc: Any, n: int) -> list[tuple[str, bytes]]:
    """n AuditEvents stored the old way: resource rows + chain rows + head. Returns (id, JSON)."""
    indexer = AuditIndexer(svc.repo.indexer)
    key = svc.keys.ensure("audit-chain")[1]
    prev, out = "0" * 64, []
    with svc.engine.begin() as conn:
        for seq in range(1, n + 1):
            when = now_us() + seq
            rec = AuditRecord("read", f"legacy-req-{seq}", "10.1.2.3", when, client_id="legacy-app",
                              client_name="Legacy app", resources=[f"Patient/p{seq}/_history/1"], patients=[f"p{seq}"])
            event = build_audit_event(rec, svc.settings.fhir_base)
            prepared = svc.repo.prepare_indexed("AuditEvent", event, indexer.index(event))
            stored = svc.repo.create(conn, prepared, when_us=when, fresh_id=True)
            content = hashlib.sha256(stored.body).hexdigest()
            link = _old_link(key, prev, seq, stored.id, when, content)
            conn.exec_driver_sql("INSERT INTO audit_chain (seq, event_id, recorded_us, content_hash, prev_hash, hash) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (seq, stored.id, when, content, prev, link))
            prev = link
            out.append((stored.id, stored.body))
        conn.exec_driver_sql("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (n, prev))
    return out


def test_old_chain_moves_into_access_records(app, settings, make_client):  # type: ignore[no-untyped-def]
    svc = app.extensions["fhirserver"]
    old = _write_old_chain(svc, 5)
    restarted = create_app(settings, migrate=False)  # the next start moves them
    http = restarted.test_client()
    with db(settings) as cx:
        assert cx.execute("SELECT count(*) FROM resource WHERE type='AuditEvent'").fetchone()[0] == 0
        assert cx.execute("SELECT count(*) FROM audit_chain").fetchone()[0] == 0
        moved = {r[0] for r in cx.execute("SELECT id FROM access_record")}
    assert {i for i, _b in old} <= moved
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS).headers("system/AuditEvent.rs")
    for event_id, body in old:
        r = http.get(f"/fhir/AuditEvent/{event_id}", headers=auditor)
        assert r.status_code == 200 and r.get_data() == body  # byte for byte what was stored
    found = http.get("/fhir/AuditEvent?agent=Device/legacy-app&_count=50", headers=auditor).get_json()
    assert {e["resource"]["id"] for e in found["entry"]} == {i for i, _b in old}
    env = {"FHIRSERVER_DATA_DIR": str(settings.data_dir), "FHIRSERVER_BASE_URL": settings.base_url}
    with db(settings) as cx:
        total = cx.execute("SELECT count(*) FROM access_record").fetchone()[0]
    result = CliRunner().invoke(main, ["audit", "verify"], env=env)
    assert result.exit_code == 0 and f"OK: {total} audit records verified" in result.output, result.output


def test_broken_old_chain_is_refused(app, settings):  # type: ignore[no-untyped-def]
    svc = app.extensions["fhirserver"]
    old = _write_old_chain(svc, 4)
    with db(settings) as cx:
        cx.execute("UPDATE audit_chain SET recorded_us = recorded_us + 1 WHERE seq = 2")
    with pytest.raises(Exception, match="seq=2"):
        create_app(settings, migrate=False)
    with db(settings) as cx:  # nothing moved
        assert cx.execute("SELECT count(*) FROM audit_chain").fetchone()[0] == 4
        assert cx.execute("SELECT count(*) FROM resource WHERE type='AuditEvent'").fetchone()[0] == len(old)
