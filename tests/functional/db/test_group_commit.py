"""Group commit (fhirserver/db/group_commit.py) against a real SQLite file: writers of one process
that arrive while a write transaction is open join it, each in its own savepoint, and one
commit makes all of them durable; a failing member loses only its own work."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fhirserver.db.engine import make_engine, read_connection
from fhirserver.db.group_commit import GroupCommitEngine
from tests.support.audit import verify_audit

T = sa.table("t", sa.column("v"))


@pytest.fixture
def grouped(tmp_path: Path) -> Any:
    raw = make_engine(f"sqlite:///{tmp_path / 'g.sqlite3'}")
    with raw.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v TEXT NOT NULL)")
    commits: list[int] = []
    sa.event.listen(raw, "commit", lambda conn: commits.append(1))
    engine = GroupCommitEngine(raw)
    yield engine, commits
    raw.dispose()


def _values(engine: GroupCommitEngine) -> list[str]:
    with read_connection(engine) as conn:
        return sorted(conn.execute(sa.select(T.c.v)).scalars())


def _wait_for_members(engine: GroupCommitEngine, n: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        group = engine._open
        if group is not None and group.size == n:
            return
        time.sleep(0.005)
    raise AssertionError(f"{n} members never joined the open transaction")


def _writer(engine: GroupCommitEngine, value: str, fail: bool = False,
            hold: threading.Event | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(T).values(v=value))
        if hold is not None:
            assert hold.wait(10)
        if fail:
            raise ValueError(f"{value} failed")


def test_waiting_writers_share_one_commit_and_a_failure_stays_local(grouped: Any) -> None:
    engine, commits = grouped
    hold = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(_writer, engine, "a", hold=hold)
        _wait_for_members(engine, 1)
        others = [pool.submit(_writer, engine, "b", fail=True), pool.submit(_writer, engine, "c"),
                  pool.submit(_writer, engine, "d")]
        _wait_for_members(engine, 4)
        assert _values(engine) == []  # nothing is visible before the group commits
        hold.set()
        first.result(10)
        with pytest.raises(ValueError, match="b failed"):
            others[0].result(10)
        others[1].result(10)
        others[2].result(10)
    assert _values(engine) == ["a", "c", "d"]
    assert len(commits) == 1


@pytest.mark.parametrize("second_fails", [False, True])
def test_a_failing_first_member_rolls_back_alone_and_the_others_commit(grouped: Any, second_fails: bool) -> None:
    """The first member runs without a savepoint (its work is all the transaction holds): when it
    fails, the transaction is rolled back and the members waiting behind it run in a fresh one.
    When the next member fails too, it is the first of that fresh one, and so on."""
    engine, commits = grouped
    hold = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(_writer, engine, "a", fail=True, hold=hold)
        _wait_for_members(engine, 1)
        second = pool.submit(_writer, engine, "b", fail=second_fails)
        _wait_for_members(engine, 2)
        third = pool.submit(_writer, engine, "c")
        _wait_for_members(engine, 3)
        hold.set()
        with pytest.raises(ValueError, match="a failed"):
            first.result(10)
        if second_fails:
            with pytest.raises(ValueError, match="b failed"):
                second.result(10)
        else:
            second.result(10)
        third.result(10)
    assert _values(engine) == (["c"] if second_fails else ["b", "c"])
    assert len(commits) == 1
    _writer(engine, "after")  # the write lock was released: the next transaction goes on
    assert _values(engine) == (["after", "c"] if second_fails else ["after", "b", "c"])


def test_a_lone_member_spends_no_savepoint_and_a_failure_leaves_nothing(grouped: Any) -> None:
    engine, commits = grouped
    statements: list[str] = []
    # every statement SQLite runs on the pooled connections (savepoints are plain SQL on the cursor)
    sa.event.listen(engine.raw, "checkout", lambda dbapi, *_: dbapi.set_trace_callback(statements.append))
    _writer(engine, "x")
    with pytest.raises(ValueError):
        _writer(engine, "y", fail=True)
    assert any(s.startswith("BEGIN IMMEDIATE") for s in statements), statements
    assert not [s for s in statements if "SAVEPOINT" in s.upper()], statements
    assert _values(engine) == ["x"]
    assert len(commits) == 1


def test_sequential_writers_commit_separately(grouped: Any) -> None:
    engine, commits = grouped
    _writer(engine, "x")
    _writer(engine, "y")
    with pytest.raises(ValueError):
        _writer(engine, "z", fail=True)
    assert _values(engine) == ["x", "y"]
    assert len(commits) == 2


def test_a_failed_commit_fails_every_member(grouped: Any) -> None:
    engine, _commits = grouped
    with engine.raw.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    hold = threading.Event()

    def bad_child() -> None:  # violates a deferred foreign key: detected only at COMMIT
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO child VALUES (42)")
            assert hold.wait(10)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(bad_child)
        _wait_for_members(engine, 1)
        second = pool.submit(_writer, engine, "innocent")
        _wait_for_members(engine, 2)
        hold.set()
        with pytest.raises(sa.exc.IntegrityError):
            first.result(10)
        with pytest.raises(sa.exc.IntegrityError):
            second.result(10)  # its data was not committed, so it must not report success
    assert _values(engine) == []


def test_nested_write_transaction_in_one_thread_is_refused(grouped: Any) -> None:
    engine, _ = grouped
    with pytest.raises(RuntimeError, match="nested"), engine.begin(), engine.begin():
        pass
    _writer(engine, "after")
    assert _values(engine) == ["after"]


def test_concurrent_http_creates_are_all_stored_and_audited(app: Any, admin: Any) -> None:
    """Many request threads at once: every create is stored, every request has its AuditEvent,
    and the hash chain verifies."""
    svc = app.extensions["fhirserver"]
    assert isinstance(svc.engine, GroupCommitEngine)
    headers = admin.headers()

    def create(i: int) -> str:
        client = app.test_client()
        body = {"resourceType": "Patient", "name": [{"family": f"Concurrent{i}"}]}
        resp = client.post("/fhir/Patient", data=json.dumps(body), headers={**headers,
                                                                          "Content-Type": "application/fhir+json"})
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return str(resp.get_json()["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(create, range(80)))
    assert len(set(ids)) == 80
    client = app.test_client()
    for pid in ids[::10]:
        assert client.get(f"/fhir/Patient/{pid}", headers=headers).status_code == 200
    result = verify_audit(svc)
    assert result.ok, result
    assert result.checked == 1 + 80 + len(ids[::10])  # the token request, the creates, the reads
