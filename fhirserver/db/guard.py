"""Who may read stored rows unfiltered while a request is served.

Inside a request (the pipeline enters `request_scope`) every read of stored content -- the
repository's `read`, `current`, `load_current` and `history`, the access records' `read` and
`load`, and the search executor -- raises `UnboundRead` unless it runs

- inside the request's access gate (`access/gate.py`: `bound`), which ANDs the request's access
  predicates into the statement, or
- inside a named system path (`system_path("$erase")`): the few interactions that must see rows
  regardless of the caller's view (erasure, the minors' rule, the sequencer) and are audited as
  themselves.

Outside a request (the CLI, the export worker's own loop, migrations) nothing is checked here:
those callers build a gate where they act for a caller (the export worker does). So a handler
that reads around the gate fails at once -- in tests, `tests/functional/pipeline/test_access_gate.py`
-- instead of leaking quietly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

_STATE: ContextVar[str | None] = ContextVar("fhirserver_access_state", default=None)
REQUEST = "request"
GATE = "gate"


class UnboundRead(RuntimeError):
    """Stored content was read inside a request without the request's access gate."""


def check(what: str) -> None:
    """Raise UnboundRead when called inside a request but outside the gate and system paths."""
    if _STATE.get() == REQUEST:
        raise UnboundRead(f"{what} read outside the access gate during a request")


@contextmanager
def _state(value: str) -> Iterator[None]:
    token = _STATE.set(value)
    try:
        yield
    finally:
        _STATE.reset(token)


def request_scope() -> AbstractContextManager[None]:
    """The pipeline serves a request: unfiltered reads are refused from here on."""
    return _state(REQUEST)


def bound() -> AbstractContextManager[None]:
    """Reads made by the access gate (its predicates are in every statement)."""
    return _state(GATE)


def system_path(name: str) -> AbstractContextManager[None]:
    """A named path that reads regardless of the caller's view (erasure, the minors' rule...)."""
    return _state(f"system:{name}")


def current() -> str | None:
    return _STATE.get()
