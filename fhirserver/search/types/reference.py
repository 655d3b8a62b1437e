"""reference: `Type/id` (local or this server's absolute URL), external URLs and canonicals;
`:Type` restricts the target type."""

from __future__ import annotations

from sqlalchemy import ColumnElement, FromClause, and_, false

from ...fhir.errors import FhirError
from ..params import SearchParam
from ..values import IndexRows, parse_reference
from .common import Keys


def index(keys: Keys, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
    ref = value.get("reference") if isinstance(value, dict) else value if isinstance(value, str) else None
    if isinstance(ref, str):
        rtype, rid, url = parse_reference(ref, keys.base_url)
        out.add("reference", param=p.code, target_type=rtype, target_id=rid, url=url)
    ident = value.get("identifier") if isinstance(value, dict) and p.identifier_index else None
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        # `:identifier` (a logical reference, often a person's MRN): keyed digests, never in clear
        for token in (f"{ident.get('system') or ''}|{ident['value']}", f"|{ident['value']}"):
            out.add("string", param=f"{p.code}:identifier", kind="i", value=keys.blind.digest(p.code, "i", token))


def condition(keys: Keys, p: SearchParam, t: FromClause, modifier: str | None, value: str, key: str) -> ColumnElement[bool]:
    if modifier == "identifier":
        system, bar, ident = value.partition("|")
        token = f"{system}|{ident}" if bar else f"|{value}"
        if not (ident if bar else value):
            raise FhirError(400, "invalid", ":identifier takes [system|]value", [key])
        return and_(t.c.kind == "i", t.c.value == keys.blind.digest(p.code, "i", token))
    rtype, rid, url = parse_reference(value, keys.base_url)
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
