"""Kept compiled statements, run on the transaction's DB-API cursor.

SQLAlchemy finds a statement's compiled form by walking the whole statement into a cache key at
every execution (~90 us for the access gate's read statement) and then runs ~40 us of execution
machinery around a ~12 us cursor call. The access gate's hottest statements have one shape per
caller: here the compiled SQL is kept under a key the caller gives -- the statement's name and
the cache keys *and bound values* of the parts that vary (the caller's predicates, see
`clause_key`) -- and later executions bind only the request's own values (the resource type and
id) and run on the cursor. With every bound value in the key, a kept entry's SQL and constants
are exactly what compiling that statement again would produce.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ClauseElement, Connection

from . import raw
from .rows import AnyRow

if TYPE_CHECKING:
    from sqlalchemy.sql.compiler import SQLCompiler

DEFAULT_SIZE = 2048  # kept statements per Services (an LRU: callers with many distinct predicate sets cycle)


def _hashable(value: object) -> object:
    if isinstance(value, list | set | frozenset):
        return tuple(_hashable(v) for v in value)
    return value


def clause_key(clauses: Sequence[ClauseElement | None]) -> Hashable | None:
    """A key for `clauses` that differs whenever their compiled SQL or any bound value would:
    each clause's SQLAlchemy cache key (its structure) with the values of its bound parameters.
    None when a clause cannot be cached (SQLAlchemy says so, or a value is not hashable)."""
    parts: list[Any] = []
    for clause in clauses:
        if clause is None:
            parts.append(None)
            continue
        ck = clause._generate_cache_key()
        if ck is None:
            return None
        parts.append((ck.key, tuple(_hashable(b.effective_value) for b in ck.bindparams)))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


@dataclass
class _Entry:
    sql: str
    names: tuple[str, ...] | None  # positional drivers: each placeholder's parameter name; None: named
    constants: dict[str, Any]  # every value the statement fixes (processed for the driver)
    processors: Mapping[str, Callable[[Any], Any]]
    used: frozenset[str]  # the request's parameters the statement has
    # rows are namedtuples of the cursor's column labels (made at the first execution)
    make_row: Callable[[Sequence[object]], tuple[object, ...]] | None = field(default=None)


class CompiledStatements:
    """An LRU of compiled statements for one engine's dialect (one per Services)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, conn: Connection, key: Hashable, build: Callable[[], ClauseElement],
               request: Sequence[str]) -> _Entry:
        full = (conn.dialect.name, key)
        with self._lock:
            entry = self._entries.get(full)
            if entry is not None:
                self._entries.move_to_end(full)
                return entry
        compiled = cast("SQLCompiler", build().compile(dialect=conn.dialect))
        used = tuple(n for n in request if n in compiled.binds)
        # the predicates' IN lists rendered inline (their values are part of the key)
        state = compiled.construct_expanded_state(dict.fromkeys(used))
        processors = dict(state.processors)
        constants = {name: processors[name](v) if name in processors and v is not None else v
                     for name, v in state.parameters.items() if name not in used}
        names = tuple(state.positiontup) if compiled.positional and state.positiontup is not None else None
        entry = _Entry(state.statement, names, constants, {n: processors[n] for n in used if n in processors},
                       frozenset(used))
        with self._lock:
            self._entries[full] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry

    def _run(self, conn: Connection, key: Hashable, build: Callable[[], ClauseElement],
             params: Mapping[str, Any]) -> tuple[raw.Cursor, Callable[[Sequence[object]], tuple[object, ...]]]:
        entry = self._entry(conn, key, build, tuple(params))
        values = dict(entry.constants)
        for name, value in params.items():
            if name not in entry.used:
                continue
            proc = entry.processors.get(name)
            values[name] = proc(value) if proc is not None and value is not None else value
        bound = tuple(values[n] for n in entry.names) if entry.names is not None else values
        cursor = raw.execute_compiled(conn, entry.sql, bound)
        if entry.make_row is None:
            entry.make_row = namedtuple("Row", [d[0] for d in cursor.description], rename=True)._make  # type: ignore[misc,attr-defined]
        return cursor, entry.make_row

    def first(self, conn: Connection, key: Hashable, build: Callable[[], ClauseElement],
              params: Mapping[str, Any]) -> AnyRow | None:
        """The first row or None. Rows are namedtuples: read by column label or position, as a
        SQLAlchemy Row is (typed as one for its callers; `_mapping` it has not)."""
        cursor, make = self._run(conn, key, build, params)
        try:
            found = cursor.fetchone()
        finally:
            cursor.close()
        return None if found is None else cast("AnyRow", make(found))

    def all(self, conn: Connection, key: Hashable, build: Callable[[], ClauseElement],
            params: Mapping[str, Any]) -> list[AnyRow]:
        cursor, make = self._run(conn, key, build, params)
        try:
            return [cast("AnyRow", make(r)) for r in cursor.fetchall()]
        finally:
            cursor.close()
