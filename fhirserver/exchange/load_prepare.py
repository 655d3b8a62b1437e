"""The CPU-heavy half of a load, run in worker processes: parse, validate, label and index items
(`prepare_items`); the single writer in the main process encrypts and commits them."""

from __future__ import annotations

import signal
from typing import Any

from ..config import Settings
from ..crypto.datakeys import DataKeyStore
from ..fhir.errors import FhirError
from ..services import Services
from ..storage.codec import DuplicateKeyError, parse_json
from ..storage.repository import PreparedWrite
from .sources import NO_RESOURCE, derived_id


def kept_types(svc: Services) -> frozenset[str]:
    """Types a load stores: the server's registry minus what only the server writes (AuditEvent)."""
    return frozenset(t.name for t in svc.types if not t.server_written
                     and (t.supports("create") or t.supports("update")))


Outcome = tuple[int, str, str, PreparedWrite | None]


def prepare_items(svc: Services, kept: frozenset[str], sha: str, items: list[tuple[int, Any]]) -> list[Outcome]:
    """Parse, validate and prepare (labels, indexes, data key) one chunk of items."""
    out: list[Outcome] = []
    for index, payload in items:
        if payload is None:
            out.append((index, "skip", NO_RESOURCE, None))
            continue
        if isinstance(payload, str):
            out.append((index, "invalid", payload, None))
            continue
        res = payload
        if isinstance(payload, bytes):
            if not payload.strip():
                out.append((index, "blank", "", None))
                continue
            try:
                res = parse_json(payload)
            except DuplicateKeyError as exc:
                out.append((index, "invalid", f"the line repeats a property: {exc}", None))
                continue
            except (ValueError, UnicodeDecodeError, RecursionError):
                out.append((index, "invalid", "not valid JSON", None))
                continue
        if not isinstance(res, dict):
            out.append((index, "invalid", "not a JSON object", None))
            continue
        rtype = res.get("resourceType")
        if not isinstance(rtype, str):
            out.append((index, "invalid", "resourceType is missing", None))
            continue
        if rtype not in kept:
            out.append((index, "skip", rtype, None))
            continue
        if "id" not in res:
            res["id"] = derived_id(sha, index)
        try:
            svc.validator.validate(res, rtype)
            prepared = svc.repo.prepare(rtype, res)
        except FhirError as exc:
            issue = exc.issues[0]
            where = f" ({', '.join(issue.expression)})" if issue.expression else ""
            out.append((index, "invalid", f"{rtype}: {issue.diagnostics}{where}", None))
            continue
        out.append((index, "ok", rtype, prepared))
    return out


_WORKER: tuple[Services, frozenset[str]] | None = None


class _DeferredKeys:
    """Data keys as a worker's repository sees them: patient keys are left to the writer.

    A worker creating a new patient's key would need the database write lock, which the writer
    holds most of the time (on SQLite that serialized the workers behind every batch); the
    writer assigns them before its transaction instead (`_commit`). Other keys (the blind-index
    key of the indexer, the shared key) come from the real store."""

    def __init__(self, keys: DataKeyStore) -> None:
        self._keys = keys

    def ensure(self, scope: str) -> tuple[int, bytes]:
        if scope.startswith("patient:"):
            return 0, b""
        return self._keys.ensure(scope)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._keys, name)


def _init_worker(settings: Settings) -> None:
    """Worker process: its own services (engine, validator, indexer); Ctrl-C is the main process's."""
    global _WORKER
    from ..services import build_services

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    svc = build_services(settings)
    svc.repo.keys = _DeferredKeys(svc.keys)  # type: ignore[assignment]
    _WORKER = (svc, kept_types(svc))


def _started() -> None:
    """A no-op task: submitting it starts a worker process (and its initializer) right away."""


def _worker_chunk(sha: str, items: list[tuple[int, Any]]) -> list[Outcome]:
    assert _WORKER is not None
    svc, kept = _WORKER
    out = prepare_items(svc, kept, sha, items)
    for outcome in out:
        prepared = outcome[3]
        if prepared is not None:
            prepared.key_id, prepared.key = 0, b""  # keys do not cross the pipe; the writer assigns them
    return out
