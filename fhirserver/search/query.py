"""Parse FHIR search parameters and compile them into one SQL query over the index tables.

Access restrictions (scopes, compartments, consent) arrive as SQL predicates over the resource
table and are ANDed into the same statement -- also inside chained, `_has` and included
sub-queries, each against its own table alias -- so totals and pages are exact and nothing is
matched through a resource the caller may not see.

Paging is keyset-based: a cursor holds the sort values and pk of the last (or first) row of a
page, so inserts between page fetches neither duplicate nor skip rows.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    and_,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
)

from ..clock import now_us
from ..crypto.blind_index import BlindIndexer, normalize
from ..db.schema import (
    idx_composite,
    idx_date,
    idx_number,
    idx_quantity,
    idx_reference,
    idx_string,
    idx_token,
    idx_uri,
    resource,
)
from ..fhir.dates import MAX_US, MIN_US, parse_range
from ..fhir.errors import FhirError
from .indexer import MAX_PREFIX_CHARS, parse_reference
from .params import ParamRegistry, SearchParam

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMS = {"_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude",
                 "_contained", "_containedType", "_format", "_pretty", "_cursor"}
TABLES = {"token": idx_token, "string": idx_string, "date": idx_date, "reference": idx_reference,
          "quantity": idx_quantity, "number": idx_number, "uri": idx_uri}
_SPLIT = re.compile(r"(?<!\\),")
MAX_CHAIN_DEPTH = 3

# access(resource_type, table alias) -> predicates, or None when the caller may not read that type
AccessFn = Callable[[str, FromClause], "list[ColumnElement[bool]] | None"]


@dataclass
class Clause:
    code: str
    modifier: str | None
    values: list[str]
    param: SearchParam | None  # None for _id / _lastUpdated / _has
    chain: tuple[str, ParsedSearch] | None = None  # (target type, nested search on it)
    has: tuple[str, str, ParsedSearch] | None = None  # (source type, reference param, nested)


NEVER_DRIVES = 100
BROAD_CLAUSE_ROWS = 1000


@dataclass
class Term:
    """One compiled clause: `build(drive)` gives the IN form (drive=True) or the EXISTS form."""

    rank: int  # lower = expected to be more selective; >= NEVER_DRIVES never drives
    build: Callable[[bool], ColumnElement[bool]]
    probe: Any = None  # the IN form's sub-select, to measure how broad the clause is


def _semi(res: FromClause, t: Any, conds: list[ColumnElement[bool]], rank: int, negate: bool = False) -> Term:
    def build(drive: bool) -> ColumnElement[bool]:
        if negate:
            return ~exists().where(t.c.resource_pk == res.c.pk, *conds)
        if drive:
            return res.c.pk.in_(select(t.c.resource_pk).where(*conds))
        return exists().where(t.c.resource_pk == res.c.pk, *conds)

    return Term(rank, build, None if negate else select(t.c.resource_pk).where(*conds))


@dataclass
class Include:
    source_type: str
    param: str
    target_type: str | None
    reverse: bool
    iterate: bool


@dataclass
class SortKey:
    code: str
    descending: bool
    param: SearchParam | None


@dataclass
class Cursor:
    forward: bool
    values: list[Any]
    pk: int


@dataclass
class ParsedSearch:
    resource_type: str
    clauses: list[Clause] = field(default_factory=list)
    count: int = 20
    cursor: Cursor | None = None
    total: str = "auto"  # auto: count on the first page only; accurate: every page; none: never
    summary: str | None = None
    elements: list[str] | None = None
    sort: list[SortKey] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    echo: list[tuple[str, str]] = field(default_factory=list)  # params as understood, for links


@dataclass
class SearchPage:
    pks: list[int]
    total: int | None
    next_cursor: str | None
    prev_cursor: str | None


def split_values(raw: str) -> list[str]:
    return [v.replace("\\,", ",") for v in _SPLIT.split(raw)]


# ------------------------------------------------------------------------------- parsing
def parse_search(
    registry: ParamRegistry,
    resource_type: str,
    params: Sequence[tuple[str, str]],
    default_count: int,
    max_count: int,
    strict: bool,
) -> ParsedSearch:
    out = ParsedSearch(resource_type=resource_type, count=default_count)
    _check_limits(registry, params)
    for key, value in params:
        name, _, modifier = key.partition(":")
        if name == "_count":
            try:
                out.count = max(0, min(int(value), max_count))
            except ValueError:
                raise FhirError(400, "invalid", "_count must be an integer", ["_count"]) from None
            out.echo.append((key, str(out.count)))
        elif name == "_cursor":
            out.cursor = decode_cursor(value)
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
        elif name == "_sort":
            out.sort = _parse_sort(registry, resource_type, value)
            out.echo.append((key, value))
        elif name in ("_include", "_revinclude"):
            inc = _parse_include(registry, name == "_revinclude", modifier, value, strict)
            if inc is not None:
                out.includes.append(inc)
                out.echo.append((key, value))
            else:
                _unsupported(out, strict, key, f"Cannot {name} '{value[:80]}'")
        elif name in ("_format", "_pretty"):
            continue
        elif name in RESULT_PARAMS:
            _unsupported(out, strict, key, f"The result parameter {name} is not supported")
        elif name == "_has":
            out.clauses.append(_parse_has(registry, key, value, strict, depth=0))
            out.echo.append((key, value))
        elif name in ("_id", "_lastUpdated"):
            out.clauses.append(Clause(name, modifier or None, split_values(value), None))
            out.echo.append((key, value))
        else:
            clause = _parse_param(registry, resource_type, key, value, strict, depth=0)
            if clause is None:
                _unsupported(out, strict, key, f"Unknown search parameter '{name}' for {resource_type}")
                continue
            out.clauses.append(clause)
            out.echo.append((key, value))
    if out.cursor is not None:
        _check_cursor(out.cursor, out.sort)
    return out


def _check_limits(registry: ParamRegistry, params: Sequence[tuple[str, str]]) -> None:
    """At most `max_params` parameters and `max_values` comma-separated values in each (chains
    and `_has` count as the parameters they are written as)."""
    if len(params) > registry.max_params:
        raise FhirError(400, "too-costly", f"A search may have at most {registry.max_params} parameters "
                                           f"(this one has {len(params)}; setting search_max_params)")
    for key, value in params:
        if value.count(",") >= registry.max_values:
            raise FhirError(400, "too-costly", f"A search parameter may have at most {registry.max_values} values "
                                               f"('{key[:60]}' has more; setting search_max_values)", [key[:60]])


def _check_cursor(cursor: Cursor, sort: list[SortKey]) -> None:
    """A cursor comes back from the client: its values must fit this search's sort keys."""
    bad = FhirError(400, "invalid", "The paging cursor does not belong to this search", ["_cursor"])
    if len(cursor.values) != len(sort):
        raise bad
    for value, key in zip(cursor.values, sort, strict=True):
        if key.code == "_lastUpdated" or (key.param and key.param.type == "date"):
            ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_US
        elif key.param and key.param.type in ("number", "quantity"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e308
        else:
            ok = isinstance(value, str)
        if not ok:
            raise bad


def _unsupported(out: ParsedSearch, strict: bool, key: str, message: str) -> None:
    if strict:
        raise FhirError(400, "not-supported", message, [key])
    out.ignored.append(message)


def _parse_param(registry: ParamRegistry, rtype: str, key: str, value: str, strict: bool,
                 depth: int) -> Clause | None:
    """A parameter clause; `key` may be chained: `subject:Patient.name`, `patient.identifier`."""
    head, dot, rest = key.partition(".")
    name, _, modifier = head.partition(":")
    if name in ("_id", "_lastUpdated") and not dot:
        return Clause(name, modifier or None, split_values(value), None)
    param = registry.get(rtype, name)
    if param is None:
        return None
    if dot:
        if param.type != "reference":
            raise FhirError(400, "invalid", f"'{name}' is not a reference parameter and cannot be chained", [key])
        if depth >= MAX_CHAIN_DEPTH:
            raise FhirError(400, "not-supported", "Chains are limited to 3 levels", [key])
        target = modifier if modifier and modifier[0].isupper() else None
        candidates = [target] if target else [t for t in param.targets if registry.for_type(t)]
        if len(candidates) != 1:
            raise FhirError(400, "invalid", f"Chained parameter '{name}' needs one target type, e.g. "
                                            f"{name}:Patient.{rest}", [key])
        target = candidates[0]
        nested = ParsedSearch(resource_type=target)
        inner = _parse_param(registry, target, rest, value, strict, depth + 1)
        if inner is None:
            raise FhirError(400, "invalid", f"Unknown search parameter '{rest}' for {target} in chain", [key])
        nested.clauses.append(inner)
        return Clause(name, None, [], param, chain=(target, nested))
    if param.type == "composite" and not param.components:
        raise FhirError(400, "not-supported", f"Composite parameter '{name}' has no components", [key])
    return Clause(name, modifier or None, split_values(value), param)


def _parse_has(registry: ParamRegistry, key: str, value: str, strict: bool, depth: int) -> Clause:
    # _has:Observation:patient:code=1234   or nested: _has:Observation:patient:_has:AuditEvent:entity:type=...
    parts = key.split(":", 3)
    if len(parts) < 4 or not parts[1] or not parts[2] or not parts[3]:
        raise FhirError(400, "invalid", "_has must look like _has:Type:reference-param:search-param=value", [key])
    _, source, ref_param, rest = parts
    if not registry.for_type(source):
        raise FhirError(400, "not-supported", f"_has: resource type '{source}' is not supported", [key])
    ref = registry.get(source, ref_param)
    if ref is None or ref.type != "reference":
        raise FhirError(400, "invalid", f"_has: '{ref_param}' is not a reference parameter of {source}", [key])
    if depth >= MAX_CHAIN_DEPTH:
        raise FhirError(400, "not-supported", "_has nesting is limited to 3 levels", [key])
    nested = ParsedSearch(resource_type=source)
    if rest.startswith("_has:"):
        nested.clauses.append(_parse_has(registry, rest, value, strict, depth + 1))
    else:
        inner = _parse_param(registry, source, rest, value, strict, depth + 1)
        if inner is None:
            raise FhirError(400, "invalid", f"_has: unknown search parameter '{rest}' for {source}", [key])
        nested.clauses.append(inner)
    return Clause("_has", None, [], None, has=(source, ref_param, nested))


def _parse_sort(registry: ParamRegistry, rtype: str, value: str) -> list[SortKey]:
    keys = []
    for raw in [v.strip() for v in value.split(",") if v.strip()]:
        desc = raw.startswith("-")
        code = raw[1:] if desc else raw
        if code in ("_lastUpdated", "_id"):
            keys.append(SortKey(code, desc, None))
            continue
        param = registry.get(rtype, code)
        if param is None or param.type in ("composite", "special"):
            raise FhirError(400, "invalid", f"Cannot sort by '{code}'", ["_sort"])
        if param.protected:
            raise FhirError(400, "not-supported",
                            f"'{code}' is stored only as a keyed hash and cannot be sorted by", ["_sort"])
        keys.append(SortKey(code, desc, param))
    return keys


def _parse_include(registry: ParamRegistry, reverse: bool, modifier: str, value: str,
                   strict: bool) -> Include | None:
    parts = value.split(":")
    if len(parts) not in (2, 3) or modifier not in ("", "iterate", "recurse"):
        return None
    source, pname = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    param = registry.get(source, pname)
    if param is None or param.type != "reference":
        if strict:
            raise FhirError(400, "invalid", f"'{value[:80]}' is not a reference parameter to include", ["_include"])
        return None
    return Include(source, pname, target, reverse, modifier in ("iterate", "recurse"))


def encode_cursor(forward: bool, values: Sequence[Any], pk: int) -> str:
    raw = json.dumps(["n" if forward else "p", list(values), pk], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        direction, values, pk = json.loads(base64.urlsafe_b64decode(text.encode() + b"==="))
        if direction not in ("n", "p") or not isinstance(values, list) or not isinstance(pk, int) \
                or isinstance(pk, bool) or abs(pk) > 2**62:
            raise ValueError
        return Cursor(direction == "n", values, pk)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise FhirError(400, "invalid", "Invalid paging cursor", ["_cursor"]) from None


# ------------------------------------------------------------------------------- compiling
class QueryCompiler:
    def __init__(self, blind: BlindIndexer, base_url: str, registry: ParamRegistry) -> None:
        self.blind = blind
        self.base_url = base_url.rstrip("/")
        self.registry = registry

    def where(self, parsed: ParsedSearch, res: FromClause = resource,
              access: AccessFn | None = None) -> list[ColumnElement[bool]]:
        return self.compile(parsed, res, access)[0]

    def compile(self, parsed: ParsedSearch, res: FromClause = resource, access: AccessFn | None = None,
                drive: bool = True) -> tuple[list[ColumnElement[bool]], Term | None]:
        """SQL conditions for the clauses, and whether one of them drives the query.

        The most selective positive clause becomes `pk IN (SELECT resource_pk ...)`, from which
        SQLite starts; every other clause is a correlated EXISTS probed per candidate row through
        the index tables' resource_pk index. (SQLite would otherwise materialize every IN list in
        full, e.g. all vital-signs Observations.) PostgreSQL plans both forms as semi-joins.
        `drive=False`: no driving clause (run_search uses it when the best clause is broad).
        Returns the conditions and the driving term (None when the resource table drives).
        """
        terms = [self._clause(parsed.resource_type, c, res, access) for c in parsed.clauses]
        drivers = [t for t in terms if t.rank < NEVER_DRIVES and drive]
        driver = min(drivers, key=lambda t: t.rank) if drivers else None
        return [t.build(t is driver) for t in terms], driver

    def _nested(self, target: str, nested: ParsedSearch, access: AccessFn | None) -> tuple[FromClause, list[ColumnElement[bool]]] | None:
        alias = resource.alias()
        preds: list[ColumnElement[bool]] = [alias.c.type == target, alias.c.deleted.is_(False)]
        if access is not None:
            allowed = access(target, alias)
            if allowed is None:
                return None
            preds.extend(allowed)
        preds.extend(self.where(nested, alias, access))
        return alias, preds

    def _clause(self, rtype: str, c: Clause, res: FromClause, access: AccessFn | None) -> Term:
        if c.code == "_id":
            if c.modifier == "not":
                return Term(NEVER_DRIVES, lambda _d: res.c.id.not_in(c.values))
            return Term(0, lambda _d: res.c.id.in_(c.values))  # the (type, id) index drives
        if c.code == "_lastUpdated":
            cond = or_(*[self._date_cond(v, res.c.last_updated_us, res.c.last_updated_us, "_lastUpdated")
                         for v in c.values])
            return Term(NEVER_DRIVES, lambda _d: cond)
        if c.has is not None:
            source, ref_param, nested = c.has
            built = self._nested(source, nested, access)
            if built is None:
                return Term(NEVER_DRIVES, lambda _d: false())
            alias, preds = built
            ref = idx_reference.alias()
            has_conds = [ref.c.param == ref_param, ref.c.target_type == rtype, *preds]
            return Term(NEVER_DRIVES, lambda _d: exists().where(
                alias.c.pk == ref.c.resource_pk, ref.c.target_id == res.c.id, *has_conds))
        p = c.param
        assert p is not None
        if c.chain is not None:
            target, nested = c.chain
            built = self._nested(target, nested, access)
            if built is None:
                return Term(NEVER_DRIVES, lambda _d: false())
            alias, preds = built
            ref = idx_reference.alias()
            conds = [ref.c.param == p.code, ref.c.target_type == target,
                     ref.c.target_id.in_(select(alias.c.id).where(*preds))]
            return _semi(res, ref, conds, 3)
        if p.type == "composite":
            table = idx_composite
        elif (p.protected and p.type == "date") or c.modifier == "text":
            table = idx_string
        else:
            table = TABLES[p.type]
        t = table.alias()
        param_code = f"{p.code}:text" if c.modifier == "text" else p.code
        base = [t.c.param == param_code]
        if c.modifier == "missing":
            if c.values not in (["true"], ["false"]):
                raise FhirError(400, "invalid", ":missing takes true or false", [f"{p.code}:missing"])
            return _semi(res, t, base, NEVER_DRIVES, negate=c.values == ["true"])
        if p.type == "composite":
            if c.modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{c.modifier} is not supported on composite "
                                                      f"parameter '{p.code}'", [f"{p.code}:{c.modifier}"])
            return _semi(res, t, [*base, self._composite(p, c, t)], 2)
        negate = False
        modifier = c.modifier
        if modifier == "not" and p.type == "token":
            negate, modifier = True, None
        conds = [*base, or_(*[self._value_cond(p, t, modifier, v) for v in c.values])]
        if negate:
            return _semi(res, t, conds, NEVER_DRIVES, negate=True)
        if p.type == "reference" or p.protected or p.type == "uri":
            rank = 1  # a specific target id or a keyed digest of an identifying value
        elif p.type == "token" or c.modifier == "text" or p.type == "string":
            rank = 2
        else:
            rank = NEVER_DRIVES - 1  # ranges: drive only if nothing better
        return _semi(res, t, conds, rank)

    def _value_cond(self, p: SearchParam, t: Any, modifier: str | None, value: str) -> ColumnElement[bool]:
        key = f"{p.code}:{modifier}" if modifier else p.code
        if modifier == "text":
            if p.type != "token" or not p.text_index:
                raise FhirError(400, "not-supported", f":text is not indexed for '{p.code}'", [key])
            return self._string_cond(f"{p.code}:text", True, value, key, t)
        if p.type == "string":
            if modifier == "contains":
                raise FhirError(400, "not-supported",
                                f"'{p.code}' holds identifying data that is stored only as a keyed hash; "
                                ":contains cannot be answered. Use the default starts-with or :exact.", [key])
            if modifier == "exact":
                return and_(t.c.kind == "e", t.c.value == self.blind.digest(p.code, "e", value))
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on string parameters", [key])
            return self._string_cond(p.code, p.prefix_index, value, key, t)
        if p.type == "token":
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on token parameters", [key])
            return self._token_cond(p, t.c.system, t.c.code, value, key)
        if p.type == "date":
            if p.protected:
                prefix, text = _prefix(value)
                if prefix != "eq" or len(text) > 10:
                    raise FhirError(400, "not-supported",
                                    f"'{p.code}' is stored only as a keyed hash: only equality on a year, "
                                    "month or day is supported", [key])
                _check_date(text, key)
                return and_(t.c.kind == "d", t.c.value == self.blind.digest(p.code, "d", text))
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on date parameters", [key])
            return self._date_cond(value, t.c.low_us, t.c.high_us, key)
        if p.type == "reference":
            return self._reference_cond(p, t, modifier, value, key)
        if p.type in ("number", "quantity"):
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on {p.type} parameters", [key])
            return self._quantity_cond(p.type, t.c.value, t.c.system if p.type == "quantity" else None,
                                       t.c.code if p.type == "quantity" else None, value, key)
        if p.type == "uri":
            if modifier == "below":
                return t.c.value.startswith(value, autoescape=True)
            if modifier is not None:
                raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on uri parameters", [key])
            return t.c.value == value
        raise FhirError(400, "not-supported", f"Parameter type {p.type} is not supported", [key])

    def _string_cond(self, code: str, prefixes: bool, value: str, key: str, t: Any) -> ColumnElement[bool]:
        norm = normalize(value)
        if not norm:
            raise FhirError(400, "invalid", f"Empty value for '{key}'", [key])
        if len(norm) <= MAX_PREFIX_CHARS and prefixes:
            return and_(t.c.kind == "p", t.c.value == self.blind.digest(code, "p", norm))
        return and_(t.c.kind == "n", t.c.value == self.blind.digest(code, "n", norm))

    def _token_cond(self, p: SearchParam, system_col: Any, code_col: Any, value: str, key: str,
                    protected: bool | None = None) -> ColumnElement[bool]:
        system, bar, code = value.partition("|")
        if not bar:
            system, code = None, value  # type: ignore[assignment]
        if (p.protected if protected is None else protected) and code:
            code = self.blind.digest(p.code, "t", code)
        conds = []
        if bar:
            conds.append(system_col.is_(None) if system == "" else system_col == system)
        if code:
            conds.append(code_col == code)
        if not conds:
            raise FhirError(400, "invalid", f"Empty token for '{p.code}'", [key])
        return and_(*conds)

    def _quantity_cond(self, ptype: str, value_col: Any, system_col: Any, code_col: Any, value: str,
                       key: str) -> ColumnElement[bool]:
        prefix, text = _prefix(value)
        number, _, rest = text.partition("|")
        cond = _number_cond(prefix, number, value_col, key)
        if ptype == "quantity" and rest:
            system, _, code = rest.partition("|")
            if system:
                cond = and_(cond, system_col == system)
            if code:
                cond = and_(cond, code_col == code)
        return cond

    def _composite(self, p: SearchParam, c: Clause, t: Any) -> ColumnElement[bool]:
        kinds = p.component_types
        alternatives = []
        for value in c.values:
            parts = value.split("$")
            if len(parts) != len(kinds) or len(kinds) != 2:
                raise FhirError(400, "invalid", f"'{p.code}' takes two components joined by '$'", [p.code])
            first = self._token_cond(p, t.c.system, t.c.code, parts[0], p.code, protected=False)
            kind, second = kinds[1], parts[1]
            if kind == "token":
                cond2 = self._token_cond(p, t.c.system2, t.c.code2, second, p.code, protected=False)
            elif kind == "quantity":
                cond2 = self._quantity_cond("quantity", t.c.num, t.c.system2, t.c.code2, second, p.code)
            elif kind == "date":
                cond2 = self._date_cond(second, t.c.low_us, t.c.high_us, p.code)
            elif kind == "string":
                cond2 = t.c.code2 == self.blind.digest(p.code, "n", normalize(second))
            else:
                raise FhirError(400, "not-supported", f"Composite component type {kind} is not supported", [p.code])
            alternatives.append(and_(first, cond2))
        return or_(*alternatives)

    def _reference_cond(self, p: SearchParam, t: Any, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
        rtype, rid, url = parse_reference(value, self.base_url)
        if modifier and modifier[0].isupper():
            if rid is None and url is not None and "/" not in value:
                return and_(t.c.target_type == modifier, t.c.target_id == value)
            if rtype not in (None, modifier):
                return false()  # subject:Patient=Group/1 can match nothing
            rtype = modifier
        elif modifier is not None:
            raise FhirError(400, "not-supported", f"Modifier :{modifier} is not supported on reference parameters", [key])
        if rtype and rid:
            return and_(t.c.target_type == rtype, t.c.target_id == rid)
        if url and "/" not in value and ":" not in value:
            cond = t.c.target_id == value  # a bare id
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
        margin = max(abs(now_us() - ql) // 10, 86_400_000_000)
        return and_(low <= qh + margin, high >= ql - margin)

    # ---- sorting
    def sort_expressions(self, parsed: ParsedSearch, res: FromClause) -> list[tuple[Any, bool]]:
        """(SQL expression, descending) per sort key; missing values sort last either way."""
        out: list[tuple[Any, bool]] = []
        for key in parsed.sort:
            if key.code == "_lastUpdated":
                out.append((res.c.last_updated_us, key.descending))
                continue
            if key.code == "_id":
                out.append((res.c.id, key.descending))
                continue
            p = key.param
            assert p is not None
            t = TABLES[p.type].alias()
            if p.type == "date":
                col, sentinel = (t.c.high_us, MIN_US) if key.descending else (t.c.low_us, MAX_US)
            elif p.type in ("number", "quantity"):
                col, sentinel = t.c.value, (-1e308 if key.descending else 1e308)
            elif p.type == "reference":
                col, sentinel = t.c.target_id, ("" if key.descending else "\uffff")
            elif p.type == "token":
                col, sentinel = t.c.code, ("" if key.descending else "\uffff")
            else:
                col, sentinel = t.c.value, ("" if key.descending else "\uffff")
            agg = func.max(col) if key.descending else func.min(col)
            sub = select(agg).where(t.c.resource_pk == res.c.pk, t.c.param == p.code).scalar_subquery()
            out.append((func.coalesce(sub, literal(sentinel)), key.descending))
        return out


def _prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and (value[2].isdigit() or value[2] in "-+."):
        return value[:2], value[2:]
    return "eq", value


def _check_date(text: str, key: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except ValueError:
        raise FhirError(400, "invalid", f"'{text[:40]}' is not a valid FHIR date", [key]) from None


def _number_cond(prefix: str, text: str, col: Any, key: str) -> ColumnElement[bool]:
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


def _after(keys: list[tuple[Any, bool]], values: list[Any], pk_col: Any, pk: int, forward: bool) -> ColumnElement[bool]:
    """Rows strictly after (forward) or before (backward) the cursor in the sort order."""
    terms = []
    for i in range(len(keys) + 1):
        eqs = [keys[j][0] == values[j] for j in range(i)]
        if i < len(keys):
            expr, desc = keys[i]
            greater = (expr < values[i]) if desc else (expr > values[i])
            less = (expr > values[i]) if desc else (expr < values[i])
            terms.append(and_(*eqs, greater if forward else less))
        else:
            terms.append(and_(*eqs, (pk_col > pk) if forward else (pk_col < pk)))
    return or_(*terms)


def run_search(
    conn: Connection,
    parsed: ParsedSearch,
    compiler: QueryCompiler,
    access: list[ColumnElement[bool]],
    access_fn: AccessFn | None = None,
    extra: Sequence[ColumnElement[bool]] = (),
    res: FromClause = resource,
) -> SearchPage:
    """Run the search: exact total (unless _total=none) and one keyset page."""
    where, driver = compiler.compile(parsed, res, access_fn)
    if driver is not None and driver.probe is not None:
        # A broad driving clause (e.g. category=laboratory) is cheaper as a probe on each row in
        # pk order, which stops at the page size, than as a materialized list of every match.
        probe = driver.probe.limit(BROAD_CLAUSE_ROWS).subquery()
        if conn.execute(select(func.count()).select_from(probe)).scalar_one() >= BROAD_CLAUSE_ROWS:
            where, driver = compiler.compile(parsed, res, access_fn, drive=False)
    driven = driver is not None and driver.rank > 0
    conds = [res.c.deleted.is_(False), *where, *access, *extra]
    if parsed.resource_type != "*":  # "*": several types, constrained by `extra`
        # With a driving clause, keep SQLite from preferring the (unselective) type index.
        type_col = res.c.type.concat("") if driven else res.c.type
        conds.insert(0, type_col == parsed.resource_type)
    total = None
    wanted = parsed.total in ("accurate", "estimate") or (parsed.total == "auto" and parsed.cursor is None)
    if wanted or parsed.summary == "count":
        total = conn.execute(select(func.count()).select_from(res).where(*conds)).scalar_one()
    if parsed.summary == "count" or parsed.count == 0:
        return SearchPage([], total, None, None)
    keys = compiler.sort_expressions(parsed, res)
    forward = parsed.cursor is None or parsed.cursor.forward
    page_conds = list(conds)
    if parsed.cursor is not None:
        page_conds.append(_after(keys, parsed.cursor.values, res.c.pk, parsed.cursor.pk, forward))
    order = []
    for expr, desc in keys:
        order.append(expr.desc() if desc == forward else expr.asc())
    order.append(res.c.pk.asc() if forward else res.c.pk.desc())
    stmt = select(res.c.pk, *[expr.label(f"k{i}") for i, (expr, _d) in enumerate(keys)]) \
        .where(*page_conds).order_by(*order).limit(parsed.count + 1)
    rows = conn.execute(stmt).all()
    more = len(rows) > parsed.count
    rows = rows[: parsed.count]
    if not forward:
        rows.reverse()
    pks = [r[0] for r in rows]

    def cur(row: Any, fwd: bool) -> str:
        return encode_cursor(fwd, [row[i + 1] for i in range(len(keys))], row[0])

    next_cursor = prev_cursor = None
    if rows:
        if (forward and more) or (not forward and parsed.cursor is not None):
            next_cursor = cur(rows[-1], True)
        if (not forward and more) or (forward and parsed.cursor is not None):
            prev_cursor = cur(rows[0], False)
    return SearchPage(pks, total, next_cursor, prev_cursor)
