"""Where a notification goes (docs/subscriptions.md): a rest-hook endpoint over https, pinned to
the address that was checked, or a bound websocket (notify/websocket.py); and what one delivery
round carries for one subscription."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol

from ..access import AccessGate
from ..audit.events import AuditRecord
from ..auth.principal import Principal
from ..clock import now_us
from ..subscriptions import state
from ..subscriptions.admission import Criteria
from ..subscriptions.endpoints import Target, post
from ..subscriptions.notification import Item
from .signature import HEADER, Signer


class DeliveryFailed(Exception):
    """A send did not reach the receiver (the message says why, naming no data)."""


class Channel(Protocol):
    """Where a notification goes: `address` and `destination` are named in the access record."""

    address: str
    destination: str

    def send(self, payload: bytes) -> None: ...


class RestHook:
    """POST to the checked address of a rest-hook endpoint, with the subscription's headers."""

    def __init__(self, target: Target, crit: Criteria, timeout: float, sign: Signer | None) -> None:
        self.target = target
        self.address = target.address
        self.destination = crit.endpoint
        self.headers = {"Content-Type": "application/fhir+json", **dict(crit.headers)}
        self.timeout = timeout
        self.sign = sign

    def send(self, payload: bytes) -> None:
        headers = {**self.headers, HEADER: self.sign(payload)} if self.sign is not None else self.headers
        try:
            code = post(self.target, payload, headers, self.timeout)
        except OSError as err:
            raise DeliveryFailed(f"connection failed: {type(err).__name__}") from None
        if not 200 <= code < 300:
            raise DeliveryFailed(f"the endpoint answered HTTP {code}")


@dataclass
class Outgoing:
    """One subscription's notification in a delivery round: what it carries, where it goes, and
    how it went (`error` None: sent, or nothing left to send)."""

    sub: state.Sub
    crit: Criteria | None = None
    owner: Owner | None = None
    channel: Channel | None = None
    kind: str = ""
    items: list[Item] = field(default_factory=list)
    patients: set[str] = field(default_factory=set)
    through: int | None = None
    withheld: int = 0
    payload: bytes | None = None
    error: str | None = None
    give_up: bool = False


@dataclass
class Owner:
    principal: Principal
    gate: AccessGate
    endpoints: list[str]


def notification_record(out: Outgoing) -> AuditRecord:
    """The access record of one notification: the owner client (and user), the patients and
    resource versions it discloses, the subscription, and where it went."""
    assert out.owner is not None and out.channel is not None
    sub, items, endpoint, p = out.sub, out.items, out.channel.destination, out.owner.principal
    rec = AuditRecord(interaction="operation", request_id=f"notify-{uuid.uuid4().hex}"[:64],
                      network_address=out.channel.address, recorded_us=now_us(), status=200,
                      client_id=p.client_id, client_name=p.client_name, user=p.fhir_user,
                      outcome_desc=(f"subscription {out.kind} to {endpoint[:300]}" +
                                    (f": events {items[0].number}-{items[-1].number}" if items else "")))
    rec.subtype_code = ("http://fhirserver.dev/CodeSystem/audit-subtype", "subscription-notification",
                        "subscription notification")
    rec.target = f"Subscription/{sub.id}"
    rec.extra_entities = [{  # the subscription that caused the disclosure, and where it went
        "what": {"reference": f"Subscription/{sub.id}"},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                 "display": "System Object"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13",
                 "display": "Security Resource"},
        "description": f"notification endpoint {endpoint[:300]}"}]
    rec.resources = [f"{i.rtype}/{i.rid}/_history/{i.version}" for i in items]
    rec.patients = sorted(out.patients)
    rec.query = endpoint[:1000]
    rec.purpose = list(p.purpose or [])
    return rec

