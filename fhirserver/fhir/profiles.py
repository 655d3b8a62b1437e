"""Profiles this server ships (`profiles/StructureDefinition-*.json`) and a small, data-driven
evaluator of their differentials.

Why not a full FHIR validator: the profiles we ship only constrain elements, and a snapshot
generator plus a complete FHIRPath engine would dwarf the rest of the server. Adding a profile is a
JSON file; no code. Enforced, per differential element (ids like `Observation.category:VSCat`,
`Observation.value[x]:valueQuantity.system`):

- `min`/`max` per parent instance; a choice element (`effective[x]`) counts any of its typed forms;
- `type` of a choice element (`effective[x]` only as dateTime or Period);
- `fixed[x]` (equal) and `pattern[x]` (the instance contains the pattern: a CodeableConcept holding
  that coding);
- slices whose discriminators are `value`/`pattern` at `$this` or a child path carrying a fixed or
  pattern value (others fail at load time); `slicing.rules = closed`; slicing declared in a base
  profile applies to a derived profile's slices;
- `type.targetProfile` of a Reference: the type named by a literal reference (a target's own
  profile cannot be checked without reading it);
- `constraint`s: `and`/`or`/`implies` are combined here, their operands compiled by the search
  indexer's FHIRPath subset (paths, `exists()`, `empty()`, `not()`, `where()`, `=`, `ofType()`),
  e.g. vs-2 `(component.empty() and hasMember.empty()) implies (dataAbsentReason.exists() or
  value.exists())`. Anything else is reported as not evaluated (an information issue), never
  guessed.

Not enforced: bindings (no terminology service), mustSupport, min/maxValue, maxLength, type
profiles other than reference targets. A profile whose baseDefinition is another shipped profile
is checked against that one too.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .errors import Issue
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
    fixed: Any = None
    pattern: Any = None
    has_fixed: bool = False
    has_pattern: bool = False
    choice_types: tuple[str, ...] = ()  # allowed type codes of a choice element (`dateTime`, `Period`)
    targets: tuple[str, ...] = ()  # targetProfile canonicals of a Reference
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
    source: Path
    elements: list[Element]
    by_id: dict[str, Element]
    members: dict[str, Callable[[Any], bool]] = field(default_factory=dict)  # slice id -> member test
    described: dict[str, str] = field(default_factory=dict)  # slice id -> what its members look like

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


def _parse_element(raw: dict[str, Any], type_name: str, source: Path) -> Element:
    eid = _normalize(str(raw.get("id") or raw.get("path") or ""))
    if eid.split(".")[0] != type_name:
        raise ProfileError(f"{source.name}: element {eid!r} is not in {type_name}")
    steps, slice_ids = _steps(eid)
    maximum = raw.get("max")
    has_fixed, fixed = _typed(raw, "fixed")
    has_pattern, pattern = _typed(raw, "pattern")
    types = [t for t in raw.get("type", []) if isinstance(t, dict) and isinstance(t.get("code"), str)]
    choice = bool(steps) and steps[-1].choice
    constraints = tuple(_parse_constraint(c) for c in raw.get("constraint", []))
    for key in raw:
        if _UNENFORCED.match(key):
            log.warning("%s: %s of %s is not enforced by this server", source.name, key, eid)
    return Element(
        id=eid, steps=steps, slice_ids=slice_ids,
        min=raw.get("min") if isinstance(raw.get("min"), int) else None,
        max=int(maximum) if isinstance(maximum, str) and maximum.isdigit() else None,
        fixed=fixed, has_fixed=has_fixed, pattern=pattern, has_pattern=has_pattern,
        choice_types=tuple(t["code"] for t in types) if choice else (),
        targets=tuple(p for t in types if t["code"] == "Reference" for p in t.get("targetProfile", [])),
        constraints=constraints, slicing=raw.get("slicing"),
    )


def _load_profile(path: Path) -> Profile:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{path.name}: {exc}") from None
    if doc.get("resourceType") != "StructureDefinition" or doc.get("derivation") != "constraint":
        raise ProfileError(f"{path.name}: not a constraining StructureDefinition")
    for key in ("url", "type", "baseDefinition"):
        if not isinstance(doc.get(key), str):
            raise ProfileError(f"{path.name}: {key} is missing")
    raw_elements = (doc.get("differential") or {}).get("element")
    if not isinstance(raw_elements, list):
        raise ProfileError(f"{path.name}: differential.element is missing")
    elements = [_parse_element(e, doc["type"], path) for e in raw_elements]
    return Profile(url=doc["url"], version=doc.get("version"),
                   name=str(doc.get("name") or doc.get("id") or path.stem), type=doc["type"],
                   base=doc["baseDefinition"], source=path, elements=elements, by_id={e.id: e for e in elements})


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
    for word in ("implies", "or", "and"):
        parts = _split_top(expr, word)
        if len(parts) > 1:
            tests = [_compile_invariant(p) for p in parts]
            return _combine(word, tests)
    leaf = compile_relative(expr)
    return lambda value: _truth(leaf([(value, None)]))


def _combine(word: str, tests: list[Test]) -> Test:
    def run(value: Any) -> bool | None:
        results = [t(value) for t in tests]
        if word == "and":
            return False if False in results else (None if None in results else True)
        if word == "or":
            return True if True in results else (None if None in results else False)
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
def _same(a: Any, b: Any) -> bool:
    numbers = (int, float, Decimal)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return Decimal(str(a)) == Decimal(str(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _contains(instance: Any, pattern: Any) -> bool:
    """FHIR pattern[x]: every element of the pattern is in the instance; each pattern array item
    is matched by some instance item."""
    if isinstance(pattern, dict):
        return isinstance(instance, dict) and all(k in instance and _contains(instance[k], v)
                                                  for k, v in pattern.items())
    if isinstance(pattern, list):
        items = instance if isinstance(instance, list) else [instance]
        return all(any(_contains(i, p) for i in items) for p in pattern)
    return _same(instance, pattern)


def _children(nodes: list[Node], step: Step) -> list[Node]:
    out: list[Node] = []
    for value, where in nodes:
        if not isinstance(value, dict):
            continue
        for key in step.keys(value):
            child = value[key]
            if isinstance(child, list):
                out.extend((item, f"{where}.{key}[{i}]") for i, item in enumerate(child) if item is not None)
            else:
                out.append((child, f"{where}.{key}"))
    return out


def _reference_type(ref: dict[str, Any], resource: dict[str, Any]) -> str | None:
    """The resource type a literal reference names, or None when it cannot be told locally."""
    target = ref.get("reference")
    if not isinstance(target, str) or target.startswith("urn:"):
        return ref.get("type") if isinstance(ref.get("type"), str) else None
    if target.startswith("#"):
        for contained in resource.get("contained") or []:
            if isinstance(contained, dict) and contained.get("id") == target[1:]:
                return contained.get("resourceType")
        return None
    parts = target.split("?")[0].rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return parts[-2] if len(parts) >= 2 else None


# ---------------------------------------------------------------- the registry
class ProfileRegistry:
    """The shipped profiles by canonical URL; `check` gives OperationOutcome issues."""

    def __init__(self, profiles: Sequence[Profile]) -> None:
        self._profiles = {p.url: p for p in profiles}
        for profile in profiles:
            self._link(profile)

    @classmethod
    def load(cls, profiles_dir: Path) -> ProfileRegistry:
        key = profiles_dir.resolve()
        with _LOCK:
            if key not in _LOADED:
                paths = sorted(profiles_dir.glob("StructureDefinition-*.json"))
                _LOADED[key] = cls([_load_profile(p) for p in paths])
            return _LOADED[key]

    def __iter__(self) -> Iterator[Profile]:
        return iter(self._profiles[u] for u in sorted(self._profiles))

    def __len__(self) -> int:
        return len(self._profiles)

    def resolve(self, canonical: str) -> Profile | None:
        """A canonical, optionally `|version`; a version other than the shipped one is unknown."""
        profile = self._profiles.get(canonical.partition("|")[0])
        return profile if profile is not None and profile.matches(canonical) else None

    def urls_by_type(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for profile in self:
            out.setdefault(profile.type, []).append(profile.url)
        return out

    def _chain(self, profile: Profile) -> list[Profile]:
        chain: list[Profile] = []
        current: Profile | None = profile
        while current is not None and current not in chain:
            chain.append(current)
            current = self.resolve(current.base)
        return chain

    def _slicing(self, profile: Profile, sliced_id: str) -> dict[str, Any] | None:
        for p in self._chain(profile):
            element = p.by_id.get(sliced_id)
            if element is not None and element.slicing:
                return element.slicing
        return None

    def _link(self, profile: Profile) -> None:
        """Build each slice's membership test from its discriminators (fail now if we cannot)."""
        for element in profile.elements:
            if not element.steps or element.steps[-1].slice is None:
                continue
            sliced_id = element.id.rsplit(":", 1)[0]
            slicing = self._slicing(profile, sliced_id)
            if slicing is None:
                raise ProfileError(f"{profile.source.name}: slice {element.id} has no slicing on {sliced_id}")
            checks: list[tuple[tuple[Step, ...], Element]] = []
            for disc in slicing.get("discriminator", []):
                path = str(disc.get("path", ""))
                if disc.get("type") not in ("value", "pattern") or not re.fullmatch(r"\$this|[A-Za-z.]+", path):
                    raise ProfileError(f"{profile.source.name}: discriminator {disc} of {sliced_id} "
                                       "is not supported")
                target_id = element.id if path == "$this" else f"{element.id}.{path}"
                target = next((t for p in self._chain(profile) if (t := p.by_id.get(target_id)) is not None
                               and (t.has_fixed or t.has_pattern)), None)
                if target is None:
                    raise ProfileError(f"{profile.source.name}: slice {element.id} has no fixed or pattern value "
                                       f"at discriminator {path}")
                rel = () if path == "$this" else tuple(Step(n) for n in path.split("."))
                checks.append((rel, target))
            if not checks:
                raise ProfileError(f"{profile.source.name}: slicing of {sliced_id} has no discriminator")
            profile.members[element.id] = _member_test(checks)
            profile.described[element.id] = ", ".join(
                ("" if not rel else ".".join(s.name for s in rel) + " ")
                + _summary(target.pattern if target.has_pattern else target.fixed) for rel, target in checks)

    # ------------------------------------------------------------ evaluation
    def check(self, resource: dict[str, Any], root: str, claimed: Sequence[str],
              extra: Sequence[str] = ()) -> list[Issue]:
        """Issues for the known profiles among `claimed` (meta.profile) and `extra` ($validate's
        `profile`). A claimed profile this server does not know is an information issue only."""
        issues: list[Issue] = []
        todo: list[Profile] = []
        rtype = str(resource.get("resourceType"))
        wanted = [(url, f"{root}.meta.profile[{i}]") for i, url in enumerate(claimed)] + [(u, "") for u in extra]
        for url, where in wanted:
            profile = self.resolve(url)
            if profile is None:
                if where:
                    issues.append(Issue("informational", f"Profile {url[:200]} is not known to this server; "
                                                         "the claim was not checked", "information", [where]))
                continue
            if profile.type != rtype:
                issues.append(Issue("invalid", f"Profile {profile.url} constrains {profile.type}, not {rtype}",
                                    expression=[where] if where else [root]))
                continue
            todo.extend(p for p in self._chain(profile) if p not in todo)
        for profile in todo:
            issues.extend(_check_profile(profile, resource, root, self._target_type))
        seen: set[tuple[str, str, tuple[str, ...]]] = set()
        unique = []
        for issue in issues:
            key = (issue.severity, issue.diagnostics, tuple(issue.expression))
            if key not in seen:
                seen.add(key)
                unique.append(issue)
        return unique

    def _target_type(self, canonical: str) -> str | None:
        profile = self.resolve(canonical)
        if profile is not None:
            return profile.type
        tail = canonical.partition("|")[0].removeprefix(CORE)
        return tail if canonical.startswith(CORE) and tail.isalpha() else None


