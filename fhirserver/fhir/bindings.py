"""Value-set membership for profile bindings, over the CodeSystems and ValueSets that the shipped
profiles and installed IG packages bring (docs/profiles.md).

A binding check must never guess: membership is True, False, or None when this server cannot
tell -- a value set or code system it does not hold (LOINC, SNOMED CT, VSAC value sets), or a filter
it does not evaluate. None is reported as "not checked", never as a violation. An `include` of a
whole code system this server does not hold admits every code of that system (the system is
checked, the code's existence is not)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from .errors import FhirError, Issue
from .terminology import MAX_IMPORT_DEPTH, Concept, concepts, matches_filters

Coded = tuple[str | None, str]  # (system, or None for a bare `code`; code)
_CACHE_LIMIT = 50_000


def codings(value: object) -> list[Coded] | None:
    """The codes a bound element holds: a `code`, a Coding, a Quantity or a CodeableConcept
    (its codings; [] when it has text only). None: not a coded value at all."""
    if isinstance(value, str):
        return [(None, value)]
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("coding"), list) or "text" in value and "code" not in value:
        return [(c.get("system") if isinstance(c.get("system"), str) else None, c["code"])
                for c in value.get("coding") or [] if isinstance(c, dict) and isinstance(c.get("code"), str)]
    if isinstance(value.get("code"), str):
        return [(value.get("system") if isinstance(value.get("system"), str) else None, value["code"])]
    return None


def _canonical(url: str) -> tuple[str, str | None]:
    base, _, version = url.partition("|")
    return base, version or None


class Terminology:
    """Membership tests over a fixed set of CodeSystem and ValueSet resources (loaded at startup)."""

    def __init__(self, resources: Iterable[dict[str, Any]]) -> None:
        self._code_systems: dict[str, dict[str, Any]] = {}
        self._value_sets: dict[str, dict[str, Any]] = {}
        self._codes: dict[str, dict[str, Concept]] = {}  # system url -> {code: Concept}
        self._cache: dict[tuple[str, str | None, str], bool | None] = {}
        for doc in resources:
            url = doc.get("url")
            if not isinstance(url, str):
                continue
            if doc.get("resourceType") == "CodeSystem" and doc.get("content") in ("complete", "fragment", None):
                self._code_systems[url] = doc
            elif doc.get("resourceType") == "ValueSet":
                self._value_sets[url] = doc

    def decidable(self, url: str, depth: int = 0) -> bool:
        """Whether membership in the value set can always be told here: enumerated concepts, `code
        regex` filters, filters over code systems held here, imports of decidable value sets."""
        vs = self._value_sets.get(_canonical(url)[0])
        if vs is None or depth > MAX_IMPORT_DEPTH:
            return False
        compose = vs.get("compose")
        if not isinstance(compose, dict):
            return bool((vs.get("expansion") or {}).get("contains"))
        for part in [*(compose.get("include") or []), *(compose.get("exclude") or [])]:
            filters = [f for f in part.get("filter") or [] if isinstance(f, dict)]
            system = part.get("system")
            if isinstance(system, str) and system not in self._code_systems:
                if filters and not _regex_only(filters):
                    return False  # filters over a code system not held here
                if not filters and not part.get("concept"):
                    return False  # a whole code system not held: its codes are not known here
            if not all(self.decidable(str(u), depth + 1) for u in part.get("valueSet") or []):
                return False
        return True

    def member(self, value_set: str, system: str | None, code: str) -> bool | None:
        key = (value_set, system, code)
        if key not in self._cache:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = self._in_value_set(_canonical(value_set)[0], system, code, 0)
        return self._cache[key]

    # ------------------------------------------------------------ evaluation
    def _concept(self, system: str, code: str) -> Concept | None:
        if system not in self._codes:
            self._codes[system] = {c.code: c for c in concepts(self._code_systems[system])}
        return self._codes[system].get(code)

    def _in_value_set(self, url: str, system: str | None, code: str, depth: int) -> bool | None:
        vs = self._value_sets.get(url)
        if vs is None or depth > MAX_IMPORT_DEPTH:
            return None
        compose = vs.get("compose")
        if not isinstance(compose, dict):
            listed = (vs.get("expansion") or {}).get("contains") or []
            if not listed:
                return None
            return any(c.get("code") == code and (system is None or c.get("system") == system)
                       for c in listed if isinstance(c, dict))
        included = _any(self._in_part(p, system, code, depth) for p in compose.get("include") or [])
        if included is not True:
            return included
        excluded = _any(self._in_part(p, system, code, depth) for p in compose.get("exclude") or [])
        return None if excluded is None else not excluded

    def _in_part(self, part: dict[str, Any], system: str | None, code: str, depth: int) -> bool | None:
        result: bool | None = True
        part_system = part.get("system")
        if isinstance(part_system, str):
            result = self._in_system_part(part, part_system, system, code)
        for imported in part.get("valueSet") or []:
            if result is False:
                return False
            inner = self._in_value_set(_canonical(str(imported))[0], system, code, depth + 1)
            result = False if inner is False else (None if inner is None or result is None else True)
        return result

    def _in_system_part(self, part: dict[str, Any], part_system: str, system: str | None, code: str) -> bool | None:
        if system is not None and system != part_system:
            return False
        listed = [c.get("code") for c in part.get("concept") or [] if isinstance(c, dict)]
        if listed:
            return code in listed
        filters = [f for f in part.get("filter") or [] if isinstance(f, dict)]
        if filters and _regex_only(filters):
            return all(_regex(str(f.get("value") or "")).fullmatch(code) is not None for f in filters)
        if part_system not in self._code_systems:
            return None if filters else True
        concept = self._concept(part_system, code)
        if concept is None:
            return False
        try:
            return matches_filters(concept, filters)
        except FhirError:
            return None


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    """A `code regex` filter's pattern (from a loaded ValueSet: the server's or an installed
    package's, never a request's); one that does not compile matches nothing."""
    try:
        return re.compile(pattern)
    except re.error:
        return re.compile(r"(?!)")


def _regex_only(filters: list[dict[str, Any]]) -> bool:
    """`code regex` filters alone: decided on the code itself, without its code system."""
    return all(f.get("property") == "code" and f.get("op") == "regex" for f in filters)


def _any(results: Iterable[bool | None]) -> bool | None:
    """True if any is True; otherwise None if any could not be told; otherwise False."""
    unknown = False
    for r in results:
        if r is True:
            return True
        unknown = unknown or r is None
    return None if unknown else False


def check_binding(element_id: str, binding: tuple[str, str], value: object, at: str, of: str,
                  terms: Terminology) -> list[Issue]:
    """A required binding is an error, an extensible one a warning (a code from elsewhere may be
    right when the value set has none that fits); a value set this server does not hold, or a
    code it cannot place, is reported as not checked."""
    strength, value_set = binding
    coded = codings(value)
    if coded is None:
        return []
    severity = "error" if strength == "required" else "warning"
    if not coded:
        if strength == "required":
            return [Issue("code-invalid", f"{element_id}: a code from {value_set} is required {of}", severity, [at])]
        return []
    results = [terms.member(value_set, system, code) for system, code in coded]
    if True in results:
        return []
    if None in results:
        return [Issue("informational", f"{element_id}: the {strength} binding to {value_set} was not checked "
                                       f"(this server does not hold what it needs) {of}", "information", [at])]
    return [Issue("code-invalid", f"{element_id}: the code is not in the value set {value_set} "
                                  f"({strength} binding) {of}", severity, [at])]
