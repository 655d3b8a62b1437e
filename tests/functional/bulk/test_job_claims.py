"""Export jobs are claimed exactly once when several instances (engines) poll one database
together: 40 queued jobs, 8 threads over two engines, each job taken by exactly one."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from fhirserver.db.engine import make_engine, transaction
from fhirserver.db.migrations import upgrade
from fhirserver.db.schema import client
from fhirserver.storage import export_jobs as jobs


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_each_job_claimed_once(tmp_path: Any, db: str, request: pytest.FixtureRequest) -> None:
    if db == "postgres":
        url = request.getfixturevalue("postgres").create_database(f"claims_{tmp_path.name[-20:].lower()}")
    else:
        url = f"sqlite:///{tmp_path / 'claims.sqlite3'}"
    upgrade(url)
    engines = [make_engine(url), make_engine(url)]  # two instances
    with transaction(engines[0]) as conn:
        conn.execute(client.insert().values(client_id="client", name="exporter", kind="backend", scopes="system/*.rs",
                                            disabled=False, created_us=1))
        queued = {jobs.create_job(conn, "client", f"req {i}", {"types": []}, {}) for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while True:
            job = jobs.claim_next(engines[n % 2])
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert sorted(claimed) == sorted(queued)  # every job once, none twice
    for e in engines:
        e.dispose()
