"""Profiles this server ships (`profiles/StructureDefinition-*.json`) or installs from IG
packages, and a small, data-driven evaluator of their differentials.

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

- an extension slice (typed with an extension definition's profile) is known by its `url`, and
  each member is checked against that definition;
- `required` (error) and `extensible` (warning) bindings, against the value sets installed IG
  packages bring (bindings.py); what the server cannot tell is reported as not checked.

Not enforced: min/maxValue, maxLength; mustSupport is reported by $validate (absent elements, as
information), never enforced. A profile whose baseDefinition is another
known profile is checked against that one too. Installed IG packages (`fhirserver ig install`)
add their profiles, extension definitions, value sets and code systems to the shipped ones.
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

from .bindings import Terminology, check_binding, codings
from .errors import Issue
from .packages import Package
from .profile_model import CORE, Element, Node, Profile, ProfileError, Step, _load_profile, profile_from

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

    def __init__(self, profiles: Sequence[Profile], terminology: Terminology | None = None) -> None:
        self._profiles = {p.url: p for p in profiles}
        self.terminology = terminology or Terminology(())
        for profile in profiles:
            self._link(profile)
        for profile in profiles:
            self._inherit_slices(profile)

    @classmethod
    def load(cls, profiles_dir: Path, packages: Sequence[Package] = ()) -> ProfileRegistry:
        """The shipped profiles plus those of installed IG packages (a package's profile with the
        same canonical URL as a shipped one replaces it: the package is the newer publication)."""
        key = (profiles_dir.resolve(), tuple(p.sha256 for p in packages))
        with _LOCK:
            if key not in _LOADED:
                profiles = {p.url: p for p in map(_load_profile, sorted(profiles_dir.glob("StructureDefinition-*.json")))}
                terms: list[dict[str, Any]] = [json.loads(p.read_text()) for pattern in ("CodeSystem-*.json",
                                               "ValueSet-*.json") for p in sorted(profiles_dir.glob(pattern))]
                for package in packages:
                    for source, doc in package.resources:
                        if doc.get("resourceType") in ("CodeSystem", "ValueSet"):
                            terms.append(doc)
                        elif doc.get("resourceType") == "StructureDefinition" and doc.get("derivation") == "constraint":
                            profile = profile_from(doc, f"{package.label}/{source}")
                            profiles[profile.url] = profile
                _LOADED[key] = cls(list(profiles.values()), Terminology(terms))
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
            if slicing is None and element.steps[-1].name in _EXTENSIONS and element.type_profiles:
                # every element's extensions are sliced by url in the base resource definitions
                url = element.type_profiles[0].partition("|")[0]
                profile.members[element.id] = _url_test(url)
                profile.described[element.id] = f"url {url}"
                continue
            if slicing is None:
                raise ProfileError(f"{profile.source}: slice {element.id} has no slicing on {sliced_id}")
            checks: list[tuple[tuple[Step, ...], Element]] = []
            binding_checks: list[str] = []
            for disc in slicing.get("discriminator", []):
                path = str(disc.get("path", ""))
                if disc.get("type") not in ("value", "pattern") or not re.fullmatch(r"\$this|[A-Za-z.]+", path):
                    raise ProfileError(f"{profile.source}: discriminator {disc} of {sliced_id} "
                                       "is not supported")
                target_id = element.id if path == "$this" else f"{element.id}.{path}"
                target = next((t for p in self._chain(profile) if (t := p.by_id.get(target_id)) is not None
                               and (t.has_fixed or t.has_pattern)), None)
                if target is None and path == "$this" and element.binding and element.binding[0] == "required":
                    binding_checks.append(element.binding[1])  # slicing by value set
                    continue
                if target is None:
                    raise ProfileError(f"{profile.source}: slice {element.id} has no fixed or pattern value "
                                       f"at discriminator {path}")
                rel = () if path == "$this" else tuple(Step(n) for n in path.split("."))
                checks.append((rel, target))
            if not checks and not binding_checks:
                raise ProfileError(f"{profile.source}: slicing of {sliced_id} has no discriminator")
            profile.members[element.id] = _member_test(checks, binding_checks, self.terminology)
            profile.described[element.id] = ", ".join([f"a code from {vs}" for vs in binding_checks] + [
                ("" if not rel else ".".join(s.name for s in rel) + " ")
                + _summary(target.pattern if target.has_pattern else target.fixed) for rel, target in checks])

    def _inherit_slices(self, profile: Profile) -> None:
        """A path through a slice the base profile declares uses the base's membership test; an
        element whose path names a slice no profile in the chain declares (US Core 6.1's
        tribal-affiliation has `tribeName.value[x]` with no `tribeName`) cannot be applied
        faithfully: it is set aside and reported, not guessed."""
        kept = []
        for element in profile.elements:
            missing = [sid for sid in element.slice_ids if sid is not None and sid not in profile.members
                       and not self._copy_member(profile, sid)]
            if missing:
                profile.unenforced.append(f"{element.id}: the slice {missing[0]} is not defined")
                log.warning("%s: %s", profile.source, profile.unenforced[-1])
            else:
                kept.append(element)
        profile.elements = kept

    def _copy_member(self, profile: Profile, slice_id: str) -> bool:
        for base in self._chain(profile)[1:]:
            if slice_id in base.members:
                profile.members[slice_id] = base.members[slice_id]
                profile.described[slice_id] = base.described[slice_id]
                return True
        return False

    # ------------------------------------------------------------ evaluation
    def check(self, resource: dict[str, Any], root: str, claimed: Sequence[str],
              extra: Sequence[str] = (), must_support: bool = False) -> list[Issue]:
        """Issues for the known profiles among `claimed` (meta.profile) and `extra` ($validate's
        `profile`). A claimed profile this server does not know is an information issue only.
        `must_support`: also say which must-support elements are absent (for $validate)."""
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
            issues.extend(_check_profile(profile, resource, root, self, resource, must_support=must_support))
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


_LOADED: dict[tuple[Path, tuple[str, ...]], ProfileRegistry] = {}
_LOCK = threading.Lock()
_EXTENSIONS = ("extension", "modifierExtension")
_MAX_NESTING = 4  # extension profiles applied inside extension profiles


def _url_test(url: str) -> Callable[[Any], bool]:
    return lambda item: isinstance(item, dict) and item.get("url") == url


def _member_test(checks: list[tuple[tuple[Step, ...], Element]], value_sets: Sequence[str],
                 terms: Terminology) -> Callable[[Any], bool]:
    """A slice's membership: its discriminators' fixed/pattern values, or (slicing by value set) a
    code in its required binding's value set -- a code the server cannot place is not a member."""
    def member(item: object) -> bool:
        for vs in value_sets:
            coded = codings(item) or []
            if not any(terms.member(vs, system, code) for system, code in coded):
                return False
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


