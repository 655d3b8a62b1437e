"""Pieces of search-value parsing the types share: prefixes, dates, numbers."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, or_

from ...crypto.blind_index import BlindIndexer
from ...fhir.dates import parse_range
from ...fhir.errors import FhirError
from ..model import PREFIXES


class Keys(Protocol):
    """What the types need from their caller (the Indexer or the QueryCompiler)."""

    blind: BlindIndexer
    base_url: str


def prefix_of(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and (value[2].isdigit() or value[2] in "-+."):
        return value[:2], value[2:]
    return "eq", value


def checked_date(text: str, key: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except ValueError:
        raise FhirError(400, "invalid", f"'{text[:40]}' is not a valid FHIR date", [key]) from None


def no_modifier(kind: str, modifier: str | None, key: str) -> None:
    if modifier is not None:
        raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on {kind} parameters", [key])


def number_cond(prefix: str, text: str, col: ColumnElement[Any], key: str) -> ColumnElement[bool]:
    try:
        num = Decimal(text)
    except InvalidOperation:
        raise FhirError(400, "invalid", f"'{text[:40]}' is not a number", [key]) from None
    if not num.is_finite():
        raise FhirError(400, "invalid", f"'{text[:40]}' is not a number", [key])
    exponent = num.as_tuple().exponent
    half = Decimal(5) * Decimal(10) ** (exponent - 1) if isinstance(exponent, int) and exponent <= 0 else Decimal("0.5")
    lo, hi, v = float(num - half), float(num + half), float(num)
    if prefix == "eq":
        return and_(col >= lo, col < hi)
    if prefix == "ne":
        return or_(col < lo, col >= hi)
    if prefix in ("gt", "sa"):
        return col > v
    if prefix in ("lt", "eb"):
        return col < v
    if prefix == "ge":
        return col >= v
    if prefix == "le":
        return col <= v
    margin = abs(v) * 0.1
    return and_(col >= v - margin, col <= v + margin)
