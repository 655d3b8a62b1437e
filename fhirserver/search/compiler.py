"""Compile a ParsedSearch into SQL conditions over the index tables: one condition per clause,
ordered so the most selective one drives the query (the planner), and the sort expressions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import (
    ColumnElement,
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
    idx_reference,
    idx_string,
    resource,
)
from ..fhir.dates import MAX_US, MIN_US, parse_range
from ..fhir.errors import FhirError
from .indexer import MAX_PREFIX_CHARS, parse_reference
from .model import PREFIXES, TABLES, AccessFn, Clause, ParsedSearch
from .params import ParamRegistry, SearchParam

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
            sentinel: Any
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
