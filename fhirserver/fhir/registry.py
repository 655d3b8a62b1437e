"""The resource-type registry: which types exist, which interactions each supports, and which
search parameters put a resource in a patient's compartment. Loaded from profiles/ (data), used
by the router, the pipeline and the CapabilityStatement alike, so they cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReadAccess:
    """Who may read a type beyond what scopes say (the audit trail is an auditor's to read)."""

    explicit_scope: bool = False  # a wildcard scope (system/*.rs) does not grant it
    client_role: str | None = None  # only clients registered with this role (besides the patient's own)
    purposes: frozenset[str] = frozenset()  # purposes of use under which it may be read (empty: any)


INSTANCE_INTERACTIONS = ("read", "vread", "update", "delete", "history-instance")
TYPE_INTERACTIONS = ("create", "search-type", "history-type")


@dataclass(frozen=True)
class ResourceType:
    name: str
    interactions: frozenset[str]
    conditional_create: bool
    conditional_update: bool
    compartment_params: tuple[str, ...]  # params linking this type to Patient compartments
    server_written: bool  # clients may not write (AuditEvent)
    operations: tuple[tuple[str, str, str], ...] = ()  # (name, level, definition url)
    read_access: ReadAccess = ReadAccess()
    store: str = "resources"  # where its rows live: "resources" or "access-records" (search/sources.py)
    compartment_via: tuple[str, ...] = ()  # references whose targets' compartments it joins (Binary)
    owned_by_client: bool = False  # rows are its writer's alone (Subscription): fhir/ownership.py

    def supports(self, interaction: str) -> bool:
        return interaction in self.interactions

    def operation(self, name: str, level: str) -> bool:
        return any(n == name and lv == level for n, lv, _d in self.operations)


class TypeRegistry:
    def __init__(self, types: dict[str, ResourceType],
                 system_operations: dict[str, tuple[str, frozenset[str]]] | None = None) -> None:
        self._types = types
        self.system_operations = system_operations or {}  # name -> (definition, allowed methods)

    def get(self, name: str) -> ResourceType | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._types[n] for n in self.names())


def _read_access(entry: dict[str, object]) -> ReadAccess:
    purposes = entry.get("purposes") or []
    role = entry.get("clientRole")
    return ReadAccess(bool(entry.get("explicitScope", False)), str(role) if role else None,
                      frozenset(str(p) for p in purposes) if isinstance(purposes, list) else frozenset())


def load_type_registry(profiles_dir: Path) -> TypeRegistry:
    spec = json.loads((profiles_dir / "resource-types.json").read_text())
    comp = json.loads((profiles_dir / "compartmentdefinition-patient.json").read_text())
    comp_params = {r["code"]: tuple(r.get("param", [])) for r in comp["resource"]}
    types = {}
    for name, entry in spec["types"].items():
        types[name] = ResourceType(
            name=name,
            interactions=frozenset(entry["interactions"]),
            conditional_create=entry.get("conditionalCreate", False),
            conditional_update=entry.get("conditionalUpdate", False),
            compartment_params=(tuple(str(c) for c in entry["compartmentParams"]) if "compartmentParams" in entry
                                else comp_params.get(name, ())),
            server_written=entry.get("serverWritten", False),
            operations=tuple((o["name"], o["level"], o.get("definition", "")) for o in entry.get("operations", [])),
            read_access=_read_access(entry.get("readAccess") or {}),
            store=str(entry.get("store", "resources")),
            compartment_via=tuple(str(e) for e in entry.get("compartmentVia", [])),
            owned_by_client=bool(entry.get("ownedByClient", False)),
        )
    system = {o["name"]: (o.get("definition", ""), frozenset(o.get("methods", ["GET", "POST"])))
              for o in spec.get("systemOperations", [])}
    return TypeRegistry(types, system)
