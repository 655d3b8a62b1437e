"""Search parameter types, one module per type, each holding both halves of its semantics: the
index rows a value of a resource produces on write (`index`) and the SQL condition one search
value becomes (`condition`). The indexer and the compiler dispatch on `SearchParam.type` through
TYPES; a new type is a new module here and a line in TYPES."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import ColumnElement, FromClause

from ..params import SearchParam
from ..values import IndexRows
from . import composite, date, number, quantity, reference, string, token, uri
from .common import Keys


class ParamType(Protocol):
    def index(self, keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None: ...

    def condition(self, keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str,
                  key: str) -> ColumnElement[bool]: ...


TYPES: dict[str, ParamType] = {
    "token": token, "string": string, "date": date, "reference": reference, "quantity": quantity,
    "number": number, "uri": uri, "composite": composite,
}
