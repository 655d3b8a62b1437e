"""Run a compiled search: one statement for the page (keyset over the sort keys), one for the
total, both with the caller's access predicates inside."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    and_,
    func,
    or_,
    select,
)

from ..db import guard
from ..db.rows import AnyRow
from .compiler import BROAD_CLAUSE_ROWS, QueryCompiler
from .cursor import encode_cursor
from .model import AccessFn, ParsedSearch, SearchPage
from .sources import source_of


def _after(keys: list[tuple[Any, bool]], values: list[Any], pk_col: ColumnElement[Any], pk: int, forward: bool) -> ColumnElement[bool]:
    """Rows strictly after (forward) or before (backward) the cursor in the sort order."""
    terms = []
    for i in range(len(keys) + 1):
        eqs = [keys[j][0] == values[j] for j in range(i)]
        if i < len(keys):
            expr, desc = keys[i]
            greater = (expr < values[i]) if desc else (expr > values[i])
            less = (expr > values[i]) if desc else (expr < values[i])
            terms.append(and_(*eqs, greater if forward else less))
        else:
            terms.append(and_(*eqs, (pk_col > pk) if forward else (pk_col < pk)))
    return or_(*terms)


def run_search(
    conn: Connection,
    parsed: ParsedSearch,
    compiler: QueryCompiler,
    access: list[ColumnElement[bool]],
    access_fn: AccessFn | None = None,
    extra: Sequence[ColumnElement[bool]] = (),
    res: FromClause | None = None,
) -> SearchPage:
    """Run the search: exact total (unless _total=none) and one keyset page. Inside a request
    only the access gate runs it (db/guard.py): `access` is what makes it the caller's."""
    guard.check("run_search")
    res = source_of(parsed.resource_type).res if res is None else res
    where, driver = compiler.compile(parsed, res, access_fn)
    if driver is not None and driver.probe is not None:
        # A broad driving clause (e.g. category=laboratory) is cheaper as a probe on each row in
        # pk order, which stops at the page size, than as a materialized list of every match.
        probe = driver.probe.limit(BROAD_CLAUSE_ROWS).subquery()
        if conn.execute(select(func.count()).select_from(probe)).scalar_one() >= BROAD_CLAUSE_ROWS:
            where, driver = compiler.compile(parsed, res, access_fn, drive=False)
    driven = driver is not None and driver.rank > 0
    conds = [res.c.deleted.is_(False), *where, *access, *extra]
    if parsed.resource_type != "*":  # "*": several types, constrained by `extra`
        # With a driving clause, keep SQLite from preferring the (unselective) type index.
        type_col = res.c.type.concat("") if driven else res.c.type
        conds.insert(0, type_col == parsed.resource_type)
    total = None
    wanted = parsed.total in ("accurate", "estimate") or (parsed.total == "auto" and parsed.cursor is None)
    if wanted or parsed.summary == "count":
        total = conn.execute(select(func.count()).select_from(res).where(*conds)).scalar_one()
    if parsed.summary == "count" or parsed.count == 0:
        return SearchPage([], total, None, None)
    keys = compiler.sort_expressions(parsed, res)
    forward = parsed.cursor is None or parsed.cursor.forward
    page_conds = list(conds)
    if parsed.cursor is not None:
        page_conds.append(_after(keys, parsed.cursor.values, res.c.pk, parsed.cursor.pk, forward))
    order = []
    for expr, desc in keys:
        order.append(expr.desc() if desc == forward else expr.asc())
    order.append(res.c.pk.asc() if forward else res.c.pk.desc())
    stmt = select(res.c.pk, *[expr.label(f"k{i}") for i, (expr, _d) in enumerate(keys)]) \
        .where(*page_conds).order_by(*order).limit(parsed.count + 1)
    rows = list(conn.execute(stmt).all())
    more = len(rows) > parsed.count
    rows = rows[: parsed.count]
    if not forward:
        rows.reverse()
    pks = [r[0] for r in rows]

    def cur(row: AnyRow, fwd: bool) -> str:
        return encode_cursor(fwd, [row[i + 1] for i in range(len(keys))], row[0])

    next_cursor = prev_cursor = None
    if rows:
        if (forward and more) or (not forward and parsed.cursor is not None):
            next_cursor = cur(rows[-1], True)
        if (not forward and more) or (forward and parsed.cursor is not None):
            prev_cursor = cur(rows[0], False)
    return SearchPage(pks, total, next_cursor, prev_cursor)
