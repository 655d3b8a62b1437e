"""Index and compartment rows as raw INSERTs: the write path sends them straight to the DB-API
cursor's executemany (a write produces up to ten batches; SQLAlchemy's per-statement overhead
would otherwise dominate it)."""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Any

from ..db.schema import INDEX_TABLES, compartment
from ..search.values import IndexRows

_RAW_INSERTS: dict[str, tuple[str, list[str], Callable[[dict[str, Any]], tuple[Any, ...]]]] = {}


def raw_insert(kind: str) -> tuple[str, list[str], Callable[[dict[str, Any]], tuple[Any, ...]]]:
    """INSERT text (`?` placeholders) for an index table, the columns after resource_pk, and a
    getter of those columns (as a tuple) from a row dict."""
    if kind not in _RAW_INSERTS:
        table = compartment if kind == "compartment" else INDEX_TABLES[kind]
        columns = [c.name for c in table.columns if c.name != "resource_pk"]
        names = ", ".join(["resource_pk", *columns])
        marks = ", ".join(["?"] * (len(columns) + 1))
        getter = itemgetter(*columns) if len(columns) > 1 else (lambda row, c=columns[0]: (row[c],))
        _RAW_INSERTS[kind] = (f"INSERT INTO {table.name} ({names}) VALUES ({marks})", columns, getter)
    return _RAW_INSERTS[kind]


def index_params(pk: int, index: IndexRows) -> dict[str, list[tuple[Any, ...]]]:
    """The INSERT parameters of one resource's index and compartment rows, by `raw_insert` kind."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for kind, rows in index.rows.items():
        _sql, columns, values = raw_insert(kind)
        try:
            out[kind] = [(pk, *values(r)) for r in rows]
        except KeyError:  # a row without some optional column
            out[kind] = [(pk, *[r.get(c) for c in columns]) for r in rows]
    if index.patients:
        out["compartment"] = [(pk, pid) for pid in index.patients]
    return out