def _check_profile(profile: Profile, value: object, root: str, registry: ProfileRegistry,
                   resource: dict[str, Any], depth: int = 0, must_support: bool = False) -> list[Issue]:
    """`value` (the resource, or an extension for an extension's profile) against one profile."""
    issues: list[Issue] = []
    of = f"(profile {profile.url})"
    for el in profile.elements:
        if not el.steps:  # the resource itself: only its constraints apply
            issues.extend(_check_value(el, value, root, of, resource, registry))
            continue
        last = el.steps[-1]
        for parent in _select(profile, [(value, root)], el.steps[:-1], el.slice_ids[:-1]):
            nodes = _select(profile, [parent], el.steps[-1:], el.slice_ids[-1:])
            label = f"{parent[1]}.{last.name}"
            if el.min and len(nodes) < el.min:
                need = f" matching {profile.described[el.id]}" if last.slice else ""
                issues.append(Issue("required", f"{el.id}: at least {el.min} required{need} {of}, "
                                                f"found {len(nodes)}", expression=[label]))
            if must_support and el.must_support and not nodes:
                issues.append(Issue("informational", f"{el.id}: a must-support element is absent {of}",
                                    "information", [label]))
            if el.max is not None and len(nodes) > el.max:
                issues.append(Issue("structure", f"{el.id}: at most {el.max} allowed {of}, found {len(nodes)}",
                                    expression=[label]))
            if el.slicing and el.slicing.get("rules") == "closed":
                members = [m for sid, m in profile.members.items() if sid.rsplit(":", 1)[0] == el.id]
                for node, at in nodes:
                    if not any(m(node) for m in members):
                        issues.append(Issue("structure", f"{el.id}: matches none of the slices the profile allows "
                                                         f"{of}", expression=[at]))
            for node, at in nodes:
                issues.extend(_check_value(el, node, at, of, resource, registry))
                if el.type_profiles and depth < _MAX_NESTING:
                    issues.extend(_check_element_profiles(el, node, at, registry, resource, depth, must_support))
    return issues


def _check_element_profiles(el: Element, value: object, at: str, registry: ProfileRegistry,
                            resource: dict[str, Any], depth: int, must_support: bool) -> list[Issue]:
    """An element typed with a profile (an extension slice and its extension definition)."""
    issues: list[Issue] = []
    for canonical in el.type_profiles:
        inner = registry.resolve(canonical)
        if inner is not None:
            for p in registry._chain(inner):
                issues.extend(_check_profile(p, value, at, registry, resource, depth + 1, must_support))
    return issues


def _check_value(el: Element, value: object, at: str, of: str, resource: dict[str, Any],
                 registry: ProfileRegistry) -> list[Issue]:
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
        allowed = [registry._target_type(t) for t in el.targets]
        named = _reference_type(value, resource)
        if named and None not in allowed and named not in allowed:
            issues.append(Issue("value", f"{el.id}: must reference {' or '.join(sorted(set(map(str, allowed))))} "
                                         f"{of}", expression=[at]))
    if el.binding is not None:
        issues.extend(check_binding(el.id, el.binding, value, at, of, registry.terminology))
    for c in el.constraints:
        if c.test is None:
            issues.append(Issue("informational", f"Constraint {c.key} {of} was not evaluated: {c.reason}",
                                "information", [at]))
        elif c.test(value) is False:
            issues.append(Issue("invariant", f"{c.key}: {c.human} {of}", c.severity, [at]))
    return issues
