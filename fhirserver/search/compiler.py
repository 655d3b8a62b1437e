"""Compile a ParsedSearch into SQL conditions over the index tables: one condition per clause,
ordered so the most selective one drives the query (the planner), and the sort expressions."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Select,
    exists,
    false,
    func,
    literal,
    or_,
    select,
)

from ..crypto.blind_index import BlindIndexer
from ..fhir.dates import MAX_US, MIN_US
from ..fhir.errors import FhirError
from .model import AccessFn, Clause, ParsedSearch
from .params import ParamRegistry, SearchParam
from .sources import source_of
from .types import TYPES
from .types.date import date_cond
from .types.string import string_cond

NEVER_DRIVES = 100
DIGEST_MODIFIERS = ("text", "identifier", "of-type")  # answered from keyed digests in idx_string
BROAD_CLAUSE_ROWS = 1000


# ------------------------------------------------------------------------------- aliases
# Every clause probes an index table through an alias of its own. A fresh `table.alias()` and its
# first `.c` cost ~80-300 us (SQLAlchemy builds the alias's column collection), more than the rest
# of compiling a clause: within one top-level compile the n-th alias of a table is instead taken
# from a process-wide pool. Aliases must differ along any nesting path (a sub-select would
# otherwise correlate to its parent's alias of the same name): the count runs across the whole
# top-level compile, nested compiles (chains, `_has`, the access predicates of their targets)
# included. Separate top-level compiles are only ever combined side by side (AND/OR of
# sub-selects, each with its own FROM), where a shared alias name is harmless. Outside a compile
# (and past _POOL_DEPTH aliases of one table) aliases are fresh.
_POOL_DEPTH = 32
_pool: dict[tuple[str, FromClause, int], FromClause] = {}
_pool_lock = threading.Lock()
_counts: ContextVar[dict[tuple[str, FromClause], int] | None] = ContextVar("alias_counts", default=None)
_FRESH: dict[tuple[str, FromClause], int] = {}  # the count inside `fresh_aliases`: none is pooled


@contextmanager
def alias_scope() -> Iterator[None]:
    """Pooled aliases for the statement parts built inside; the outermost scope counts."""
    if _counts.get() is not None:
        yield
        return
    token = _counts.set({})
    try:
        yield
    finally:
        _counts.reset(token)


@contextmanager
def fresh_aliases() -> Iterator[None]:
    """Fresh aliases inside, even within a compile: for statement parts that are kept and reused
    in other statements (a scope's compiled restriction), which must never share a pooled alias."""
    token = _counts.set(_FRESH)
    try:
        yield
    finally:
        _counts.reset(token)


def alias_of(table: FromClause, space: str = "where") -> FromClause:
    """An alias of `table` distinct from every other one taken in the current top-level compile
    (`space` keeps the sort keys' aliases apart from the conditions')."""
    counts = _counts.get()
    if counts is None or counts is _FRESH:
        return table.alias()
    n = counts.get((space, table), 0)
    counts[(space, table)] = n + 1
    if n >= _POOL_DEPTH:
        return table.alias()
    key = (space, table, n)
    found = _pool.get(key)
    if found is None:
        made = table.alias()
        made.c  # noqa: B018 -- build the column collection before another thread can see it
        with _pool_lock:
            found = _pool.setdefault(key, made)
    return found


@dataclass
class Term:
    """One compiled clause: `build(drive)` gives the IN form (drive=True) or the EXISTS form."""

    rank: int  # lower = expected to be more selective; >= NEVER_DRIVES never drives
    build: Callable[[bool], ColumnElement[bool]]
    probe: Select[Any] | None = None  # the IN form's sub-select, to measure how broad the clause is


def _semi(res: FromClause, t: FromClause, conds: list[ColumnElement[bool]], rank: int, negate: bool = False) -> Term:
    def build(drive: bool) -> ColumnElement[bool]:
        if negate:
            return ~exists().where(t.c.resource_pk == res.c.pk, *conds)
        if drive:
            return res.c.pk.in_(select(t.c.resource_pk).where(*conds))
        return exists().where(t.c.resource_pk == res.c.pk, *conds)

    return Term(rank, build, None if negate else select(t.c.resource_pk).where(*conds))


# ------------------------------------------------------------------------------- compiling
class QueryCompiler:
    def __init__(self, blind: BlindIndexer, base_url: str, registry: ParamRegistry) -> None:
        self.blind = blind
        self.base_url = base_url.rstrip("/")
        self.registry = registry

    def where(self, parsed: ParsedSearch, res: FromClause | None = None,
              access: AccessFn | None = None) -> list[ColumnElement[bool]]:
        return self.compile(parsed, res, access)[0]

    def compile(self, parsed: ParsedSearch, res: FromClause | None = None, access: AccessFn | None = None,
                drive: bool = True) -> tuple[list[ColumnElement[bool]], Term | None]:
        """SQL conditions for the clauses, and whether one of them drives the query.

        The most selective positive clause becomes `pk IN (SELECT resource_pk ...)`, from which
        SQLite starts; every other clause is a correlated EXISTS probed per candidate row through
        the index tables' resource_pk index. (SQLite would otherwise materialize every IN list in
        full, e.g. all vital-signs Observations.) PostgreSQL plans both forms as semi-joins.
        `drive=False`: no driving clause (run_search uses it when the best clause is broad).
        Returns the conditions and the driving term (None when the resource table drives).
        """
        res = source_of(parsed.resource_type).res if res is None else res
        with alias_scope():
            terms = [self._clause(parsed.resource_type, c, res, access) for c in parsed.clauses]
        drivers = [t for t in terms if t.rank < NEVER_DRIVES and drive]
        driver = min(drivers, key=lambda t: t.rank) if drivers else None
        return [t.build(t is driver) for t in terms], driver

    def _nested(self, target: str, nested: ParsedSearch, access: AccessFn | None) -> tuple[FromClause, list[ColumnElement[bool]]] | None:
        alias = alias_of(source_of(target).res)
        preds: list[ColumnElement[bool]] = [alias.c.type == target, alias.c.deleted.is_(False)]
        if access is not None:
            allowed = access(target, alias)
            if allowed is None:
                return None
            preds.extend(allowed)
        preds.extend(self.where(nested, alias, access))
        return alias, preds

    def _clause(self, rtype: str, c: Clause, res: FromClause, access: AccessFn | None) -> Term:
        if c.code == "_id":
            if c.modifier == "not":
                return Term(NEVER_DRIVES, lambda _d: res.c.id.not_in(c.values))
            return Term(0, lambda _d: res.c.id.in_(c.values))  # the (type, id) index drives
        if c.code == "_lastUpdated":
            cond = or_(*[date_cond(v, res.c.last_updated_us, res.c.last_updated_us, "_lastUpdated")
                         for v in c.values])
            return Term(NEVER_DRIVES, lambda _d: cond)
        if c.has is not None:
            source, ref_param, nested = c.has
            built = self._nested(source, nested, access)
            if built is None:
                return Term(NEVER_DRIVES, lambda _d: false())
            alias, preds = built
            ref = alias_of(source_of(source).tables["reference"])
            has_conds = [ref.c.param == ref_param, ref.c.target_type == rtype, *preds]
            return Term(NEVER_DRIVES, lambda _d: exists().where(
                alias.c.pk == ref.c.resource_pk, ref.c.target_id == res.c.id, *has_conds))
        p = c.param
        assert p is not None
        if c.chain is not None:
            target, nested = c.chain
            built = self._nested(target, nested, access)
            if built is None:
                return Term(NEVER_DRIVES, lambda _d: false())
            alias, preds = built
            ref = alias_of(source_of(rtype).tables["reference"])
            conds = [ref.c.param == p.code, ref.c.target_type == target,
                     ref.c.target_id.in_(select(alias.c.id).where(*preds))]
            return _semi(res, ref, conds, 3)
        tables = source_of(rtype).tables
        if p.type == "composite":
            table = tables["composite"]
        elif (p.protected and p.type == "date") or c.modifier in DIGEST_MODIFIERS:
            table = tables["string"]
        else:
            table = tables[p.type]
        t = alias_of(table)
        param_code = f"{p.code}:{c.modifier}" if c.modifier in DIGEST_MODIFIERS else p.code
        base = [t.c.param == param_code]
        if c.modifier == "missing":
            if c.values not in (["true"], ["false"]):
                raise FhirError(400, "invalid", ":missing takes true or false", [f"{p.code}:missing"])
            return _semi(res, t, base, NEVER_DRIVES, negate=c.values == ["true"])
        if p.type == "composite":
            alternatives = [self._value_cond(p, t, c.modifier, v) for v in c.values]
            return _semi(res, t, [*base, or_(*alternatives)], 2)
        negate = False
        modifier = c.modifier
        if modifier == "not" and p.type == "token":
            negate, modifier = True, None
        conds = [*base, or_(*[self._value_cond(p, t, modifier, v) for v in c.values])]
        if negate:
            return _semi(res, t, conds, NEVER_DRIVES, negate=True)
        if p.type == "reference" or p.protected or p.type == "uri":
            rank = 1  # a specific target id or a keyed digest of an identifying value
        elif p.type == "token" or c.modifier == "text" or p.type == "string":
            rank = 2
        else:
            rank = NEVER_DRIVES - 1  # ranges: drive only if nothing better
        return _semi(res, t, conds, rank)

    def _value_cond(self, p: SearchParam, t: FromClause, modifier: str | None, value: str) -> ColumnElement[bool]:
        key = f"{p.code}:{modifier}" if modifier else p.code
        if modifier == "text":
            if p.type != "token" or not p.text_index:
                raise FhirError(400, "not-supported", f":text is not indexed for '{p.code}'", [key])
            return string_cond(self, f"{p.code}:text", True, value, key, t)
        kind = TYPES.get(p.type)
        if kind is None:
            raise FhirError(400, "not-supported", f"Parameter type {p.type} is not supported", [key])
        return kind.condition(self, p, t, modifier, value, key)

    # ---- sorting
    def sort_expressions(self, parsed: ParsedSearch, res: FromClause) -> list[tuple[Any, bool]]:
        """(SQL expression, descending) per sort key; missing values sort last either way."""
        with alias_scope():
            return self._sort_expressions(parsed, res)

    def _sort_expressions(self, parsed: ParsedSearch, res: FromClause) -> list[tuple[Any, bool]]:
        out: list[tuple[Any, bool]] = []
        for key in parsed.sort:
            if key.code == "_lastUpdated":
                out.append((res.c.last_updated_us, key.descending))
                continue
            if key.code == "_id":
                out.append((res.c.id, key.descending))
                continue
            p = key.param
            assert p is not None
            t = alias_of(source_of(parsed.resource_type).tables[p.type], "sort")
            sentinel: float | str
            if p.type == "date":
                col, sentinel = (t.c.high_us, MIN_US) if key.descending else (t.c.low_us, MAX_US)
            elif p.type in ("number", "quantity"):
                col, sentinel = t.c.value, (-1e308 if key.descending else 1e308)
            elif p.type == "reference":
                col, sentinel = t.c.target_id, ("" if key.descending else "\uffff")
            elif p.type == "token":
                col, sentinel = t.c.code, ("" if key.descending else "\uffff")
            else:
                col, sentinel = t.c.value, ("" if key.descending else "\uffff")
            agg = func.max(col) if key.descending else func.min(col)
            sub = select(agg).where(t.c.resource_pk == res.c.pk, t.c.param == p.code).scalar_subquery()
            out.append((func.coalesce(sub, literal(sentinel)), key.descending))
        return out


