"""Terminology over stored CodeSystem and ValueSet resources (docs/terminology.md): concept
lookup in a CodeSystem's hierarchy (nested `concept`s), and the expansion of a ValueSet's
`compose` -- `include`/`exclude` of whole code systems, enumerated concepts, `is-a`,
`descendent-of`, `is-not-a` and `=` (on `concept` property values) filters, imported value sets
-- which `$expand` pages and `$validate-code` tests membership against. Pure functions: the
caller resolves canonical URLs to the resources the requester may read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import FhirError

MAX_EXPANSION = 10_000  # concepts an expansion may hold (a larger one is refused, not truncated)
MAX_IMPORT_DEPTH = 8  # ValueSet.compose.include.valueSet nesting

Resolver = Callable[[str, str | None], dict[str, Any] | None]  # (canonical url, version) -> resource


@dataclass(frozen=True)
class Concept:
    system: str
    code: str
    display: str | None
    ancestors: tuple[str, ...] = ()  # codes above it in its CodeSystem's hierarchy, nearest first
    properties: tuple[tuple[str, str], ...] = ()  # (property code, value as text)

    def as_contains(self) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


def _property_text(prop: dict[str, Any]) -> str | None:
    for key, value in prop.items():
        if key.startswith("value"):
            if isinstance(value, dict):
                return str(value.get("code") or value.get("value") or "")
            return str(value).lower() if isinstance(value, bool) else str(value)
    return None


def concepts(cs: dict[str, Any]) -> Iterator[Concept]:
    """Every concept of a CodeSystem resource, depth first, with its ancestors."""
    system = str(cs.get("url") or "")
    stack: list[tuple[dict[str, Any], tuple[str, ...]]] = [(c, ()) for c in reversed(cs.get("concept") or [])
                                                            if isinstance(c, dict)]
    while stack:
        node, above = stack.pop()
        code = node.get("code")
        if not isinstance(code, str):
            continue
        props = tuple((str(p.get("code")), text) for p in node.get("property") or []
                      if isinstance(p, dict) and (text := _property_text(p)) is not None)
        yield Concept(system, code, node.get("display") if isinstance(node.get("display"), str) else None, above, props)
        stack.extend((c, (code, *above)) for c in reversed(node.get("concept") or []) if isinstance(c, dict))


def lookup(cs: dict[str, Any], code: str) -> Concept | None:
    return next((c for c in concepts(cs) if c.code == code), None)


def children(cs: dict[str, Any], code: str) -> list[str]:
    return [c.code for c in concepts(cs) if c.ancestors[:1] == (code,)]


def matches_filters(concept: Concept, filters: list[dict[str, Any]]) -> bool:
    for f in filters:
        prop, op, value = f.get("property"), f.get("op"), str(f.get("value") or "")
        if op == "is-a" and prop == "concept":
            ok = concept.code == value or value in concept.ancestors
        elif op == "descendent-of" and prop == "concept":
            ok = value in concept.ancestors
        elif op == "is-not-a" and prop == "concept":
            ok = concept.code != value and value not in concept.ancestors
        elif op == "=":
            ok = (str(prop), value) in concept.properties
        else:
            raise FhirError(422, "not-supported", f"Filter {str(prop)[:40]} {str(op)[:20]} is not supported "
                                                  "(supported: concept is-a / descendent-of / is-not-a, property =)")
        if not ok:
            return False
    return True


def _select(part: dict[str, Any], resolve: Resolver, depth: int) -> list[Concept]:
    """The concepts one `include` or `exclude` entry names."""
    found: list[Concept] | None = None
    system = part.get("system")
    if isinstance(system, str):
        listed = [c for c in part.get("concept") or [] if isinstance(c, dict) and isinstance(c.get("code"), str)]
        cs = resolve(system, part.get("version") if isinstance(part.get("version"), str) else None)
        if listed:
            known = {c.code: c for c in concepts(cs)} if cs is not None else {}
            found = [known.get(c["code"]) or Concept(system, c["code"], c.get("display")) for c in listed]
            if cs is not None and any(c["code"] not in known for c in listed):
                missing = next(c["code"] for c in listed if c["code"] not in known)
                raise FhirError(422, "code-invalid", f"{str(missing)[:40]} is not a code of {system[:80]}")
        else:
            if cs is None:
                raise FhirError(422, "not-found", f"The code system {system[:80]} is not available on this server")
            filters = [f for f in part.get("filter") or [] if isinstance(f, dict)]
            found = [c for c in concepts(cs) if matches_filters(c, filters)]
    for url in part.get("valueSet") or []:
        imported = expand(_value_set(url, resolve), resolve, depth + 1)
        keys = {(c.system, c.code) for c in imported}
        found = imported if found is None else [c for c in found if (c.system, c.code) in keys]
    return found or []


def _value_set(url: object, resolve: Resolver) -> dict[str, Any]:
    vs = resolve(str(url), None) if isinstance(url, str) else None
    if vs is None:
        raise FhirError(422, "not-found", f"The value set {str(url)[:80]} is not available on this server")
    return vs


def expand(vs: dict[str, Any], resolve: Resolver, depth: int = 0) -> list[Concept]:
    """The concepts of a ValueSet's `compose`, each once, in include order, minus the excludes."""
    if depth > MAX_IMPORT_DEPTH:
        raise FhirError(422, "too-costly", "Value sets import each other too deeply")
    compose = vs.get("compose") or {}
    if not isinstance(compose, dict) or not compose.get("include"):
        raise FhirError(422, "not-supported", "The value set has no compose.include to expand")
    out: dict[tuple[str, str], Concept] = {}
    for part in compose.get("include") or []:
        for c in _select(part, resolve, depth):
            out.setdefault((c.system, c.code), c)
            if len(out) > MAX_EXPANSION:
                raise FhirError(422, "too-costly", f"The expansion exceeds {MAX_EXPANSION} concepts")
    for part in compose.get("exclude") or []:
        for c in _select(part, resolve, depth):
            out.pop((c.system, c.code), None)
    return list(out.values())


def text_filter(found: list[Concept], text: str) -> list[Concept]:
    """$expand's `filter`: concepts whose code or display contains every word (case-insensitive)."""
    words = text.lower().split()
    return [c for c in found if all(w in f"{c.code} {c.display or ''}".lower() for w in words)]
