"""StructureDefinitions as the profile checker reads them: element paths as steps, cardinality,
types, fixed/pattern values, slicing and FHIRPath invariants compiled once (see profiles.py)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fhirpath import UnsupportedExpression, compile_relative

log = logging.getLogger(__name__)



CORE = "http://hl7.org/fhir/StructureDefinition/"
Node = tuple[Any, str]  # (JSON value, FHIRPath-like location)
Test = Callable[[Any], bool | None]  # None: the expression evaluated to empty
_UNENFORCED = re.compile(r"^(minValue|maxValue)[A-Z]|^maxLength$")


class ProfileError(ValueError):
    """A profile file the evaluator cannot apply faithfully: fail at startup, not per request."""


@dataclass(frozen=True)
class Step:
    name: str  # JSON property, or a choice element's prefix (`effective` for `effective[x]`)
    choice: bool = False
    slice: str | None = None

    def keys(self, value: dict[str, Any]) -> list[str]:
        if not self.choice:
            return [self.name] if self.name in value else []
        n = len(self.name)
        return [k for k in value if k.startswith(self.name) and len(k) > n and k[n].isupper()]


@dataclass(frozen=True)
class Constraint:
    key: str
    severity: str
    human: str
    test: Test | None  # None: not evaluable by this server
    reason: str = ""


@dataclass(eq=False)
class Element:
    id: str  # normalized: `value[x]:valueQuantity` becomes `valueQuantity`
    steps: tuple[Step, ...]
    min: int | None = None
    max: int | None = None  # None: unbounded or not constrained
    fixed: object = None  # a JSON value (fixed[x])
    pattern: object = None  # a JSON value (pattern[x])
    has_fixed: bool = False
    has_pattern: bool = False
    choice_types: tuple[str, ...] = ()  # allowed type codes of a choice element (`dateTime`, `Period`)
    targets: tuple[str, ...] = ()  # targetProfile canonicals of a Reference
    type_profiles: tuple[str, ...] = ()  # type.profile canonicals (an extension slice's definition)
    binding: tuple[str, str] | None = None  # (strength, value set canonical): required or extensible only
    must_support: bool = False
    constraints: tuple[Constraint, ...] = ()
    slicing: dict[str, Any] | None = None
    slice_ids: tuple[str | None, ...] = ()  # per step: the id of the slice element it selects


@dataclass(eq=False)
class Profile:
    url: str
    version: str | None
    name: str
    type: str
    base: str
    source: str  # the file name, or `package#version/file` for an installed IG package
    elements: list[Element]
    by_id: dict[str, Element]
    members: dict[str, Callable[[Any], bool]] = field(default_factory=dict)  # slice id -> member test
    described: dict[str, str] = field(default_factory=dict)  # slice id -> what its members look like
    unenforced: list[str] = field(default_factory=list)  # rules set aside at load, and why

    def matches(self, canonical: str) -> bool:
        url, _, version = canonical.partition("|")
        return url == self.url and (not version or not self.version or version == self.version)


# ---------------------------------------------------------------- loading
def _normalize(element_id: str) -> str:
    """`value[x]:valueQuantity` is the type slice R4 writes as `valueQuantity`: one name for both."""
    parts = []
    for part in element_id.split("."):
        name, _, sliced = part.partition(":")
        if name.endswith("[x]") and sliced.startswith(name[:-3]) and sliced[len(name) - 3:][:1].isupper():
            part = sliced
        parts.append(part)
    return ".".join(parts)


def _steps(element_id: str) -> tuple[tuple[Step, ...], tuple[str | None, ...]]:
    parts = element_id.split(".")[1:]
    steps: list[Step] = []
    slice_ids: list[str | None] = []
    for i, part in enumerate(parts):
        name, _, sliced = part.partition(":")
        choice = name.endswith("[x]")
        steps.append(Step(name[:-3] if choice else name, choice, sliced or None))
        slice_ids.append(".".join(element_id.split(".")[: i + 2]) if sliced else None)
    return tuple(steps), tuple(slice_ids)


def _typed(element: dict[str, Any], prefix: str) -> tuple[bool, Any]:
    for key, value in element.items():
        if key.startswith(prefix) and key[len(prefix):][:1].isupper():
            return True, value
    return False, None


def _parse_element(raw: dict[str, Any], type_name: str, source: str) -> Element:
    eid = _normalize(str(raw.get("id") or raw.get("path") or ""))
    if eid.split(".")[0] != type_name:
        raise ProfileError(f"{source}: element {eid!r} is not in {type_name}")
    steps, slice_ids = _steps(eid)
    maximum = raw.get("max")
    has_fixed, fixed = _typed(raw, "fixed")
    has_pattern, pattern = _typed(raw, "pattern")
    types = [t for t in raw.get("type", []) if isinstance(t, dict) and isinstance(t.get("code"), str)]
    choice = bool(steps) and steps[-1].choice
    constraints = tuple(_parse_constraint(c) for c in raw.get("constraint", []))
    for key in raw:
        if _UNENFORCED.match(key):
            log.warning("%s: %s of %s is not enforced by this server", source, key, eid)
    return Element(
        id=eid, steps=steps, slice_ids=slice_ids,
        min=raw.get("min") if isinstance(raw.get("min"), int) else None,
        max=int(maximum) if isinstance(maximum, str) and maximum.isdigit() else None,
        fixed=fixed, has_fixed=has_fixed, pattern=pattern, has_pattern=has_pattern,
        choice_types=tuple(t["code"] for t in types) if choice else (),
        targets=tuple(p for t in types if t["code"] == "Reference" for p in t.get("targetProfile", [])),
        constraints=constraints, slicing=raw.get("slicing"),
        type_profiles=tuple(p for t in types for p in t.get("profile", []) if isinstance(p, str)),
        binding=_binding(raw.get("binding")), must_support=raw.get("mustSupport") is True,
    )


def _binding(raw: object) -> tuple[str, str] | None:
    """Only the strengths that constrain a write: `preferred` and `example` are advice."""
    if not isinstance(raw, dict) or raw.get("strength") not in ("required", "extensible"):
        return None
    vs = raw.get("valueSet")
    return (str(raw["strength"]), vs) if isinstance(vs, str) else None


def _load_profile(path: Path) -> Profile:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{path.name}: {exc}") from None
    return profile_from(doc, path.name)


def profile_from(doc: dict[str, Any], source: str) -> Profile:
    """A constraining StructureDefinition (a shipped file or an installed package's) as checks."""
    if doc.get("resourceType") != "StructureDefinition" or doc.get("derivation") != "constraint":
        raise ProfileError(f"{source}: not a constraining StructureDefinition")
    for key in ("url", "type", "baseDefinition"):
        if not isinstance(doc.get(key), str):
            raise ProfileError(f"{source}: {key} is missing")
    raw_elements = (doc.get("differential") or {}).get("element")
    if not isinstance(raw_elements, list):
        raise ProfileError(f"{source}: differential.element is missing")
    elements = [_parse_element(e, doc["type"], source) for e in raw_elements]
    return Profile(url=doc["url"], version=doc.get("version"),
                   name=str(doc.get("name") or doc.get("id") or source), type=doc["type"],
                   base=doc["baseDefinition"], source=source, elements=elements, by_id={e.id: e for e in elements})


# ---------------------------------------------------------------- invariants
def _split_top(expr: str, word: str) -> list[str]:
    """Split at `word` outside parentheses and string literals."""
    parts, depth, start, i, quoted = [], 0, 0, 0, False
    pattern = re.compile(rf"\s+{word}\s+")
    while i < len(expr):
        ch = expr[i]
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and (m := pattern.match(expr, i)):
            parts.append(expr[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    return parts


def _strip_parens(expr: str) -> str:
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, ch in enumerate(expr):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def _truth(nodes: list[tuple[Any, Any]]) -> bool | None:
    if not nodes:
        return None
    if len(nodes) == 1 and isinstance(nodes[0][0], bool):
        return bool(nodes[0][0])
    return True


def _compile_invariant(expression: str) -> Test:
    """Boolean connectives here (lowest precedence first), the leaves by the search FHIRPath subset."""
    expr = _strip_parens(expression.strip())
    for word in ("implies", "or", "xor", "and"):
        parts = _split_top(expr, word)
        if len(parts) > 1:
            tests = [_compile_invariant(p) for p in parts]
            return _combine(word, tests)
    leaf = compile_relative(expr)
    return lambda value: _truth(leaf([(value, None)]))


def _combine(word: str, tests: list[Test]) -> Test:
    def run(value: object) -> bool | None:
        results = [t(value) for t in tests]
        if word == "and":
            return False if False in results else (None if None in results else True)
        if word == "or":
            return True if True in results else (None if None in results else False)
        if word == "xor":
            return None if None in results else sum(bool(r) for r in results) % 2 == 1
        acc = results[0]  # implies, left to right
        for right in results[1:]:
            acc = True if acc is False or right is True else (None if acc is None or right is None else False)
        return acc

    return run


def _parse_constraint(raw: dict[str, Any]) -> Constraint:
    key, expression = str(raw.get("key", "?")), raw.get("expression")
    severity = "warning" if raw.get("severity") == "warning" else "error"
    human = str(raw.get("human", ""))
    if not isinstance(expression, str):
        return Constraint(key, severity, human, None, "no FHIRPath expression")
    try:
        return Constraint(key, severity, human, _compile_invariant(expression))
    except UnsupportedExpression as exc:
        log.warning("constraint %s (%s) is not evaluated: %s", key, expression, exc)
        return Constraint(key, severity, human, None, f"unsupported FHIRPath ({exc})")


# ---------------------------------------------------------------- matching
