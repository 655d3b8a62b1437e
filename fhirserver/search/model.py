"""The parsed form of a search: clauses, includes, sort keys, cursors and the page a search
returns, plus the vocabulary shared by the parser and the compiler.

Access restrictions (scopes, compartments, consent) arrive as SQL predicates over the resource
table (`AccessFn`) and are ANDed into the same statement -- also inside chained, `_has` and
included sub-queries, each against its own table alias -- so totals and pages are exact and
nothing is matched through a resource the caller may not see.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
)

from .params import SearchParam

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMS = {"_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude",
                 "_contained", "_containedType", "_format", "_pretty", "_cursor"}
_SPLIT = re.compile(r"(?<!\\),")
MAX_CHAIN_DEPTH = 3

# access(resource_type, table alias) -> predicates, or None when the caller may not read that type
AccessFn = Callable[[str, FromClause], "list[ColumnElement[bool]] | None"]


@dataclass
class Clause:
    code: str
    modifier: str | None
    values: list[str]
    param: SearchParam | None  # None for _id / _lastUpdated / _has
    chain: tuple[str, ParsedSearch] | None = None  # (target type, nested search on it)
    has: tuple[str, str, ParsedSearch] | None = None  # (source type, reference param, nested)


@dataclass
class Include:
    source_type: str
    param: str
    target_type: str | None
    reverse: bool
    iterate: bool


@dataclass
class SortKey:
    code: str
    descending: bool
    param: SearchParam | None


@dataclass
class Cursor:
    forward: bool
    values: list[Any]
    pk: int


@dataclass
class ParsedSearch:
    resource_type: str
    clauses: list[Clause] = field(default_factory=list)
    count: int = 20
    cursor: Cursor | None = None
    total: str = "auto"  # auto: count on the first page only; accurate: every page; none: never
    summary: str | None = None
    elements: list[str] | None = None
    sort: list[SortKey] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    echo: list[tuple[str, str]] = field(default_factory=list)  # params as understood, for links


@dataclass
class SearchPage:
    pks: list[int]
    total: int | None
    next_cursor: str | None
    prev_cursor: str | None


def split_values(raw: str) -> list[str]:
    return [v.replace("\\,", ",") for v in _SPLIT.split(raw)]
