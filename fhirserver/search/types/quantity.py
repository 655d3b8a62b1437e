"""quantity: a number with an optional system and code (`[prefix]number|system|code`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, FromClause, and_

from ..params import SearchParam
from ..values import IndexRows, number_of
from .common import Keys, no_modifier, number_cond, prefix_of


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    if not isinstance(value, dict):
        return
    number = number_of(value.get("value"))
    if number is not None:
        out.add("quantity", param=p.code, value=number, system=value.get("system"),
                code=value.get("code") or value.get("unit"))


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    no_modifier("quantity", modifier, key)
    return quantity_cond("quantity", t.c.value, t.c.system, t.c.code, value, key)


def quantity_cond(ptype: str, value_col: ColumnElement[Any], system_col: ColumnElement[Any] | None,
                  code_col: ColumnElement[Any] | None, value: str,
                  key: str) -> ColumnElement[bool]:
    prefix, text = prefix_of(value)
    number, _, rest = text.partition("|")
    cond = number_cond(prefix, number, value_col, key)
    if ptype == "quantity" and rest and system_col is not None and code_col is not None:
        system, _, code = rest.partition("|")
        if system:
            cond = and_(cond, system_col == system)
        if code:
            cond = and_(cond, code_col == code)
    return cond