_LOADED: dict[Path, ProfileRegistry] = {}
_LOCK = threading.Lock()


def _member_test(checks: list[tuple[tuple[Step, ...], Element]]) -> Callable[[Any], bool]:
    def member(item: Any) -> bool:
        for rel, target in checks:
            values: list[Node] = [(item, "")]
            for step in rel:
                values = _children(values, step)
            if target.has_fixed and not any(_same(v, target.fixed) for v, _ in values):
                return False
            if target.has_pattern and not any(_contains(v, target.pattern) for v, _ in values):
                return False
        return True

    return member


def _select(profile: Profile, nodes: list[Node], steps: Sequence[Step],
            slice_ids: Sequence[str | None]) -> list[Node]:
    for step, slice_id in zip(steps, slice_ids, strict=True):
        nodes = _children(nodes, step)
        if slice_id is not None:
            member = profile.members[slice_id]
            nodes = [n for n in nodes if member(n[0])]
    return nodes


def _summary(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 200 else text[:197] + "..."


def _check_profile(profile: Profile, resource: dict[str, Any], root: str,
                   target_type: Callable[[str], str | None]) -> list[Issue]:
    issues: list[Issue] = []
    of = f"(profile {profile.url})"
    for el in profile.elements:
        if not el.steps:  # the resource itself: only its constraints apply
            issues.extend(_check_value(el, resource, root, of, resource, target_type))
            continue
        last = el.steps[-1]
        for parent in _select(profile, [(resource, root)], el.steps[:-1], el.slice_ids[:-1]):
            nodes = _select(profile, [parent], el.steps[-1:], el.slice_ids[-1:])
            label = f"{parent[1]}.{last.name}"
            if el.min and len(nodes) < el.min:
                need = f" matching {profile.described[el.id]}" if last.slice else ""
                issues.append(Issue("required", f"{el.id}: at least {el.min} required{need} {of}, "
                                                f"found {len(nodes)}", expression=[label]))
            if el.max is not None and len(nodes) > el.max:
                issues.append(Issue("structure", f"{el.id}: at most {el.max} allowed {of}, found {len(nodes)}",
                                    expression=[label]))
            if el.slicing and el.slicing.get("rules") == "closed":
                members = [m for sid, m in profile.members.items() if sid.rsplit(":", 1)[0] == el.id]
                for value, at in nodes:
                    if not any(m(value) for m in members):
                        issues.append(Issue("structure", f"{el.id}: matches none of the slices the profile allows "
                                                         f"{of}", expression=[at]))
            for value, at in nodes:
                issues.extend(_check_value(el, value, at, of, resource, target_type))
    return issues


def _check_value(el: Element, value: Any, at: str, of: str, resource: dict[str, Any],
                 target_type: Callable[[str], str | None]) -> list[Issue]:
    issues: list[Issue] = []
    if el.choice_types:
        suffix = at.rsplit(".", 1)[-1].split("[")[0][len(el.steps[-1].name):]
        if suffix not in {c[0].upper() + c[1:] for c in el.choice_types}:
            issues.append(Issue("structure", f"{el.id}: this type is not allowed {of}; allowed: "
                                             f"{', '.join(el.choice_types)}", expression=[at]))
    if el.has_fixed and not _same(value, el.fixed):
        issues.append(Issue("value", f"{el.id}: must be exactly {_summary(el.fixed)} {of}", expression=[at]))
    if el.has_pattern and not _contains(value, el.pattern):
        issues.append(Issue("value", f"{el.id}: must contain {_summary(el.pattern)} {of}", expression=[at]))
    if el.targets and isinstance(value, dict):
        allowed = [target_type(t) for t in el.targets]
        named = _reference_type(value, resource)
        if named and None not in allowed and named not in allowed:
            issues.append(Issue("value", f"{el.id}: must reference {' or '.join(sorted(set(map(str, allowed))))} "
                                         f"{of}", expression=[at]))
    for c in el.constraints:
        if c.test is None:
            issues.append(Issue("informational", f"Constraint {c.key} {of} was not evaluated: {c.reason}",
                                "information", [at]))
        elif c.test(value) is False:
            issues.append(Issue("invariant", f"{c.key}: {c.human} {of}", c.severity, [at]))
    return issues
