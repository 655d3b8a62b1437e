"""An export that is running when its database goes away, and an export run that lost its job to
another claim (PostgreSQL; docs/operations.md, "Past one database machine").

The export worker is held at a known point of a running job with PostgreSQL's own locks -- a
table lock on `resource` stops its first batch read after the claim, a share lock on its job's
row its first heartbeat -- and `pg_stat_activity` shows it waiting there, so neither test depends
on timing:
- the database restarts under the running export: it goes on where it was once the database is
  back (seconds, not the 30 s after which a silent job is redone), and every resource is in the
  output exactly once;
- another run claims the job (as a claim does: a new heartbeat, the old run's files deleted) while
  the first run waits to beat: the first run writes nothing more, and the output is the new
  run's, whole. Without the fence the first run wrote on, and the files the claim had deleted were
  missing from a "complete" manifest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import make_settings
from tests.support.apps import fresh_app
from tests.support.bulk import ASYNC, Server, _local
from tests.support.pg import ThrowawayPostgres

OBSERVATIONS = 600  # two batches of the worker (500 rows each): it heartbeats once in between


@pytest.fixture()
def pg() -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres()  # its own: the test kills it
    server.start(durable=True)
    try:
        yield server
    finally:
        server.stop()


def _dsn(pg: ThrowawayPostgres) -> str:
    return f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres"


def _serve(tmp_path: Path, pg: ThrowawayPostgres, **settings: Any) -> tuple[Server, str, set[str]]:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres"
    srv = Server(fresh_app(make_settings(tmp_path, url, **settings)))
    token = srv.token()
    pid = srv.create(token, {"resourceType": "Patient", "name": [{"family": "Outage"}]})
    made: set[str] = set()
    for _ in range(OBSERVATIONS // 200):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "outage"},
                          "subject": {"reference": f"Patient/{pid}"}},
             "request": {"method": "POST", "url": "Observation"}} for _ in range(200)]}
        resp = srv.http.post("/fhir", json=bundle, headers=srv.h(token))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        made.update(e["response"]["location"].split("Observation/")[1].split("/")[0] for e in resp.get_json()["entry"])
    assert len(made) == OBSERVATIONS
    return srv, token, made


def _kickoff(srv: Server, token: str) -> tuple[str, str]:
    resp = srv.http.get("/fhir/$export", query_string={"_type": "Observation"}, headers=srv.h(token, **ASYNC))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    status_url = resp.headers["Content-Location"]
    return status_url, status_url.split("_jobId=", 1)[1]


def _wait_for(what: str, check: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _job(watch: psycopg.Connection[Any], job_id: str) -> tuple[str, int | None]:
    row = watch.execute("SELECT status, heartbeat_us FROM export_job WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


def _waits_on_a_lock(watch: psycopg.Connection[Any], table: str) -> bool:
    """Whether one backend waits on a lock in a statement naming `table` (the server's worker:
    the test's own connections wait on nothing)."""
    return watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                         (f"%{table}%",)).fetchone() == (1,)


def _finished(srv: Server, token: str, status_url: str, timeout: float) -> dict[str, Any]:
    """The completed export's manifest; a 503 while the database comes back is polled through."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = srv.http.get(_local(status_url), headers=srv.h(token))
        if resp.status_code == 200:
            return dict(resp.get_json())
        assert resp.status_code in (202, 503), resp.get_data(as_text=True)
        time.sleep(0.2)
    raise AssertionError(f"the export did not complete within {timeout} s")


def test_a_running_export_waits_out_a_database_restart_and_loses_nothing(tmp_path: Path, pg: ThrowawayPostgres) -> None:
    srv, token, made = _serve(tmp_path, pg)
    holder = psycopg.connect(_dsn(pg))  # its transaction holds the lock
    watch = psycopg.connect(_dsn(pg), autocommit=True)
    try:
        holder.execute("LOCK TABLE resource IN ACCESS EXCLUSIVE MODE")  # no batch read gets past this
        status_url, job_id = _kickoff(srv, token)
        _wait_for("the worker to claim the job", lambda: _job(watch, job_id)[0] == "running")
        _wait_for("the worker's first batch read to wait on the lock", lambda: _waits_on_a_lock(watch, "resource"))
        pg.crash()  # the database machine is gone, mid-export
        time.sleep(2)
        pg.restart()
        started = time.monotonic()
        manifest = _finished(srv, token, status_url, timeout=20)  # a silent job is redone only after 30 s
        waited = time.monotonic() - started
        files = srv.files(token, manifest)
        ids = [r["id"] for r in files["Observation"]]
        assert len(ids) == len(set(ids)) and set(ids) == made, (len(ids), len(set(ids)))
        assert waited < 20
        with psycopg.connect(_dsn(pg), autocommit=True) as check:
            runs = check.execute("SELECT count(*) FROM export_file WHERE job_id = %s", (job_id,)).fetchone()
        assert runs == (len(manifest["output"]),)
    finally:
        holder.close()
        watch.close()
        srv.svc.engine.dispose()


def test_a_run_that_lost_its_job_to_another_claim_writes_nothing_more(tmp_path: Path, pg: ThrowawayPostgres) -> None:
    # files of 100 resources: the first batch (500) makes five files before the run's first heartbeat
    srv, token, made = _serve(tmp_path, pg, export_file_max_resources=100)
    holder, claimer = psycopg.connect(_dsn(pg)), psycopg.connect(_dsn(pg))
    watch = psycopg.connect(_dsn(pg), autocommit=True)
    try:
        holder.execute("LOCK TABLE resource IN ACCESS EXCLUSIVE MODE")
        status_url, job_id = _kickoff(srv, token)
        _wait_for("the worker to claim the job", lambda: _job(watch, job_id)[0] == "running")
        _wait_for("the first batch read to wait", lambda: _waits_on_a_lock(watch, "resource"))
        # the run holds its claim (its beat); a share lock on the job row lets it write its files
        # but not its heartbeat...
        claimer.execute("SELECT id FROM export_job WHERE id = %s FOR SHARE", (job_id,))
        holder.rollback()
        _wait_for("the first run's heartbeat to wait", lambda: _waits_on_a_lock(watch, "UPDATE export_job"))
        assert watch.execute("SELECT count(*) FROM export_file WHERE job_id = %s", (job_id,)).fetchone() == (5,)
        # ...while another run claims the job as claim_next does: a new heartbeat (stale already, so
        # that the worker takes the job again at once instead of waiting for a run that never comes)
        # and every earlier run's files deleted, a restart redoing it all
        stale = int(time.time() * 1_000_000) - 31_000_000
        claimer.execute("UPDATE export_job SET heartbeat_us = %s, progress = 'starting' WHERE id = %s", (stale, job_id))
        claimer.execute("DELETE FROM export_file WHERE job_id = %s", (job_id,))
        claimer.commit()
        manifest = _finished(srv, token, status_url, timeout=20)
        files = srv.files(token, manifest)
        ids = [r["id"] for r in files["Observation"]]
        assert len(ids) == len(set(ids)) and set(ids) == made, (len(ids), len(set(ids)))
        assert sum(item["count"] for item in manifest["output"]) == OBSERVATIONS
        status, beat = _job(watch, job_id)
        assert status == "complete" and beat is not None and beat > stale  # ended by the run that claimed it after
    finally:
        for conn in (holder, claimer, watch):
            conn.close()
        srv.svc.engine.dispose()
