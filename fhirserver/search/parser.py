"""Parse FHIR search parameters (GET query, POST _search form, conditional headers, scope
restrictions) into a ParsedSearch, holding every search to the input limits."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..fhir.dates import MAX_US
from ..fhir.errors import FhirError
from .cursor import decode_cursor
from .model import (
    MAX_CHAIN_DEPTH,
    RESULT_PARAMS,
    Clause,
    Cursor,
    Include,
    ParsedSearch,
    SortKey,
    split_values,
)
from .params import ParamRegistry


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
                wanted = int(value)
            except ValueError:
                raise FhirError(400, "invalid", "_count must be an integer", ["_count"]) from None
            out.count = max(0, min(wanted, max_count))
            if out.count != wanted:
                _unsupported(out, strict, key, f"_count must be between 0 and {max_count}; {out.count} was used",
                             "invalid")
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
            names = [e.strip() for e in value.split(",") if e.strip()]
            bad = [e for e in names if not _ELEMENT.fullmatch(e)]
            if bad:
                _unsupported(out, strict, key, f"_elements: '{bad[0][:40]}' is not an element name; ignored", "invalid")
            out.elements = [e for e in names if e not in bad]
            if out.elements:
                out.echo.append((key, ",".join(out.elements)))
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

_ELEMENT = re.compile(r"(?:[A-Z][A-Za-z]+\.)?[a-z][A-Za-z0-9]*(?:\[x\])?")


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


def _unsupported(out: ParsedSearch, strict: bool, key: str, message: str, code: str = "not-supported") -> None:
    """A 400 with Prefer: handling=strict; otherwise a warning in the Bundle (not applied)."""
    if strict:
        raise FhirError(400, code, message, [key])
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
