"""A request opens exactly two transactions (docs/architecture.md, "Transactions"): one read
snapshot for authentication, the consent stage's state and a read's data, then one write
transaction for the change and/or the access record -- kept apart because the record must be
durable before the response leaves (fail closed) while a read must not hold the write lock. Both
run on the one connection a request checks out (the snapshot is ended and its connection lent to
the write transaction), and an audited read writes its access record and nothing else."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select

from fhirserver.db.engine import read_connection
from fhirserver.db.schema import metadata
from fhirserver.oversight import penalties
from tests.conftest import BackendClient

# tables the audit sequencer and the hourly roll-up fill in the background, on their own clock
BACKGROUND = {"audit_node", "audit_checkpoint", "audit_state", "access_hourly", "access_agent_hour", "job_run"}


@pytest.fixture
def opened(svc: Any) -> Iterator[dict[str, int]]:
    """Transactions begun and connections checked out of the pool by this thread's requests."""
    counts = {"begin": 0, "checkout": 0, "open": 0, "most_open": 0}
    raw = svc.engine.raw
    mine = threading.get_ident()  # the test client serves requests on this thread; the background
    # workers (export, subscription dispatcher) have their own

    def begun(_conn: Any) -> None:
        if threading.get_ident() == mine:
            counts["begin"] += 1

    def checked_out(*_args: Any) -> None:
        if threading.get_ident() != mine:
            return
        counts["checkout"] += 1
        counts["open"] += 1
        counts["most_open"] = max(counts["most_open"], counts["open"])

    def checked_in(*_args: Any) -> None:
        if threading.get_ident() == mine:
            counts["open"] -= 1

    event.listen(raw, "begin", begun)
    event.listen(raw, "checkout", checked_out)
    event.listen(raw, "checkin", checked_in)
    yield counts
    event.remove(raw, "begin", begun)
    event.remove(raw, "checkout", checked_out)
    event.remove(raw, "checkin", checked_in)


def _rows(svc: Any) -> dict[str, int]:
    with read_connection(svc.engine) as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in metadata.sorted_tables if t.name not in BACKGROUND}


def test_each_interaction_opens_two_transactions(http: Any, svc: Any, admin: BackendClient,
                                                 opened: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    # the penalty levels' cache expires on every request: its refresh reads in the request's snapshot
    monkeypatch.setattr(penalties, "CACHE_SECONDS", 0.0)
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Tx"}]}, headers=h).get_json()["id"]
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "tx"},
           "subject": {"reference": f"Patient/{pid}"}}
    oid = http.post("/fhir/Observation", json=obs, headers=h).get_json()["id"]
    interactions: dict[str, tuple[Callable[[], Any], int]] = {
        "read": (lambda: http.get(f"/fhir/Observation/{oid}", headers=h), 200),
        "vread": (lambda: http.get(f"/fhir/Observation/{oid}/_history/1", headers=h), 200),
        "search": (lambda: http.get("/fhir/Observation", query_string={"subject": f"Patient/{pid}"}, headers=h), 200),
        "history": (lambda: http.get(f"/fhir/Observation/{oid}/_history", headers=h), 200),
        "create": (lambda: http.post("/fhir/Observation", json=obs, headers=h), 201),
        "update": (lambda: http.put(f"/fhir/Observation/{oid}", json={**obs, "id": oid}, headers=h), 200),
        "not found": (lambda: http.get("/fhir/Observation/no-such-id", headers=h), 404),
    }
    for name, (call, status) in interactions.items():
        assert call().status_code == status  # warm: tokens, keys, term sets
        opened.update(begin=0, checkout=0, most_open=0)
        assert call().status_code == status, name
        # two transactions, one after the other on one checked-out connection
        assert (opened["begin"], opened["checkout"], opened["most_open"]) == (2, 1, 1), (name, opened)


def test_an_audited_read_writes_its_access_record_and_nothing_else(http: Any, svc: Any, admin: BackendClient) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Rows"}]}, headers=h).get_json()["id"]
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200  # warm
    before = _rows(svc)
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    after = _rows(svc)
    changed = {t: after[t] - before[t] for t in after if after[t] != before[t]}
    # one record and its subject rows (the references it is searchable by: patient, entity, agent)
    assert set(changed) == {"access_record", "access_subject"} and changed["access_record"] == 1, changed


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_on_postgresql_no_statement_is_prepared(http: Any, svc: Any, admin: BackendClient) -> None:
    """psycopg would prepare a statement at its fifth execution on a connection (the counts start
    again at each ROLLBACK, which ends every request's snapshot): measured, keeping prepared
    statements made mixed load slower (docs/performance.md), so none is prepared. Six creates in
    one transaction run the same INSERTs six times."""
    h = {**admin.headers(), "Content-Type": "application/fhir+json"}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": f"Prep{i}"}]},
         "request": {"method": "POST", "url": "Patient"}} for i in range(6)]}
    resp = http.post("/fhir", json=bundle, headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert len(resp.get_json()["entry"]) == 6
    raw = svc.engine.raw
    idle = [raw.connect() for _ in range(raw.pool.checkedin())]  # every pooled connection, the bundle's among them
    try:
        prepared = [s for conn in idle for s in conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements").scalars()]
    finally:
        for conn in idle:
            conn.close()
    assert idle and prepared == []
