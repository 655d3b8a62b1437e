"""composite: two components joined by `$` (a code and a token, quantity, date or string), indexed
together so both must hold for the same element (e.g. one blood-pressure component)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, FromClause, and_

from ...crypto.blind_index import normalize
from ...fhir.errors import FhirError
from ..params import SearchParam
from ..values import IndexRows, date_ranges, number_of, token_pairs
from .common import Keys
from .date import date_cond
from .quantity import quantity_cond
from .token import token_cond


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    if len(p.component_extract) != 2:
        return
    node = [(value, node_type)]
    seconds = p.component_extract[1](node)
    if not seconds:
        return  # most composites of a resource have no second component (value[x] is one type)
    firsts = [pair for v, _t in p.component_extract[0](node) for pair in token_pairs(v)]
    kind = p.component_types[1]
    for system, code in firsts:
        for v, _t in seconds:
            row: dict[str, Any] = {"param": p.code, "system": system, "code": code[:255], "system2": None,
                                   "code2": None, "num": None, "low_us": None, "high_us": None}
            if kind == "token":
                for s2, c2 in token_pairs(v):
                    out.add("composite", **{**row, "system2": s2, "code2": c2[:255]})
            elif kind == "quantity" and isinstance(v, dict) and number_of(v.get("value")) is not None:
                out.add("composite", **{**row, "num": number_of(v["value"]), "system2": v.get("system"),
                                        "code2": v.get("code") or v.get("unit")})
            elif kind == "date":
                for low, high in date_ranges(v):
                    out.add("composite", **{**row, "low_us": low, "high_us": high})
            elif kind == "string" and isinstance(v, str):
                out.add("composite", **{**row, "code2": keys.blind.digest(p.code, "n", normalize(v))})


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    if modifier is not None:
        raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on composite "
                                              f"parameter '{p.code}'", [key])
    kinds = p.component_types
    parts = value.split("$")
    if len(parts) != len(kinds) or len(kinds) != 2:
        raise FhirError(400, "invalid", f"'{p.code}' takes two components joined by '$'", [p.code])
    first = token_cond(keys, p, t.c.system, t.c.code, parts[0], p.code, protected=False)
    kind, second = kinds[1], parts[1]
    if kind == "token":
        cond2 = token_cond(keys, p, t.c.system2, t.c.code2, second, p.code, protected=False)
    elif kind == "quantity":
        cond2 = quantity_cond("quantity", t.c.num, t.c.system2, t.c.code2, second, p.code)
    elif kind == "date":
        cond2 = date_cond(second, t.c.low_us, t.c.high_us, p.code)
    elif kind == "string":
        cond2 = t.c.code2 == keys.blind.digest(p.code, "n", normalize(second))
    else:
        raise FhirError(400, "not-supported", f"Composite component type {kind} is not supported", [p.code])
    return and_(first, cond2)
