"""Structured logs: one JSON object per line on stderr, and one access line per /fhir request.

Nothing that identifies a patient is ever logged: the access line carries the request id, the
method, the interaction and resource type, the status, the duration and the client id -- never
the query string, the body, a resource id or a name. The request id ties a line to its AuditEvent,
which is where the who-saw-what lives (encrypted, access-controlled).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ACCESS = logging.getLogger("fhirserver.access")
_FIELDS = ("request_id", "method", "interaction", "resource_type", "status", "duration_ms", "client_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
                               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in _FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, separators=(",", ":"))


def configure(level: str) -> None:
    """JSON lines for the `fhirserver` loggers at `level` (idempotent: one handler per process)."""
    logger = logging.getLogger("fhirserver")
    logger.setLevel(level.upper())
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.propagate = False


def access(request_id: str, method: str, interaction: str, resource_type: str | None, status: int,
           seconds: float, client_id: str | None) -> None:
    ACCESS.info("request", extra={"request_id": request_id, "method": method, "interaction": interaction,
                                  "resource_type": resource_type, "status": status,
                                  "duration_ms": round(seconds * 1000, 2), "client_id": client_id})
