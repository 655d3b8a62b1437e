"""Prometheus metrics at /metrics (prometheus-client), correct under gunicorn's worker processes.

Labels are the interaction, the resource type and the HTTP status -- never an id, a query value
or anything else that could name a patient. `serve` points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers fork (wsgi.run_gunicorn), so each worker writes its own files and a scrape of any
worker aggregates them all; a process without it (tests, `gunicorn fhirserver.wsgi:app()`
without the variable) serves its own registry.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response

# prometheus_client is imported only when a metric is first used or /metrics is installed: it
# picks its value storage (per-process files or memory) when first imported, and `serve` imports
# this module before it sets PROMETHEUS_MULTIPROC_DIR for gunicorn's workers.


class _Metrics:
    """Created on first use (see the note on the import above)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("fhirserver_requests_total", "FHIR requests answered",
                                ["interaction", "resource_type", "status"])
        self.latency = Histogram("fhirserver_request_seconds", "Time to answer a FHIR request (audit commit included)",
                                 ["interaction"], buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.audit_append = Histogram("fhirserver_audit_append_seconds", "Time to write one access record in its "
                                      "request's transaction",
                                      buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25))
        self.consent_denials = Counter("fhirserver_consent_denials_total", "Reads a patient's Consent denied",
                                       ["resource_type"])
        self.login_failures = Counter("fhirserver_login_failures_total", "Failed sign-ins, by reason code", ["reason"])
        self.notifications = Counter("fhirserver_subscription_notifications_total",
                                     "Subscription notifications, by outcome (queued: events numbered; delivered; "
                                     "retried: a failed attempt; failed: a subscription given up; withheld: events "
                                     "its owner may no longer see)", ["outcome"])
        self.read_snapshots = Counter("fhirserver_read_snapshots_total",
                                      "Read snapshots of GET requests, by where they were served (replica: a "
                                      "read replica that had caught up; primary: none had, or none is configured)",
                                      ["node"])
        self.notification_lag = Histogram("fhirserver_subscription_lag_seconds",
                                          "From a change's commit to its notification's acknowledgement",
                                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30, 300, 3600))


_metrics: _Metrics | None = None
_creating = threading.Lock()


def _m() -> _Metrics:
    """The metrics, created once: two threads of a worker answering their first requests at the
    same moment would otherwise both register them, and the second registration raises
    (DuplicateTimeseries: a 500 seen under load in the failover test)."""
    global _metrics
    if _metrics is None:
        with _creating:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def audit_append(seconds: float) -> None:
    _m().audit_append.observe(seconds)


def consent_denial(resource_type: str | None) -> None:
    _m().consent_denials.labels(resource_type or "-").inc()


def notification(outcome: str, count: int = 1) -> None:
    if count:
        _m().notifications.labels(outcome).inc(count)


def notification_lag(seconds: float) -> None:
    _m().notification_lag.observe(seconds)


def read_snapshot(node: str) -> None:
    _m().read_snapshots.labels(node).inc()


def login_failure(reason: str) -> None:
    _m().login_failures.labels(reason).inc()


# Gauges read from the database at each scrape (one value for the whole deployment, whichever
# worker or instance answers): (name, help, labels) -> rows of (label values, value).
DbGauges = Callable[[], dict[tuple[str, str, tuple[str, ...]], list[tuple[tuple[str, ...], float]]]]


def observe(interaction: str, resource_type: str | None, status: int, seconds: float) -> None:
    m = _m()
    m.requests.labels(interaction, resource_type or "-", str(status)).inc()
    m.latency.labels(interaction).observe(seconds)


def install(app: Flask, db_gauges: DbGauges) -> None:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )
    from prometheus_client.core import GaugeMetricFamily

    class DbCollector:
        def collect(self) -> Iterator[Any]:
            for (name, doc, labels), rows in db_gauges().items():
                family = GaugeMetricFamily(name, doc, labels=list(labels))
                for values, value in rows:
                    family.add_metric(list(values), value)
                yield family

    @app.get("/metrics")
    def metrics() -> Response:
        _m()  # every series exists (at zero) from the first scrape
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
            data = generate_latest(registry)
        else:
            data = generate_latest(REGISTRY)
        from_db = CollectorRegistry()
        from_db.register(DbCollector())
        return Response(data + generate_latest(from_db), mimetype=CONTENT_TYPE_LATEST)


def now() -> float:
    return time.perf_counter()
