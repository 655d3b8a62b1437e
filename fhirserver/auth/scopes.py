"""SMART scope grammar (v1 and v2) and the scope algebra used at the token and FHIR endpoints.

v1: `system/Observation.read`, `patient/*.write`, `user/Patient.*`
v2: `system/Observation.rs`, `patient/Observation.rs?category=http://...|laboratory`
Anything else that is not a known non-resource scope (openid, fhirUser, launch, ...) is invalid
and is never granted: unknown syntax is denied, not ignored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from dataclasses import dataclass

V2_ORDER = "cruds"
V1_PERMS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}
NON_RESOURCE_SCOPES = frozenset({
    "openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter",
    "offline_access", "online_access",
})
_RE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]+|\*)\.([a-z*]+)(\?.+)?$")

# Interaction -> the v2 permission letter it needs.
INTERACTION_PERMISSION = {
    "read": "r", "vread": "r", "history-instance": "r",
    "search-type": "s", "history-type": "s", "search-system": "s", "history-system": "s",
    "create": "c", "update": "u", "patch": "u", "delete": "d",
}


class InvalidScope(ValueError):
    pass


@dataclass(frozen=True)
class ResourceScope:
    context: str  # patient | user | system
    resource_type: str  # type name or "*"
    perms: frozenset[str]
    query: str = ""  # v2 granular restriction, e.g. "category=...|laboratory"
    v1: bool = False

    def covers_type(self, rtype: str) -> bool:
        return self.resource_type in ("*", rtype)

    def render(self) -> str:
        if self.v1:
            for word, perms in V1_PERMS.items():
                if perms == self.perms:
                    return f"{self.context}/{self.resource_type}.{word}"
        letters = "".join(c for c in V2_ORDER if c in self.perms)
        return f"{self.context}/{self.resource_type}.{letters}" + (f"?{self.query}" if self.query else "")


def parse_resource_scope(text: str) -> ResourceScope:
    m = _RE.match(text)
    if not m:
        raise InvalidScope(text)
    context, rtype, perms, query = m.group(1), m.group(2), m.group(3), (m.group(4) or "")[1:]
    if perms in V1_PERMS:
        if query:
            raise InvalidScope(text)
        return ResourceScope(context, rtype, V1_PERMS[perms], "", v1=True)
    # v2: letters in c r u d s order, no repeats
    if not perms or any(c not in V2_ORDER for c in perms):
        raise InvalidScope(text)
    positions = [V2_ORDER.index(c) for c in perms]
    if positions != sorted(set(positions)):
        raise InvalidScope(text)
    return ResourceScope(context, rtype, frozenset(perms), query)


@dataclass(frozen=True)
class ScopeSet:
    resource: tuple[ResourceScope, ...]
    other: frozenset[str]

    def render(self) -> str:
        return " ".join([*(s.render() for s in self.resource), *sorted(self.other)])

    def for_interaction(self, rtype: str, interaction: str, explicit_only: bool = False) -> list[ResourceScope]:
        """The scopes permitting `interaction` on `rtype`; with `explicit_only`, a wildcard type
        (`system/*.rs`) does not count: the scope must name the type."""
        perm = INTERACTION_PERMISSION.get(interaction)
        if perm is None:
            return []
        return [s for s in self.resource if s.covers_type(rtype) and perm in s.perms
                and not (explicit_only and s.resource_type == "*")]

    def contexts(self) -> set[str]:
        return {s.context for s in self.resource}


@functools.lru_cache(maxsize=1024)
def parse_scopes(text: str, strict: bool = True) -> ScopeSet:
    """Parse a space-separated scope string. strict=True raises on any unknown scope. Kept per
    string (a ScopeSet is immutable): every request parses its token's scopes."""
    resource: list[ResourceScope] = []
    other: set[str] = set()
    for word in (text or "").split():
        if word in NON_RESOURCE_SCOPES:
            other.add(word)
            continue
        try:
            resource.append(parse_resource_scope(word))
        except InvalidScope:
            if strict:
                raise
    return ScopeSet(tuple(dict.fromkeys(resource)), frozenset(other))


def _intersect_one(req: ResourceScope, reg: ResourceScope) -> ResourceScope | None:
    if req.context != reg.context:
        return None
    if req.resource_type == "*":
        rtype = reg.resource_type
    elif reg.resource_type in ("*", req.resource_type):
        rtype = req.resource_type
    else:
        return None
    perms = req.perms & reg.perms
    if not perms:
        return None
    if req.query and reg.query and req.query != reg.query:
        return None
    query = req.query or reg.query
    v1 = req.v1 and not query and any(perms == p for p in V1_PERMS.values())
    return ResourceScope(req.context, rtype, frozenset(perms), query, v1)


def intersect(requested: str, registered: str, known_types: Collection[str] | None = None) -> ScopeSet:
    """The granted scopes: what was asked for, narrowed to what the client is registered for.

    Invalid requested scopes, and scopes naming resource types this server does not serve
    (`known_types`), are dropped (never granted); the caller decides whether an empty result is
    an error.
    """
    req = parse_scopes(requested, strict=False)
    reg = parse_scopes(registered, strict=False)
    granted: list[ResourceScope] = []
    for r in req.resource:
        for g in reg.resource:
            got = _intersect_one(r, g)
            if got is not None and known_types is not None and got.resource_type not in ("*", *known_types):
                continue
            if got is not None and got not in granted:
                granted.append(got)
    return ScopeSet(tuple(granted), frozenset(req.other & reg.other))


def invalid_scopes(text: str) -> list[str]:
    bad = []
    for word in (text or "").split():
        if word in NON_RESOURCE_SCOPES:
            continue
        try:
            parse_resource_scope(word)
        except InvalidScope:
            bad.append(word)
    return bad
