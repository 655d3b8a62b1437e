"""uri: exact match, or `:below` for a prefix of the path."""

from __future__ import annotations

from sqlalchemy import ColumnElement, FromClause

from ...fhir.errors import FhirError
from ..params import SearchParam
from ..values import IndexRows
from .common import Keys


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    if isinstance(value, str):
        out.add("uri", param=p.code, value=value[:1024])


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    if modifier == "below":
        return t.c.value.startswith(value, autoescape=True)
    if modifier is not None:
        raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on uri parameters", [key])
    return t.c.value == value
