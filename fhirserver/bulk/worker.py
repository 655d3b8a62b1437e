"""The background export worker: a daemon thread per server process polling the job table.

Jobs survive restarts: their state is in the database, a job whose worker stopped beating is
picked up again by any live worker and redone from the start (partial output is discarded), and
expired jobs are deleted with their files and key.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import event

from ..services import Services
from ..storage import export_jobs as jobs
from .export import run_export

log = logging.getLogger("fhirserver.bulk")


def start_worker(svc: Services, poll_seconds: float = 1.0) -> threading.Thread:
    stop = threading.Event()
    raw = getattr(svc.engine, "raw", svc.engine)
    event.listen(raw, "engine_disposed", lambda _engine: stop.set())

    def loop() -> None:
        while not stop.wait(poll_seconds):
            try:
                jobs.expire(svc.engine)
                job = jobs.claim_next(svc.engine)
                while job is not None and not stop.is_set():
                    run_export(svc, job, stop)
                    job = jobs.claim_next(svc.engine)
            except Exception:  # noqa: BLE001 - the worker must outlive a bad round
                if not stop.is_set():
                    log.exception("bulk export worker round failed")

    thread = threading.Thread(target=loop, name="bulk-export", daemon=True)
    thread.start()
    return thread
