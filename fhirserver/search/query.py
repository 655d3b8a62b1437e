"""Parse FHIR search parameters and compile them into one SQL query over the index tables.

Access restrictions (scopes, compartments, consent) arrive as extra SQL predicates over the
`resource` table and are ANDed into the same statement, so counts and pages are exact.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, exists, false, func, not_, or_, select, true

from ..crypto.blind_index import BlindIndexer, normalize
from ..db.schema import (
    idx_date,
    idx_number,
    idx_quantity,
    idx_reference,
    idx_string,
    idx_token,
    idx_uri,
    resource,
)
from ..fhir.errors import FhirError, Issue
from .dates import parse_range
from .indexer import MAX_PREFIX_CHARS, parse_reference
from .params import ParamRegistry, SearchParam

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMS = {"_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude",
                 "_contained", "_containedType", "_format", "_pretty", "_cursor"}
_SPLIT = re.compile(r"(?<!\\),")


@dataclass
class Clause:
    code: str
    modifier: str | None
    values: list[str]
    param: SearchParam | None  # None for _id / _lastUpdated


@dataclass
class ParsedSearch:
    resource_type: str
    clauses: list[Clause] = field(default_factory=list)
    count: int = 20
    cursor: int | None = None
    total: str = "accurate"
    summary: str | None = None
    elements: list[str] | None = None
    ignored: list[str] = field(default_factory=list)
    echo: list[tuple[str, str]] = field(default_factory=list)  # params as understood, for `self`


def split_values(raw: str) -> list[str]:
    return [v.replace("\\,", ",") for v in _SPLIT.split(raw)]


def parse_search(
    registry: ParamRegistry,
    resource_type: str,
    params: Sequence[tuple[str, str]],
    default_count: int,
    max_count: int,
    strict: bool,
) -> ParsedSearch:
    out = ParsedSearch(resource_type=resource_type, count=default_count)
    for key, value in params:
        name, _, modifier = key.partition(":")
        if name == "_count":
            try:
                out.count = max(0, min(int(value), max_count))
            except ValueError:
                raise FhirError(400, "invalid", "_count must be an integer", ["_count"]) from None
            out.echo.append((key, str(out.count)))
        elif name == "_cursor":
            try:
                out.cursor = int(base64.urlsafe_b64decode(value.encode() + b"==").decode())
            except (ValueError, UnicodeDecodeError):
                raise FhirError(400, "invalid", "Invalid paging cursor", ["_cursor"]) from None
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise FhirError(400, "invalid", "_total must be none, estimate or accurate", ["_total"])
            out.total = value
            out.echo.append((key, value))
        elif name == "_summary":
            if value not in ("true", "false", "count", "text", "data"):
                raise FhirError(400, "invalid", "_summary must be true, false, count, text or data", ["_summary"])
            out.summary = value
            out.echo.append((key, value))
        elif name == "_elements":
            out.elements = [e.strip() for e in value.split(",") if e.strip()]
            out.echo.append((key, value))
        elif name in ("_format", "_pretty"):
            continue
        elif name in RESULT_PARAMS:
            _unsupported(out, strict, key, f"The result parameter {name} is not supported yet")
        elif name in ("_id", "_lastUpdated"):
            out.clauses.append(Clause(name, modifier or None, split_values(value), None))
            out.echo.append((key, value))
        else:
            param = registry.get(resource_type, name)
            if param is None:
                _unsupported(out, strict, key, f"Unknown search parameter '{name}' for {resource_type}")
                continue
            if param.type == "composite":
                _unsupported(out, strict, key, f"Composite parameter '{name}' is not supported yet")
                continue
            out.clauses.append(Clause(name, modifier or None, split_values(value), param))
            out.echo.append((key, value))
    return out


def _unsupported(out: ParsedSearch, strict: bool, key: str, message: str) -> None:
    if strict:
        raise FhirError(400, "not-supported", message, [key])
    out.ignored.append(message)


# ---------------------------------------------------------------------------------------------
class QueryCompiler:
    def __init__(self, blind: BlindIndexer, base_url: str) -> None:
        self.blind = blind
        self.base_url = base_url.rstrip("/")

    def where(self, parsed: ParsedSearch) -> list[ColumnElement[bool]]:
        return [self._clause(parsed.resource_type, c) for c in parsed.clauses]

    def _clause(self, rtype: str, c: Clause) -> ColumnElement[bool]:
        if c.code == "_id":
            if c.modifier == "not":
                return resource.c.id.not_in(c.values)
            return resource.c.id.in_(c.values)
        if c.code == "_lastUpdated":
            return or_(*[self._date_cond(v, resource.c.last_updated_us, resource.c.last_updated_us, "_lastUpdated")
                         for v in c.values])
        p = c.param
        assert p is not None
        table = {"token": idx_token, "string": idx_string, "date": idx_date, "reference": idx_reference,
                 "quantity": idx_quantity, "number": idx_number, "uri": idx_uri}[p.type]
        if p.protected and p.type == "date":
            table = idx_string
        base = [table.c.resource_pk == resource.c.pk, table.c.param == p.code]
        if c.modifier == "missing":
            present = exists().where(*base)
            if c.values == ["true"]:
                return not_(present)
            if c.values == ["false"]:
                return present
            raise FhirError(400, "invalid", ":missing takes true or false", [f"{p.code}:missing"])
        negate = False
        modifier = c.modifier
        if modifier == "not" and p.type == "token":
            negate, modifier = True, None
        conds = [self._value_cond(p, table, modifier, v) for v in c.values]
        cond = exists().where(*base, or_(*conds))
        return not_(cond) if negate else cond

    def _value_cond(self, p: SearchParam, t: Any, modifier: str | None, value: str) -> ColumnElement[bool]:
        key = f"{p.code}:{modifier}" if modifier else p.code
        if p.type == "string":
            if modifier == "contains":
                raise FhirError(400, "not-supported",
                                f"'{p.code}' holds identifying data that is stored only as a keyed hash; "
                                ":contains cannot be answered. Use the default starts-with or :exact.", [key])
            if modifier == "exact":
                return and_(t.c.kind == "e", t.c.value == self.blind.digest(p.code, "e", value))
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on string parameters", [key])
            norm = normalize(value)
            if not norm:
                raise FhirError(400, "invalid", f"Empty value for '{p.code}'", [key])
            if len(norm) <= MAX_PREFIX_CHARS and p.prefix_index:
                return and_(t.c.kind == "p", t.c.value == self.blind.digest(p.code, "p", norm))
            return and_(t.c.kind == "n", t.c.value == self.blind.digest(p.code, "n", norm))
        if p.type == "token":
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on token parameters yet", [key])
            system, bar, code = value.partition("|")
            if not bar:
                system, code = None, value  # type: ignore[assignment]
            if p.protected and code:
                code = self.blind.digest(p.code, "t", code)
            conds = []
            if bar:
                conds.append(t.c.system.is_(None) if system == "" else t.c.system == system)
            if code:
                conds.append(t.c.code == code)
            if not conds:
                raise FhirError(400, "invalid", f"Empty token for '{p.code}'", [key])
            return and_(*conds)
        if p.type == "date":
            if p.protected:
                prefix, text = _prefix(value)
                if prefix != "eq" or len(text) > 10:
                    raise FhirError(400, "not-supported",
                                    f"'{p.code}' is stored only as a keyed hash: only equality on a year, "
                                    "month or day is supported", [key])
                _check_date(text, key)
                return and_(t.c.kind == "d", t.c.value == self.blind.digest(p.code, "d", text))
            return self._date_cond(value, t.c.low_us, t.c.high_us, key)
        if p.type == "reference":
            return self._reference_cond(p, t, modifier, value, key)
        if p.type in ("number", "quantity"):
            prefix, text = _prefix(value)
            number, _, rest = text.partition("|")
            cond = _number_cond(prefix, number, t.c.value, key)
            if p.type == "quantity" and rest:
                system, _, code = rest.partition("|")
                if system:
                    cond = and_(cond, t.c.system == system)
                if code:
                    cond = and_(cond, t.c.code == code)
            return cond
        if p.type == "uri":
            if modifier == "below":
                return t.c.value.startswith(value, autoescape=True)
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on uri parameters", [key])
            return t.c.value == value
        raise FhirError(400, "not-supported", f"Parameter type {p.type} is not supported", [key])

    def _reference_cond(self, p: SearchParam, t: Any, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
        rtype, rid, url = parse_reference(value, self.base_url)
        if modifier and modifier[0].isupper():
            if rid is None and url is None:
                return and_(t.c.target_type == modifier, t.c.target_id == value)
            rtype = modifier
        elif modifier is not None:
            raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on reference parameters yet", [key])
        if rtype and rid:
            return and_(t.c.target_type == rtype, t.c.target_id == rid)
        if url and "/" not in value:
            # a bare id
            cond = t.c.target_id == value
            if len(p.targets) == 1:
                cond = and_(cond, t.c.target_type == p.targets[0])
            return cond
        return t.c.url == (url or value)

    def _date_cond(self, value: str, low: Any, high: Any, key: str) -> ColumnElement[bool]:
        prefix, text = _prefix(value)
        ql, qh = _check_date(text, key)
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
        from .dates import now_us

        margin = max(abs(now_us() - ql) // 10, 86_400_000_000)
        return and_(low <= qh + margin, high >= ql - margin)


def _prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and (value[2].isdigit() or value[2] in "-+."):
        return value[:2], value[2:]
    return "eq", value


def _check_date(text: str, key: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except ValueError:
        raise FhirError(400, "invalid", f"'{text}' is not a valid FHIR date", [key]) from None


def _number_cond(prefix: str, text: str, col: Any, key: str) -> ColumnElement[bool]:
    try:
        num = Decimal(text)
    except InvalidOperation:
        raise FhirError(400, "invalid", f"'{text}' is not a number", [key]) from None
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


def encode_cursor(pk: int) -> str:
    return base64.urlsafe_b64encode(str(pk).encode()).decode().rstrip("=")


def run_search(
    conn: Connection,
    parsed: ParsedSearch,
    where: list[ColumnElement[bool]],
    access: list[ColumnElement[bool]],
) -> tuple[list[int], int | None, int | None]:
    """Return (page of resource pks, total or None, next cursor or None)."""
    conds = [resource.c.type == parsed.resource_type, resource.c.deleted == false(), *where, *access]
    total = None
    if parsed.total != "none" or parsed.summary == "count":
        total = conn.execute(select(func.count()).select_from(resource).where(*conds)).scalar_one()
    if parsed.summary == "count" or parsed.count == 0:
        return [], total, None
    page_conds = list(conds)
    if parsed.cursor is not None:
        page_conds.append(resource.c.pk > parsed.cursor)
    rows = conn.execute(
        select(resource.c.pk).where(*page_conds).order_by(resource.c.pk).limit(parsed.count + 1)
    ).all()
    pks = [r[0] for r in rows[: parsed.count]]
    nxt = pks[-1] if len(rows) > parsed.count else None
    return pks, total, nxt


__all__ = ["Issue", "ParsedSearch", "QueryCompiler", "encode_cursor", "parse_search", "run_search", "true"]
