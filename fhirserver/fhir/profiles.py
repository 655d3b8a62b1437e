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
from decimal import Decimal
from pathlib import Path
from typing import Any

from .errors import Issue
from .profile_model import CORE, Element, Node, Profile, ProfileError, Step, _load_profile

log = logging.getLogger(__name__)


def _same(a: object, b: object) -> bool:
    numbers = (int, float, Decimal)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return Decimal(str(a)) == Decimal(str(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _contains(instance: object, pattern: object) -> bool:
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
    def member(item: object) -> bool:
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


def _summary(value: object) -> str:
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


def _check_value(el: Element, value: object, at: str, of: str, resource: dict[str, Any],
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
