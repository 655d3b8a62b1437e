"""number: a decimal, matched with the FHIR prefixes and the precision of the search value."""

from __future__ import annotations

from sqlalchemy import ColumnElement, FromClause

from ..params import SearchParam
from ..values import IndexRows, number_of
from .common import Keys, no_modifier
from .quantity import quantity_cond


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    number = number_of(value)
    if number is not None:
        out.add("number", param=p.code, value=number)


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    no_modifier("number", modifier, key)
    return quantity_cond("number", t.c.value, None, None, value, key)
