"""date: dates, dateTimes, instants and Periods as inclusive microsecond ranges, matched with the
FHIR prefixes; protected dates (a birth date) are stored only as keyed digests of calendar
buckets (protected_date.py), which answer every prefix too."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, FromClause, and_, not_, or_

from ...clock import now_us
from ..params import SearchParam
from ..values import IndexRows, date_ranges
from . import protected_date
from .common import Keys, checked_date, no_modifier, prefix_of


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    if p.protected:
        if isinstance(value, str) and value:
            for prefix in {value[:4], value[:7], value[:10]}:  # equality on a year, month or day
                out.add("string", param=p.code, kind="d", value=keys.blind.digest(p.code, "d", prefix))
            protected_date.index(keys, out, p, value)  # every other prefix
        return
    for low, high in date_ranges(value):
        out.add("date", param=p.code, low_us=low, high_us=high)


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    if p.protected:
        no_modifier("date", modifier, key)
        prefix, text = prefix_of(value)
        if prefix != "eq" or len(text) > 10:
            return protected_date.condition(keys, p, t, value, key)
        checked_date(text, key)
        return and_(t.c.kind == "d", t.c.value == keys.blind.digest(p.code, "d", text))
    no_modifier("date", modifier, key)
    return date_cond(value, t.c.low_us, t.c.high_us, key)


def date_cond(value: str, low: ColumnElement[Any], high: ColumnElement[Any], key: str) -> ColumnElement[bool]:
    prefix, text = prefix_of(value)
    ql, qh = checked_date(text, key)
    eq = and_(low >= ql, high <= qh)
    if prefix == "eq":
        return eq
    if prefix == "ne":
        return not_(eq)
    if prefix == "gt":
        return high > qh
    if prefix == "lt":
        return low < ql
    if prefix == "ge":
        return or_(high > qh, eq)
    if prefix == "le":
        return or_(low < ql, eq)
    if prefix == "sa":
        return low > qh
    if prefix == "eb":
        return high < ql
    # ap: overlap with the search range widened by 10% of its distance from now (>= 1 day)
    margin = max(abs(now_us() - ql) // 10, 86_400_000_000)
    return and_(low <= qh + margin, high >= ql - margin)
