"""Structured logs: one JSON object per line on stderr, and one access line per /fhir request.

Nothing that identifies a patient is ever logged: the access line carries the request id, the
method, the interaction and resource type, the status, the duration and the client id -- never
the query string, the body, a resource id or a name; an exception is logged as its types and
frames, never its message. gunicorn's own error log (a worker that failed to boot) goes through
the same formatter (`GunicornLogger`). The request id ties a line to its AuditEvent,
which is where the who-saw-what lives (encrypted, access-controlled).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
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
        if record.exc_info and record.exc_info[1] is not None:
            out["exception"] = exception_summary(record.exc_info[1])
        return json.dumps(out, separators=(",", ":"))


def exception_summary(exc: BaseException) -> dict[str, Any]:
    """What an operator needs of an exception without what may hold patient data: the types of
    the exception and of its causes, and the frames (file, line, function) -- never the message
    (a database error quotes the values of its statement; a validation error, the field's value)
    nor the source lines or locals of the frames."""
    chain: list[str] = []
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and len(chain) < 8:
        seen.add(id(cause))
        chain.append(f"{type(cause).__module__}.{type(cause).__qualname__}")
        cause = cause.__cause__ or cause.__context__
    frames = [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)]
    return {"type": chain[0], "caused_by": chain[1:], "frames": frames[-30:]}


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


def gunicorn_logger() -> type:
    """gunicorn's logger class with its error log as JSON lines through JsonFormatter: the
    tracebacks gunicorn logs itself (a worker that failed to boot) carry exception messages."""
    from gunicorn.glogging import Logger

    class GunicornLogger(Logger):
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for handler in self.error_log.handlers:
                handler.setFormatter(JsonFormatter())

    return GunicornLogger
