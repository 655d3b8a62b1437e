"""The notification Bundle of the R4 Subscriptions Backport IG (backport-subscription-notification-r4):
a `history` Bundle whose first entry is the subscription's status as a Parameters resource
(backport-subscription-status-r4), followed, for id-only and full-resource payloads, by one entry
per event's focus (full-resource: with the resource as the owner may read it)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ..fhir.dates import instant_text
from .topics import BACKPORT

STATUS_PROFILE = f"{BACKPORT}/backport-subscription-status-r4"
NOTIFICATION_PROFILE = f"{BACKPORT}/backport-subscription-notification-r4"


@dataclass(frozen=True)
class Item:
    """One event of a notification: its number and time, its focus, and the focus' body when the
    payload carries it."""

    number: int
    recorded_us: int
    rtype: str
    rid: str
    version: int
    method: str
    body: dict[str, Any] | None = None


def status_parameters(base: str, sub_id: str, topic: str, status: str, kind: str, events_since_start: int,
                      items: list[Item], payload: str, error: str | None = None) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{sub_id}"}},
        {"name": "topic", "valueCanonical": topic},
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(events_since_start)},
    ]
    for item in items:
        part: list[dict[str, Any]] = [{"name": "event-number", "valueString": str(item.number)},
                                      {"name": "timestamp", "valueInstant": instant_text(item.recorded_us)}]
        if payload != "empty":
            part.append({"name": "focus", "valueReference": {"reference": f"{base}/{item.rtype}/{item.rid}"}})
        params.append({"name": "notification-event", "part": part})
    if error:
        params.append({"name": "error", "valueCodeableConcept": {"text": error}})
    return {"resourceType": "Parameters", "id": str(uuid.uuid4()), "meta": {"profile": [STATUS_PROFILE]},
            "parameter": params}


def notification(base: str, sub_id: str, topic: str, status: str, kind: str, events_since_start: int,
                 items: list[Item], payload: str, now_us: int) -> dict[str, Any]:
    """A notification Bundle: `kind` is handshake, heartbeat, event-notification or query-event."""
    status_resource = status_parameters(base, sub_id, topic, status, kind, events_since_start, items, payload)
    entries: list[dict[str, Any]] = [{
        "fullUrl": f"urn:uuid:{status_resource['id']}", "resource": status_resource,
        "request": {"method": "GET", "url": f"{base}/Subscription/{sub_id}/$status"},
        "response": {"status": "200"},
    }]
    if payload != "empty":
        for item in items:
            entry: dict[str, Any] = {"fullUrl": f"{base}/{item.rtype}/{item.rid}"}
            if payload == "full-resource" and item.body is not None:
                entry["resource"] = item.body
            created = item.method == "POST"
            entry["request"] = {"method": item.method, "url": item.rtype if created else f"{item.rtype}/{item.rid}"}
            entry["response"] = {"status": "201" if created else "200",
                                 "etag": f'W/"{item.version}"', "lastModified": instant_text(item.recorded_us)}
            entries.append(entry)
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"profile": [NOTIFICATION_PROFILE]},
            "type": "history", "timestamp": instant_text(now_us), "entry": entries}
