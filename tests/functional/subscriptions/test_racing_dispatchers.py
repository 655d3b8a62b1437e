"""Several instances' dispatchers over one outbox (docs/subscriptions.md, "Nothing is lost"):
while changes keep arriving, dispatchers racing to match them number every change exactly once --
none lost, none twice -- on SQLite and on PostgreSQL. (The outbox's numbers are never reused: a
dispatcher taking a change by its number must not take a newer change that reused it.)"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fhirserver.config import Settings
from fhirserver.db.engine import read_connection
from fhirserver.db.schema import subscription_event
from fhirserver.notify.dispatcher import Dispatcher
from tests.conftest import make_settings

from .test_rest_hook import observation, patient, subscribe, subscription


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    # no dispatcher of the app's own: the test runs its "instances" itself
    return make_settings(tmp_path, db_url, subscription_dispatcher=False)


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_racing_dispatchers_number_every_change_exactly_once(http: Any, svc: Any, make_client: Any) -> None:
    client = make_client(settings={"subscription_endpoints": ["https://1.1.1.1/hook"]})
    h = client.headers()
    pid = patient(http, h, "Race")
    subscribe(http, h, subscription("https://1.1.1.1/hook", filters=(f"Observation?patient=Patient/{pid}",)))
    stop = threading.Event()
    instances = [Dispatcher(svc, worker=f"instance-{i}") for i in range(3)]

    def run(d: Dispatcher) -> None:
        while not stop.is_set():
            d.match_once(limit=3)

    threads = [threading.Thread(target=run, args=(d,)) for d in instances]
    for t in threads:
        t.start()
    written = [observation(http, h, pid, float(i)) for i in range(60)]
    stop.set()
    for t in threads:
        t.join()
    while instances[0].match_once():
        pass
    with read_connection(svc.engine) as conn:
        rows = conn.execute(select(subscription_event.c.number, subscription_event.c.id)
                            .order_by(subscription_event.c.number)).all()
    assert [r.number for r in rows] == list(range(1, len(written) + 1))
    assert sorted(r.id for r in rows) == sorted(written)  # each change once: none lost, none twice
