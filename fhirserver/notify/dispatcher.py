"""Matching and delivering subscription events, on every server instance (docs/subscriptions.md).

Matching consumes the change outbox in transactions of its own: a change gets the next event
number of each live subscription whose topic it triggers and whose owner may see it now, through
an access gate bound to the owner's snapshot exactly as a search of theirs (scopes, the patients'
Consents, the cross-border rule). An event the owner may not see is not numbered, so a gap in the
numbers never hints at it.

Delivery leases one subscription at a time (so its notifications go out in order from one
instance) and sends its events after the last acknowledged one, re-checking each through the
owner's gate at that moment: a Consent withdrawn after the event was numbered withholds it (counted
in `$status`'s state and the metrics, not sent). Every send writes an access record naming the
patients and the endpoint first -- no record, no send. Failures are retried with exponential
backoff and jitter for `subscription_retry_hours`, then the subscription's status is `error`;
`fhirserver subscription resume` starts it again from its last acknowledged event.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, event

from .. import metrics
from ..access import Access, AccessGate
from ..audit.events import AuditRecord
from ..auth.clients import get_client
from ..auth.principal import Principal, principal_from
from ..clock import now_us
from ..db.engine import read_connection, transaction
from ..fhir.errors import FhirError
from ..services import Services
from ..storage.codec import dump_json, parse_json
from ..storage.errors import StorageError
from ..subscriptions import state
from ..subscriptions.admission import Criteria, criteria_of
from ..subscriptions.endpoints import EndpointRefused, Target, post, resolve
from ..subscriptions.notification import Item, notification
from .signature import HEADER, Signer

log = logging.getLogger("fhirserver.subscriptions")
LEASE_MARGIN_S = 5.0  # a delivery round's lease: its send's timeout twice, plus this (Dispatcher.lease_us)
MATCH_BATCH = 200
SEND_BATCH = 20
FIRST_RETRY_S = 1.0


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
class Owner:
    principal: Principal
    gate: AccessGate
    endpoints: list[str]


class Dispatcher:
    def __init__(self, svc: Services, worker: str | None = None, sign: Signer | None = None) -> None:
        self.svc = svc
        self.worker = worker or uuid.uuid4().hex[:16]
        self.sign = sign  # rest-hook bodies are signed with the server's published key (signature.py)
        # how long a subscription stays with this instance per round: a dead instance's
        # subscriptions move on to another after it (and their unacknowledged events are resent)
        self.lease_us = int((2 * svc.settings.subscription_timeout_seconds + LEASE_MARGIN_S) * 1e6)

    # ------------------------------------------------------------------ the owner's view
    def owner(self, sub: state.Sub) -> Owner | None:
        """The owner's gate as of now; None when its client is gone or disabled."""
        from ..pipeline.pipeline import Pipeline

        client = get_client(self.svc.engine, sub.client_id)
        if client is None or client.disabled:
            return None
        principal = principal_from(sub.principal)
        principal.client_settings = client.settings  # the client's current registration (endpoints, roles)
        principal.consent = self.svc.consent.export_decision(principal, False)
        transfer, refusal = self.svc.consent.transfer_rule(principal)
        gate = self.svc.gate(Access(others=Pipeline(self.svc).access_fn(principal), transfer=transfer,
                                    transfer_refusal=refusal))
        return Owner(principal, gate, list(client.settings.get("subscription_endpoints") or []))

    def criteria(self, conn: Connection, sub: state.Sub) -> Criteria | None:
        """The subscription as stored now (the dispatcher's own configuration read, not a disclosure)."""
        try:
            stored = self.svc.repo.read(conn, "Subscription", sub.id)
            return criteria_of(parse_json(stored.body or b"{}"), self.svc.topics, self.svc.params)
        except (StorageError, FhirError):
            return None

    # ------------------------------------------------------------------ matching
    def match_once(self, limit: int = MATCH_BATCH) -> int:
        """Number one batch of changes for the subscriptions they concern; the changes consumed."""
        with read_connection(self.svc.engine) as conn:  # idle: no write transaction (SQLite's lock)
            if not state.has_changes(conn):
                return 0
        with transaction(self.svc.engine) as conn:
            changes = state.claim_changes(conn, limit)
            if not changes:
                return 0
            views: list[tuple[state.Sub, Criteria, Owner]] = []
            for sub in state.live(conn):
                crit = self.criteria(conn, sub)
                owner = self.owner(sub) if crit is not None else None
                if crit is not None and owner is not None:
                    views.append((sub, crit, owner))
            numbered = 0
            for ch in changes:
                compartments: set[str] | None = None
                bodies: dict[int, dict[str, Any] | None] = {}
                for sub, crit, owner in views:
                    trigger = crit.topic.triggers.get(ch.type)
                    if trigger is None:
                        continue
                    if crit.patients:
                        if compartments is None:
                            compartments = self._compartments(conn, owner.gate, ch)
                        if not compartments.intersection(crit.patients):
                            continue
                    if trigger.element:
                        for v in (ch.version, ch.version - 1):
                            if v not in bodies:
                                bodies[v] = self._body(conn, ch.type, ch.id, v)
                        if not trigger.fires(ch.method, bodies[ch.version], bodies[ch.version - 1]):
                            continue
                    elif not trigger.fires(ch.method, None, None):
                        continue
                    filters = [*crit.filters.get("*", []), *crit.filters.get(ch.type, [])]
                    if owner.gate.event(conn, ch.type, ch.resource_pk, ch.id, ch.version, filters,
                                        crit.patients) is None:
                        continue
                    state.number(conn, sub.pk, ch)
                    numbered += 1
            state.consume(conn, [c.seq for c in changes])
        metrics.notification("queued", numbered)
        return len(changes)

    def _compartments(self, conn: Connection, gate: AccessGate, ch: state.Change) -> set[str]:
        found = set(gate.compartments_by_pk(conn, ch.type, [ch.resource_pk]).get(ch.resource_pk, ()))
        if ch.type == "Patient":
            found.add(ch.id)
        return found

    def _body(self, conn: Connection, rtype: str, rid: str, version: int) -> dict[str, Any] | None:
        if version < 1:
            return None
        try:
            stored = self.svc.repo.read(conn, rtype, rid, version)
        except StorageError:
            return None
        return parse_json(stored.body) if stored.body else None

    # ------------------------------------------------------------------ delivery
    def deliver_once(self) -> bool:
        """Serve one due subscription; False when none was due."""
        now = now_us()
        with read_connection(self.svc.engine) as conn:  # idle: no write transaction
            if not state.any_due(conn, now):
                return False
        with transaction(self.svc.engine) as conn:
            sub = state.claim_due(conn, self.worker, now, self.lease_us)
        if sub is None:
            return False
        try:
            self._deliver(sub)
        except Exception as exc:  # noqa: BLE001 - one subscription's failure must not stop the others
            log.exception("delivery for Subscription/%s failed", sub.id)
            self._failed(sub, f"internal error: {type(exc).__name__}")
        return True

    def _deliver(self, sub: state.Sub) -> None:
        """One rest-hook round: the endpoint checked again (its address pinned), then `serve`."""
        settings = self.svc.settings
        with read_connection(self.svc.engine) as conn:
            crit = self.criteria(conn, sub)
        owner = self.owner(sub)
        if crit is None or owner is None:
            self._failed(sub, "the subscription's owner client is disabled or its criteria are no longer valid",
                         give_up=True)
            return
        try:
            target = resolve(crit.endpoint, owner.endpoints, settings.subscription_allow_http_loopback,
                             settings.subscription_private_networks)
        except EndpointRefused as err:
            self._failed(sub, f"endpoint refused: {err}")
            return
        self.serve(sub, crit, owner, RestHook(target, crit, settings.subscription_timeout_seconds, self.sign))

    def serve(self, sub: state.Sub, crit: Criteria, owner: Owner, channel: Channel) -> bool:
        """Send what a leased subscription is due -- its handshake, its next events (each re-checked
        through the owner's gate now), or a heartbeat -- over `channel`; False when the send failed
        (recorded: retried later)."""
        items: list[Item] = []
        withheld = 0
        patients: set[str] = set()
        through: int | None = None
        kind = "handshake"
        if sub.handshake_done:
            with read_connection(self.svc.engine) as conn:
                events = state.events_after(conn, sub.pk, sub.delivered_through, SEND_BATCH)
                for ev in events:
                    filters = [*crit.filters.get("*", []), *crit.filters.get(ev.type, [])]
                    stored = owner.gate.event(conn, ev.type, ev.resource_pk, ev.id, ev.version, filters, crit.patients)
                    if stored is None:
                        withheld += 1
                        continue
                    patients.update(stored.patients)
                    body = parse_json(stored.body) if crit.payload == "full-resource" and stored.body else None
                    items.append(Item(ev.number, ev.recorded_us, ev.type, ev.id, ev.version, ev.method, body))
            kind = "event-notification" if events else "heartbeat"  # nothing new: due for its heartbeat
            through = events[-1].number if events else None
            if events and not items:  # nothing the owner may still see: acknowledged without a send
                with transaction(self.svc.engine) as conn:
                    state.delivered(conn, sub.pk, self.worker, through, withheld, now_us())
                metrics.notification("withheld", withheld)
                return True
        status = "active" if sub.handshake_done else "requested"
        bundle = notification(self.svc.settings.fhir_base, sub.id, sub.topic, status, kind,
                              max(sub.events_since_start, through or 0), items, crit.payload, now_us())
        if kind != "heartbeat":  # a heartbeat carries no data; everything else is recorded before it leaves
            self._record(sub, owner, channel.address, channel.destination, items, patients, kind)
        try:
            channel.send(dump_json(bundle))
        except DeliveryFailed as err:
            self._failed(sub, str(err))
            return False
        now = now_us()
        with transaction(self.svc.engine) as conn:
            state.delivered(conn, sub.pk, self.worker, through, withheld, now)
        metrics.notification("delivered", len(items))
        metrics.notification("withheld", withheld)
        for item in items:
            metrics.notification_lag(max(0, now - item.recorded_us) / 1e6)
        return True

    def _record(self, sub: state.Sub, owner: Owner, address: str, endpoint: str, items: list[Item],
                patients: set[str], kind: str) -> None:
        p = owner.principal
        rec = AuditRecord(interaction="operation", request_id=f"notify-{uuid.uuid4().hex}"[:64],
                          network_address=address, recorded_us=now_us(), status=200, client_id=p.client_id,
                          client_name=p.client_name, user=p.fhir_user,
                          outcome_desc=(f"subscription {kind} to {endpoint[:300]}" +
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
        rec.patients = sorted(patients)
        rec.query = endpoint[:1000]
        rec.purpose = list(p.purpose or [])
        with transaction(self.svc.engine) as conn:
            self.svc.audit.append(conn, rec)

    def _failed(self, sub: state.Sub, error: str, give_up: bool = False) -> None:
        settings = self.svc.settings
        now = now_us()
        since = sub.failing_since_us or now
        give_up = give_up or now - since >= settings.subscription_retry_hours * 3600e6
        wait = min(settings.subscription_retry_max_seconds, FIRST_RETRY_S * 2 ** min(sub.attempts, 30))
        wait *= 0.5 + random.random() / 2  # jitter, never past the maximum: subscriptions do not retry in step
        with transaction(self.svc.engine) as conn:
            state.failed(conn, sub, self.worker, error, now + int(wait * 1e6), give_up, now)
        metrics.notification("failed" if give_up else "retried")
        log.warning("Subscription/%s: %s (%s)", sub.id, error, "status error" if give_up else f"retry in {wait:.1f} s")


def start_dispatcher(svc: Services, sign: Signer | None = None) -> threading.Thread:
    """The dispatcher thread of this process; it stops when the engine is disposed."""
    stop = threading.Event()
    raw = getattr(svc.engine, "raw", svc.engine)
    event.listen(raw, "engine_disposed", lambda _engine: stop.set())
    dispatcher = Dispatcher(svc, sign=sign)

    def loop() -> None:
        while not stop.wait(svc.settings.subscription_poll_seconds):
            try:
                while not stop.is_set() and (dispatcher.match_once() or dispatcher.deliver_once()):
                    pass
            except Exception:  # noqa: BLE001 - the dispatcher must outlive a bad round
                if not stop.is_set():
                    log.exception("subscription dispatcher round failed")

    thread = threading.Thread(target=loop, name="subscriptions", daemon=True)
    thread.start()
    return thread
