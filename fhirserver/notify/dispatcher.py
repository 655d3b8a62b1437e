"""Matching and delivering subscription events, on every server instance (docs/subscriptions.md).

Matching consumes the change outbox in transactions of its own: a change gets the next event
number of each live subscription whose topic it triggers and whose owner may see it now, through
an access gate bound to the owner's snapshot exactly as a search of theirs (scopes, the patients'
Consents, the cross-border rule). An event the owner may not see is not numbered, so a gap in the
numbers never hints at it.

Delivery leases due subscriptions, up to DELIVERY_BATCH a round (each subscription's notifications
go out in order from one instance), and sends each one's events after the last acknowledged one,
re-checking each through the owner's gate at that moment: a Consent withdrawn after the event was numbered withholds it (counted
in `$status`'s state and the metrics, not sent). Every send writes an access record naming the
patients and the endpoint first (a round's records in one transaction) -- no record, no send. Failures are retried with exponential
backoff and jitter for `subscription_retry_hours`, then the subscription's status is `error`;
`fhirserver subscription resume` starts it again from its last acknowledged event.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event

from .. import metrics
from ..access import Access, EventRef
from ..auth.clients import get_client
from ..auth.principal import principal_from
from ..clock import now_us
from ..db.engine import read_connection, transaction
from ..fhir.errors import FhirError
from ..services import Services
from ..storage.codec import dump_json, parse_json
from ..storage.errors import StorageError
from ..subscriptions import state
from ..subscriptions.admission import Criteria, criteria_of
from ..subscriptions.endpoints import EndpointRefused, resolve
from ..subscriptions.notification import Item, notification
from .channels import Channel, DeliveryFailed, Outgoing, Owner, RestHook, notification_record
from .signature import Signer

if TYPE_CHECKING:
    from ..pipeline.pipeline import Pipeline

log = logging.getLogger("fhirserver.subscriptions")
LEASE_MARGIN_S = 5.0  # a delivery round's lease: its send's timeout twice, plus this (Dispatcher.lease_us)
MATCH_BATCH = 200
CRITERIA_SECONDS = 5.0  # a parsed subscription is reused this long unless its version changed
SEND_BATCH = 20  # events in one notification
DELIVERY_BATCH = 16  # subscriptions served in one delivery round
SEND_THREADS = 8  # notifications of one round in flight at once
FIRST_RETRY_S = 1.0


@dataclass(frozen=True)
class Plan:
    """A leased subscription whose notification can go: what it asks for, whose gate decides
    what it may carry, and the channel."""

    sub: state.Sub
    crit: Criteria
    owner: Owner
    channel: Channel


class Dispatcher:
    def __init__(self, svc: Services, worker: str | None = None, sign: Signer | None = None) -> None:
        self.svc = svc
        self.worker = worker or uuid.uuid4().hex[:16]
        self.sign = sign  # rest-hook bodies are signed with the server's published key (signature.py)
        self._criteria: dict[int, tuple[float, int, Criteria | None]] = {}
        self._pipeline: Pipeline | None = None
        self._senders: ThreadPoolExecutor | None = None
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
        if self._pipeline is None:
            self._pipeline = Pipeline(self.svc)  # one per dispatcher: its scope restrictions stay compiled
        gate = self.svc.gate(Access(others=self._pipeline.access_fn(principal), transfer=transfer,
                                    transfer_refusal=refusal))
        return Owner(principal, gate, list(client.settings.get("subscription_endpoints") or []))

    def owners(self) -> Callable[[state.Sub], Owner | None]:
        """`owner` for one round: the subscriptions of one principal share its gate, and each
        client's registration is read once a round (never kept from one round to the next)."""
        memo: dict[str, Owner | None] = {}

        def of(sub: state.Sub) -> Owner | None:
            key = json.dumps([sub.client_id, sub.principal], sort_keys=True, default=str)
            if key not in memo:
                memo[key] = self.owner(sub)
            return memo[key]

        return of

    def criteria(self, conn: Connection, sub: state.Sub, version: int | None = None) -> Criteria | None:
        """The subscription as stored (the dispatcher's own configuration read, not a disclosure),
        remembered for CRITERIA_SECONDS per version: matching consults every live subscription."""
        if version is None:
            head = self.svc.repo.current(conn, "Subscription", sub.id)
            version = head.version if head is not None and not head.deleted else -1
        cached = self._criteria.get(sub.pk)
        if cached is not None and cached[1] == version and time.monotonic() - cached[0] < CRITERIA_SECONDS:
            return cached[2]
        try:
            stored = self.svc.repo.read(conn, "Subscription", sub.id)
            crit: Criteria | None = criteria_of(parse_json(stored.body or b"{}"), self.svc.topics, self.svc.params)
        except (StorageError, FhirError):
            crit = None
        if len(self._criteria) > 10_000:
            self._criteria.clear()
        self._criteria[sub.pk] = (time.monotonic(), version, crit)
        return crit

    # ------------------------------------------------------------------ matching
    def match_once(self, limit: int = MATCH_BATCH) -> int:
        """Number one batch of changes for the subscriptions they concern; the changes consumed.

        The matching reads in a snapshot, without the write lock; a short write transaction then
        takes the changes (DELETE ... RETURNING: a change another instance took meanwhile is not
        numbered twice) and numbers the matches in change order."""
        with read_connection(self.svc.engine) as conn:
            changes = state.pending_changes(conn, limit)
            if not changes:
                return 0
            matches = self._matches(conn, changes)
        with transaction(self.svc.engine) as conn:
            taken = state.take_changes(conn, [c.seq for c in changes])
            numbered = state.number(conn, [(sub_pk, ch) for sub_pk, ch in matches if ch.seq in taken])
        metrics.notification("queued", numbered)
        return len(taken)

    def _matches(self, conn: Connection, changes: list[state.Change]) -> list[tuple[int, state.Change]]:
        """(subscription, change) pairs, in change order: the topic fires, the filters hold, and
        the owner may see the resource now (through its gate, as a search of theirs: one statement
        per owner, type and filter set for the whole batch; a patient filter is checked against
        the compartments read once per type for the batch)."""
        views = [(sub, crit) for sub, version in state.live(conn)
                 if (crit := self.criteria(conn, sub, version)) is not None]
        members = self._compartments(conn, changes) if any(crit.patients for _sub, crit in views) else {}
        candidates: list[tuple[state.Sub, Criteria, state.Change]] = []
        for ch in changes:
            bodies: dict[int, dict[str, Any] | None] = {}
            for sub, crit in views:
                trigger = crit.topic.triggers.get(ch.type)
                if trigger is None:
                    continue
                if crit.patients and members.get(ch.seq, frozenset()).isdisjoint(crit.patients):
                    continue
                if trigger.element:
                    for v in (ch.version, ch.version - 1):
                        if v not in bodies:
                            bodies[v] = self._body(conn, ch.type, ch.id, v)
                    if not trigger.fires(ch.method, bodies[ch.version], bodies[ch.version - 1]):
                        continue
                elif not trigger.fires(ch.method, None, None):
                    continue
                candidates.append((sub, crit, ch))
        owner_of = self.owners()
        groups: dict[tuple[int, str, tuple[tuple[str, str], ...]], tuple[Owner, list[int]]] = {}
        keys: list[tuple[int, str, tuple[tuple[str, str], ...]] | None] = []
        for sub, crit, ch in candidates:
            owner = owner_of(sub)
            if owner is None:
                keys.append(None)
                continue
            key = (id(owner), ch.type, tuple(crit.filters_for(ch.type)))
            groups.setdefault(key, (owner, []))[1].append(ch.resource_pk)
            keys.append(key)
        seen = {key: owner.gate.visible_events(conn, key[1], pks, key[2]) for key, (owner, pks) in groups.items()}
        return [(sub.pk, ch) for (sub, _crit, ch), key in zip(candidates, keys, strict=True)
                if key is not None and ch.resource_pk in seen[key]]

    def _compartments(self, conn: Connection, changes: list[state.Change]) -> dict[int, frozenset[str]]:
        """change -> the patients whose compartments hold the changed resource (membership, no
        content), one statement per type."""
        gate = self.svc.gate(Access())  # membership only: no caller's predicates are involved
        by_type: dict[str, list[int]] = {}
        for ch in changes:
            by_type.setdefault(ch.type, []).append(ch.resource_pk)
        found = {rtype: gate.compartments_by_pk(conn, rtype, pks) for rtype, pks in by_type.items()}
        return {ch.seq: frozenset(found[ch.type].get(ch.resource_pk, ())) | ({ch.id} if ch.type == "Patient" else set())
                for ch in changes}

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
        """Serve up to DELIVERY_BATCH due subscriptions; False when none was due. What each is
        due is read in one snapshot, its events checked through the owners' gates in a statement
        per owner and type; the access records are written in one transaction before anything
        leaves (no record, no send), the notifications go out concurrently, and one transaction
        records how each went."""
        now = now_us()
        with read_connection(self.svc.engine) as conn:  # idle: no write transaction
            if not state.any_due(conn, now):
                return False
        with transaction(self.svc.engine) as conn:
            subs = state.claim_due_many(conn, self.worker, now, self.lease_us, DELIVERY_BATCH)
        if not subs:
            return False
        owner_of = self.owners()
        refused: list[Outgoing] = []
        plans: list[Plan] = []
        with read_connection(self.svc.engine) as conn:
            for sub in subs:
                try:
                    plan = self._rest_hook(conn, sub, owner_of)
                except Exception as exc:  # noqa: BLE001 - one subscription's failure must not stop the others
                    log.exception("delivery for Subscription/%s failed", sub.id)
                    plan = Outgoing(sub, error=f"internal error: {type(exc).__name__}")
                if isinstance(plan, Outgoing):
                    refused.append(plan)
                else:
                    plans.append(plan)
            ready = [*self.prepare(conn, plans), *refused]
        self._record_all(ready)
        sending = [o for o in ready if o.channel is not None and o.payload is not None]
        if len(sending) > 1:
            list(self._pool().map(self._send, sending))
        elif sending:
            self._send(sending[0])
        self._settle_all(ready)
        return True

    def _rest_hook(self, conn: Connection, sub: state.Sub, owner_of: Callable[[state.Sub], Owner | None]
                   ) -> Plan | Outgoing:
        """Where one rest-hook subscription's notification goes (its endpoint checked again and
        its address pinned), or the reason it cannot go."""
        settings = self.svc.settings
        crit = self.criteria(conn, sub)
        owner = owner_of(sub)
        if crit is None or owner is None:
            return Outgoing(sub, error="the subscription's owner client is disabled or its criteria are no longer "
                                       "valid", give_up=True)
        try:
            target = resolve(crit.endpoint, owner.endpoints, settings.subscription_allow_http_loopback,
                             settings.subscription_private_networks)
        except EndpointRefused as err:
            return Outgoing(sub, error=f"endpoint refused: {err}")
        return Plan(sub, crit, owner, RestHook(target, crit, settings.subscription_timeout_seconds, self.sign))

    def serve(self, sub: state.Sub, crit: Criteria, owner: Owner, channel: Channel) -> bool:
        """One leased subscription over `channel` (a websocket's thread): prepare, record, send,
        settle. False when the send failed (recorded: retried later)."""
        with read_connection(self.svc.engine) as conn:
            out = self.prepare(conn, [Plan(sub, crit, owner, channel)])[0]
        self._record_all([out])
        if out.payload is not None:
            self._send(out)
        self._settle_all([out])
        return out.error is None

    def prepare(self, conn: Connection, plans: list[Plan]) -> list[Outgoing]:
        """What each leased subscription is due -- its handshake, its next events (each re-checked
        through its owner's gate now), or a heartbeat -- as a notification for its channel."""
        outs = [Outgoing(p.sub, crit=p.crit, owner=p.owner, channel=p.channel, kind="handshake") for p in plans]
        due = state.events_after_many(conn, {p.sub.pk: p.sub.delivered_through for p in plans if p.sub.handshake_done},
                                      SEND_BATCH)
        groups: dict[tuple[int, str, tuple[tuple[str, str], ...]], tuple[Owner, list[EventRef]]] = {}
        asked: dict[tuple[int, int], tuple[tuple[int, str, tuple[tuple[str, str], ...]], EventRef]] = {}
        for p in plans:
            for ev in due.get(p.sub.pk, []):
                key = (id(p.owner), ev.type, tuple(p.crit.filters_for(ev.type)))
                ref = EventRef(ev.resource_pk, ev.id, ev.version, p.crit.patients)
                groups.setdefault(key, (p.owner, []))[1].append(ref)
                asked[(p.sub.pk, ev.number)] = (key, ref)
        seen = {key: owner.gate.events(conn, key[1], refs, key[2]) for key, (owner, refs) in groups.items()}
        for p, out in zip(plans, outs, strict=True):
            if p.sub.handshake_done:
                events = due.get(p.sub.pk, [])
                for ev in events:
                    key, ref = asked[(p.sub.pk, ev.number)]
                    stored = seen[key].get(ref)
                    if stored is None:
                        out.withheld += 1
                        continue
                    out.patients.update(stored.patients)
                    body = parse_json(stored.body) if p.crit.payload == "full-resource" and stored.body else None
                    out.items.append(Item(ev.number, ev.recorded_us, ev.type, ev.id, ev.version, ev.method, body))
                out.kind = "event-notification" if events else "heartbeat"  # nothing new: due for its heartbeat
                out.through = events[-1].number if events else None
                if events and not out.items:  # nothing the owner may still see: acknowledged without a send
                    continue
            status = "active" if p.sub.handshake_done else "requested"
            bundle = notification(self.svc.settings.fhir_base, p.sub.id, p.sub.topic, status, out.kind,
                                  max(p.sub.events_since_start, out.through or 0), out.items, p.crit.payload, now_us())
            out.payload = dump_json(bundle)
        return outs

    def _send(self, out: Outgoing) -> None:
        assert out.channel is not None and out.payload is not None
        try:
            out.channel.send(out.payload)
        except DeliveryFailed as err:
            out.error = str(err)

    def _pool(self) -> ThreadPoolExecutor:
        if self._senders is None:
            self._senders = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="subscription-send")
        return self._senders

    def _record_all(self, batch: list[Outgoing]) -> None:
        """The access records of every notification about to leave, in one transaction; if it
        fails, nothing is sent (the batch is retried)."""
        records = [notification_record(o) for o in batch if o.payload is not None and o.kind != "heartbeat"]
        if not records:
            return
        try:
            with transaction(self.svc.engine) as conn:
                for rec in records:
                    self.svc.audit.append(conn, rec)
        except Exception as exc:  # noqa: BLE001 - fail closed: no record, no send
            log.exception("access records of a notification batch could not be written")
            for o in batch:
                if o.payload is not None:
                    o.payload, o.error = None, f"access record not written: {type(exc).__name__}"

    def _settle_all(self, batch: list[Outgoing]) -> None:
        now = now_us()
        failed = [o for o in batch if o.error is not None]
        with transaction(self.svc.engine) as conn:
            state.delivered_many(conn, self.worker, [(o.sub.pk, o.through, o.withheld) for o in batch
                                                     if o.error is None], now)
            for o in failed:
                self._failed_in(conn, o.sub, o.error or "", o.give_up, now)
        for o in batch:
            if o.error is None:
                metrics.notification("delivered", len(o.items))
                metrics.notification("withheld", o.withheld)
                for item in o.items:
                    metrics.notification_lag(max(0, now - item.recorded_us) / 1e6)

    def _failed_in(self, conn: Connection, sub: state.Sub, error: str, give_up: bool, now: int) -> None:
        settings = self.svc.settings
        since = sub.failing_since_us or now
        give_up = give_up or now - since >= settings.subscription_retry_hours * 3600e6
        wait = min(settings.subscription_retry_max_seconds, FIRST_RETRY_S * 2 ** min(sub.attempts, 30))
        wait *= 0.5 + random.random() / 2  # jitter, never past the maximum: subscriptions do not retry in step
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
                while not stop.is_set():  # both in every turn: a steady stream of changes must not starve delivery
                    matched = dispatcher.match_once()
                    delivered = dispatcher.deliver_once()
                    if not matched and not delivered:
                        break
            except Exception:  # noqa: BLE001 - the dispatcher must outlive a bad round
                if not stop.is_set():
                    log.exception("subscription dispatcher round failed")

    thread = threading.Thread(target=loop, name="subscriptions", daemon=True)
    thread.start()
    return thread
