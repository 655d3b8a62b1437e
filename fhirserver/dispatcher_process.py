"""The subscription dispatcher in a process of its own (docs/subscriptions.md).

A dispatcher thread inside a gunicorn worker shares that worker's GIL with its request threads:
a delivery round (numbering, building notifications and their access records) holds it for
milliseconds at a time, and the requests of that worker wait. Measured on durable PostgreSQL at
100 subscriptions and 50 writes/s (scripts/bench_subscriptions.py), moving it out of the workers
took the writes' response p50 from ~30 ms to 19 ms and the notifications' p95 from ~200 to 121 ms.

So `fhirserver serve` runs one dispatcher process per instance beside its workers, started by the
gunicorn master once the workers are up and started again if it dies (`Supervisor`); it exits
when the master is gone, even after a kill -9. `fhirserver subscription dispatch` runs the same
loop in the foreground, for deployments that start gunicorn themselves.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess

from .config import Settings

log = logging.getLogger("fhirserver.subscriptions")
RESTART_WAIT_S = 1.0  # a dispatcher process that died is started again after this (doubling, up to a minute)


def run(settings: Settings, parent: int | None = None) -> None:
    """Match and deliver until SIGTERM/SIGINT, or until process `parent` is gone."""
    from .logs import configure
    from .notify.dispatcher import start_dispatcher
    from .notify.signature import signer
    from .services import build_services
    from .smart.secrets_store import signing_key

    configure(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    svc = build_services(settings)
    thread = start_dispatcher(svc, signer(signing_key(settings.data_dir)))
    while not stop.wait(1.0):
        if parent is not None and os.getppid() != parent:  # the master died (kill -9): so do we
            break
    svc.engine.dispose()  # stops the dispatcher thread after its round
    thread.join(timeout=30)


class Supervisor:
    """Keeps one dispatcher process running beside gunicorn's workers (from the master)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._proc: BaseProcess | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the dispatcher process now, in the calling thread (gunicorn's `when_ready` runs
        before the master forks its workers: nothing else of ours is running while it forks),
        then a thread that waits for it and starts it again if it dies."""
        self._proc = self._spawn()
        self._thread = threading.Thread(target=self._keep, name="subscription-dispatcher-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> BaseProcess:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the master's state
        proc = ctx.Process(target=run, args=(self.settings, os.getpid()), name="fhirserver-dispatcher", daemon=False)
        proc.start()
        return proc

    def _keep(self) -> None:
        wait = RESTART_WAIT_S
        while not self._stop.is_set():
            proc = self._proc
            assert proc is not None
            proc.join()  # waits, holding no lock (gunicorn may reap it first: join then returns too)
            if self._stop.is_set():
                return
            log.error("the subscription dispatcher process exited (code %s); starting it again in %.0f s",
                      proc.exitcode, wait)
            if self._stop.wait(wait):
                return
            wait = min(60.0, wait * 2)
            self._proc = self._spawn()

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()  # SIGTERM: it finishes its round
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
