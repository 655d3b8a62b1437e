"""Kept compiled statements, run on the transaction's DB-API cursor.

SQLAlchemy finds a statement's compiled form by walking the whole statement into a cache key at
every execution (~90 us for the access gate's read statement, whose flags are built per caller)
and then runs ~40 us of execution machinery around a ~12 us cursor call. The access gate's
hottest statements are a fixed statement around the caller's predicates: here the compiled form
is kept under the statement's name and the predicates' own cache keys (their structure, walked
alone: a few us), and each execution binds the predicates' values -- taken from their cache keys,
in the order SQLAlchemy's own compiled cache relies on -- and the request's (type, id, pk), and
runs on the transaction's cursor. Predicates SQLAlchemy cannot key run as before.
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
    from sqlalchemy.sql.cache_key import CacheKey
    from sqlalchemy.sql.compiler import SQLCompiler

DEFAULT_SIZE = 1024  # kept statements per Services (an LRU); one per statement and predicate shape


@dataclass
class _Entry:
    compiled: SQLCompiler
    slots: list[list[str]]  # per clause: the compiled name of each of its bound parameters, in key order
    used: frozenset[str]  # the request's parameters the statement has
    # rows are namedtuples of the cursor's column labels (made at the first execution)
    make_row: Callable[[Sequence[object]], tuple[object, ...]] | None = field(default=None)
    # a statement without IN lists to expand is the same text in the same parameter order at every
    # execution: kept from the first one (with the statement's own constants, processed)
    fixed: _Fixed | None = field(default=None)


@dataclass(frozen=True)
class _Fixed:
    statement: str
    order: tuple[str, ...] | None  # positional: the parameter names in placeholder order
    processors: Mapping[str, Callable[[Any], Any]]
    constants: Mapping[str, Any]  # bound values the statement carries itself, already processed


class CompiledStatements:
    """An LRU of compiled statements for one engine (one per Services)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, _Entry | None] = OrderedDict()  # None: not keepable
        self._lock = threading.Lock()

    def first(self, conn: Connection, name: Hashable, clauses: Sequence[ClauseElement | None],
              build: Callable[[], ClauseElement], params: Mapping[str, Any]) -> AnyRow | None:
        """The first row of `build()` -- a statement around `clauses` (the caller's predicates)
        with the request's `params` -- or None. Rows are namedtuples: read by column label or
        position, as a SQLAlchemy Row is (typed as one for the callers; `_mapping` they lack)."""
        keys: list[CacheKey | None] = []
        for clause in clauses:
            ck = clause._generate_cache_key() if clause is not None else None
            if clause is not None and ck is None:
                return conn.execute(build(), params).first()  # type: ignore[call-overload,no-any-return]
            keys.append(ck)
        full = (conn.dialect.name, name, tuple(None if k is None else k.key for k in keys))
        entry = self._entry(conn, full, keys, build, tuple(params))
        if entry is None:
            return conn.execute(build(), params).first()  # type: ignore[call-overload,no-any-return]
        values: dict[str, Any] = {n: v for n, v in params.items() if n in entry.used}
        for ck, names in zip(keys, entry.slots, strict=True):
            if ck is not None:
                for bind, bind_name in zip(ck.bindparams, names, strict=True):
                    values[bind_name] = bind.effective_value
        fixed = entry.fixed
        if fixed is None:
            state = entry.compiled.construct_expanded_state(values)  # IN lists expanded for their length
            processors = state.processors
            out = {n: processors[n](v) if n in processors and v is not None else v for n, v in state.parameters.items()}
            statement, order = state.statement, state.positiontup
            if not entry.compiled.post_compile_params and set(values) <= set(out):  # no IN list, no literal
                entry.fixed = _Fixed(statement, tuple(order) if order is not None else None, processors,
                                     {n: v for n, v in out.items() if n not in values})
        else:
            kept, statement, order = fixed.processors, fixed.statement, fixed.order
            out = {**fixed.constants, **{n: kept[n](v) if n in kept and v is not None else v for n, v in values.items()}}
        bound = tuple(out[n] for n in order) if order is not None else out
        cursor = raw.execute_compiled(conn, statement, bound)
        try:
            found = cursor.fetchone()
            if entry.make_row is None:
                entry.make_row = namedtuple("Row", [d[0] for d in cursor.description], rename=True)._make  # type: ignore[misc,attr-defined]
        finally:
            cursor.close()
        return None if found is None else cast("AnyRow", entry.make_row(found))

    def _entry(self, conn: Connection, full: Hashable, keys: list[CacheKey | None],
               build: Callable[[], ClauseElement], request: Sequence[str]) -> _Entry | None:
        with self._lock:
            if full in self._entries:
                self._entries.move_to_end(full)
                return self._entries[full]
        compiled = cast("SQLCompiler", build().compile(dialect=conn.dialect))
        names = compiled.bind_names
        try:
            slots = [[names[b] for b in ck.bindparams] if ck is not None else [] for ck in keys]
            entry: _Entry | None = _Entry(compiled, slots, frozenset(n for n in request if n in compiled.binds))
        except KeyError:  # a bound value the compiled statement does not carry as such: not keepable
            entry = None
        with self._lock:
            self._entries[full] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry
