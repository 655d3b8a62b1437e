"""string: names, addresses and other text, stored only as keyed digests of the exact value, the
normalized value and its normalized prefixes (so starts-with and :exact work, :contains cannot)."""

from __future__ import annotations

from sqlalchemy import ColumnElement, FromClause, and_

from ...crypto.blind_index import normalize
from ...fhir.errors import FhirError
from ..params import SearchParam
from ..values import MAX_PREFIX_CHARS, IndexRows, strings_of
from .common import Keys


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    for text in strings_of(value):
        add_string(keys, out, p.code, text, p.prefix_index)


def add_string(keys: Keys, out: IndexRows, code: str, text: str, prefixes: bool) -> None:
    norm = normalize(text)
    digest = keys.blind.digest
    out.add("string", param=code, kind="e", value=digest(code, "e", text))
    out.add("string", param=code, kind="n", value=digest(code, "n", norm))
    for i in range(1, min(len(norm), MAX_PREFIX_CHARS) + 1 if prefixes else 0):
        out.add("string", param=code, kind="p", value=digest(code, "p", norm[:i]))


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    if modifier == "contains":
        raise FhirError(400, "not-supported",
                        f"'{p.code}' holds identifying data that is stored only as a keyed hash; "
                        ":contains cannot be answered. Use the default starts-with or :exact.", [key])
    if modifier == "exact":
        return and_(t.c.kind == "e", t.c.value == keys.blind.digest(p.code, "e", value))
    if modifier is not None:
        raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on string parameters", [key])
    return string_cond(keys, p.code, p.prefix_index, value, key, t)


def string_cond(keys: Keys, code: str, prefixes: bool, value: str, key: str, t: FromClause) -> ColumnElement[bool]:
    norm = normalize(value)
    if not norm:
        raise FhirError(400, "invalid", f"Empty value for '{key}'", [key])
    if len(norm) <= MAX_PREFIX_CHARS and prefixes:
        return and_(t.c.kind == "p", t.c.value == keys.blind.digest(code, "p", norm))
    return and_(t.c.kind == "n", t.c.value == keys.blind.digest(code, "n", norm))
