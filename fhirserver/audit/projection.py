"""The per-patient projection of an AuditEvent: what a patient (or their guardian) is shown of an
access that may have touched several patients at once -- a clinician's search, an export, a batch.

The same event, with only that patient's own entities: other patients' Patient entities are
removed, and so are resources (and Consents) that are not in one of the reader's compartments; the
reader's Patient entity says how many patients the access involved in all, never who they were.
The accessor (app, organization, user) stays -- that is what the patient wants to know -- except
another patient acting for themselves, who is shown as "another patient".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

PATIENT_ROLE = "1"
OTHER_PATIENT = "another patient"


def _ref(entity: dict[str, Any]) -> str | None:
    ref = (entity.get("what") or {}).get("reference")
    return ref.split("/_history")[0] if isinstance(ref, str) else None


def refs_of(event: dict[str, Any]) -> list[str]:
    """The `Type/id` references of an event's entities (to look their compartments up)."""
    return [r for e in event.get("entity") or [] if isinstance(e, dict) and (r := _ref(e))]


def project(event: dict[str, Any], own: Iterable[str],
            owners: Callable[[list[str]], dict[str, set[str]]]) -> dict[str, Any]:
    """`event` as readers whose own patients are `own` may see it (in place; returned).
    `owners(refs)` gives each `Type/id` the patient ids whose compartments hold it."""
    mine = set(own)
    refs = [r for r in refs_of(event) if not r.startswith("Patient/")]
    held = owners(refs) if refs else {}
    kept, patients, shown = [], 0, []
    for entity in event.get("entity") or []:
        ref = _ref(entity) if isinstance(entity, dict) else None
        if ref is None:
            kept.append(entity)  # the query (values redacted), policies, the request id
            continue
        if ref.startswith("Patient/"):
            is_patient = (entity.get("role") or {}).get("code") == PATIENT_ROLE
            patients += 1 if is_patient else 0
            if ref.split("/", 1)[1] in mine:
                kept.append(entity)
                if is_patient:
                    shown.append(entity)
            continue
        if held.get(ref, set()) & mine:
            kept.append(entity)
    for entity in shown:
        if patients > 1:
            entity["description"] = f"this access involved {patients} patients; the others are not shown"
    event["entity"] = kept
    for agent in event.get("agent") or []:
        who = (agent.get("who") or {}).get("reference", "")
        if who.startswith("Patient/") and who.split("/", 1)[1] not in mine:
            agent["who"] = {"display": OTHER_PATIENT}
    return event
