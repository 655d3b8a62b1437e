"""Production serving: gunicorn with the app built per worker (no SQLite handles across fork).

Also usable directly: `gunicorn 'fhirserver.wsgi:app()'` with FHIRSERVER_* environment variables.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

from .config import Settings, load_settings
from .logs import gunicorn_logger


def app() -> Flask:
    from .app import create_app

    return create_app(load_settings(), migrate=False)


def run_gunicorn(settings: Settings, host: str, port: int, workers: int, threads: int) -> None:
    from gunicorn.app.base import BaseApplication

    # Prometheus multiprocess mode: set before prometheus_client is first imported (it picks its
    # value storage at import) and before the workers fork; a fresh directory per start.
    metrics_dir = settings.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    supervisor = None
    if settings.subscription_dispatcher:  # one dispatcher process beside the workers (dispatcher_process.py)
        from dataclasses import replace

        from .dispatcher_process import Supervisor

        supervisor = Supervisor(settings)
        settings = replace(settings, subscription_dispatcher=False)

    class _App(BaseApplication):
        def load_config(self) -> None:
            if supervisor is not None:
                self.cfg.set("when_ready", lambda _arbiter: supervisor.start())
                self.cfg.set("on_exit", lambda _arbiter: supervisor.stop())
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("accesslog", "-")
            self.cfg.set("logger_class", gunicorn_logger())  # tracebacks without their messages
            # the URL path only: query strings carry search values (names, birth dates, identifiers)
            self.cfg.set("access_log_format", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss')
            self.cfg.set("timeout", 120)
            # request lines up to gunicorn's 1 MB hard cap reach the app, which answers a URL over
            # max_url_bytes with a 414 OperationOutcome (gunicorn's own 414 is an HTML page)
            self.cfg.set("limit_request_line", 0)
            if "control_socket_disable" in self.cfg.settings:
                # one server per data dir: no shared per-user control socket between instances
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Flask:
            import sys

            from .app import create_app

            # Threads of a worker share the GIL. The thread holding the database write lock
            # releases the GIL on every SQL call and must get it back quickly, or every other
            # writer waits on it: a 0.5 ms switch interval instead of 5 ms keeps that convoy short.
            sys.setswitchinterval(0.0005)
            return create_app(settings, migrate=False)

    _App().run()
