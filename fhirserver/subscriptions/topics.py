"""The SubscriptionTopics this server serves, as data (profiles/subscription-topics.json), and the
implicit topic of an R4 criteria-string subscription (`Observation?patient=...`, as HAPI takes)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
CRITERIA_TOPIC = "urn:fhirserver:criteria"  # the topic of an R4 criteria-string subscription
PATIENT_FILTER = "patient"  # every type: "in this patient's compartment"


@dataclass(frozen=True)
class Trigger:
    resource: str
    interactions: frozenset[str]  # create / update (as the R5 SubscriptionTopic names them)
    element: str = ""  # a transition: fires when `element` enters one of `to`
    to: frozenset[str] = frozenset()

    def fires(self, method: str, current: dict[str, Any] | None, previous: dict[str, Any] | None) -> bool:
        if ("create" if method == "POST" else "update") not in self.interactions:
            return False
        if not self.element:
            return True
        now = (current or {}).get(self.element)
        before = (previous or {}).get(self.element)
        return now in self.to and before not in self.to


@dataclass(frozen=True)
class Topic:
    url: str
    title: str
    description: str
    triggers: dict[str, Trigger]  # resource type -> trigger
    filters: dict[str, frozenset[str]]  # resource type ("*" for any) -> filter parameters

    def may_filter(self, rtype: str, param: str) -> bool:
        return param in self.filters.get("*", frozenset()) or param in self.filters.get(rtype, frozenset())


class Topics:
    def __init__(self, topics: Iterable[Topic], criteria_types: Iterable[str] = ()) -> None:
        self._by_url = {t.url: t for t in topics}
        self.criteria_types = frozenset(criteria_types)  # types an R4 criteria string may name

    def get(self, url: str) -> Topic | None:
        return self._by_url.get(url)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_url[u] for u in sorted(self._by_url))

    def resource_types(self) -> set[str]:
        return {r for t in self._by_url.values() for r in t.triggers}


def criteria_topic(rtype: str) -> Topic:
    """An R4 `criteria` of `rtype?query`: creates and updates of that type, any search parameter."""
    return Topic(CRITERIA_TOPIC, f"R4 criteria on {rtype}", "", {rtype: Trigger(rtype, frozenset({"create", "update"}))},
                 {})


def load_topics(profiles_dir: Path, compartment_types: Iterable[str], criteria_types: Iterable[str]) -> Topics:
    spec = json.loads((profiles_dir / "subscription-topics.json").read_text())
    in_compartment = sorted(compartment_types)
    out = []
    for entry in spec["topics"]:
        triggers: dict[str, Trigger] = {}
        for trig in entry["resourceTrigger"]:
            transition = trig.get("transition") or {}
            names = in_compartment if trig["resource"] == "*" else [trig["resource"]]
            for name in names:
                triggers[name] = Trigger(name, frozenset(trig["interactions"]), str(transition.get("element", "")),
                                         frozenset(transition.get("to", [])))
        filters: dict[str, set[str]] = {}
        for f in entry.get("canFilterBy", []):
            filters.setdefault(f["resource"], set()).add(f["filterParameter"])
        out.append(Topic(entry["url"], entry["title"], entry.get("description", ""), triggers,
                         {k: frozenset(v) for k, v in filters.items()}))
    return Topics(out, criteria_types)
