"""token: codes with an optional system (Coding, CodeableConcept, Identifier, ContactPoint, code,
boolean); protected parameters (identifiers of people) are stored as keyed digests; `:text`
searches the display texts, indexed as strings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, FromClause, and_

from ...fhir.errors import FhirError
from ..params import SearchParam
from ..values import IndexRows, token_pairs, token_texts
from . import string
from .common import Keys, no_modifier


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    for system, code in token_pairs(value):
        if p.protected:
            code = keys.blind.digest(p.code, "t", code)
        out.add("token", param=p.code, system=system, code=code[:255] if code else code)
    if isinstance(value, dict) and isinstance(value.get("value"), str) and isinstance(value.get("type"), dict):
        # an Identifier with a type: `:of-type=type-system|type-code|value`, as a keyed digest
        for coding in value["type"].get("coding", []):
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                typed = f"{coding.get('system') or ''}|{coding['code']}|{value['value']}"
                out.add("string", param=f"{p.code}:of-type", kind="o", value=keys.blind.digest(p.code, "o", typed))
    if p.text_index:
        for text in token_texts(value):
            string.add_string(keys, out, f"{p.code}:text", text, True)


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    if modifier == "of-type":
        parts = value.split("|")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise FhirError(400, "invalid", ":of-type takes type-system|type-code|value", [key])
        return and_(t.c.kind == "o", t.c.value == keys.blind.digest(p.code, "o", value))
    no_modifier("token", modifier, key)
    return token_cond(keys, p, t.c.system, t.c.code, value, key)


def token_cond(keys: Keys, p: SearchParam, system_col: ColumnElement[Any], code_col: ColumnElement[Any], value: str, key: str,
               protected: bool | None = None) -> ColumnElement[bool]:
    system: str | None
    system, bar, code = value.partition("|")
    if not bar:
        system, code = None, value
    if (p.protected if protected is None else protected) and code:
        code = keys.blind.digest(p.code, "t", code)
    conds = []
    if bar:
        conds.append(system_col.is_(None) if system == "" else system_col == system)
    if code:
        conds.append(code_col == code)
    if not conds:
        raise FhirError(400, "invalid", f"Empty token for '{p.code}'", [key])
    return and_(*conds)
