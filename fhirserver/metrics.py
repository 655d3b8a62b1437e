"""Prometheus metrics at /metrics (prometheus-client), correct under gunicorn's worker processes.

Labels are the interaction, the resource type and the HTTP status -- never an id, a query value
or anything else that could name a patient. `serve` points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers fork (wsgi.run_gunicorn), so each worker writes its own files and a scrape of any
worker aggregates them all; a process without it (tests, `gunicorn fhirserver.wsgi:app()`
without the variable) serves its own registry.
"""

from __future__ import annotations

import os

from flask import Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("fhirserver_requests_total", "FHIR requests answered", ["interaction", "resource_type", "status"])
LATENCY = Histogram("fhirserver_request_seconds", "Time to answer a FHIR request (audit commit included)",
                    ["interaction"], buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))


def observe(interaction: str, resource_type: str | None, status: int, seconds: float) -> None:
    REQUESTS.labels(interaction, resource_type or "-", str(status)).inc()
    LATENCY.labels(interaction).observe(seconds)


def install(app: Flask) -> None:
    @app.get("/metrics")
    def metrics() -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            data = generate_latest(registry)
        else:
            data = generate_latest()
        return Response(data, mimetype=CONTENT_TYPE_LATEST)
