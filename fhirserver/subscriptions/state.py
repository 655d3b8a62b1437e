"""The dispatcher's tables (db/schema.py, migration 0014): each Subscription's live state, its
numbered events, and the change outbox. Numbering is done in the transaction that consumes the
change, under the state row's lock, so event numbers of one subscription are unique and strictly
increasing whichever instance numbers them; delivery progress (`delivered_through`) only grows."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from ..auth.principal import Principal, principal_snapshot
from ..clock import now_us
from ..db.rows import AnyRow
from ..db.schema import change_event, resource, subscription_event, subscription_state, subscription_ws_token
from ..fhir.ownership import owner_code

LIVE = ("requested", "active")


@dataclass(frozen=True)
class Change:
    seq: int
    resource_pk: int
    type: str
    id: str
    version: int
    method: str
    recorded_us: int


@dataclass(frozen=True)
class Sub:
    pk: int
    id: str
    client_id: str
    principal: dict[str, Any]
    topic: str
    channel: str
    status: str
    paused: bool
    events_since_start: int
    delivered_through: int
    handshake_done: bool
    withheld: int
    failing_since_us: int | None
    last_error: str | None
    attempts: int
    next_attempt_us: int
    last_sent_us: int | None
    created_us: int


@dataclass(frozen=True)
class Event:
    number: int
    resource_pk: int
    type: str
    id: str
    version: int
    method: str
    recorded_us: int


def _event(row: AnyRow) -> Event:
    return Event(row.number, row.resource_pk, row.type, row.id, row.version, row.method, row.recorded_us)


def _sub(row: AnyRow) -> Sub:
    return Sub(row.resource_pk, row.id, row.client_id, json.loads(row.principal), row.topic, row.channel, row.status,
               bool(row.paused), int(row.events_since_start), int(row.delivered_through), bool(row.handshake_done),
               int(row.withheld), row.failing_since_us, row.last_error, int(row.attempts), int(row.next_attempt_us),
               row.last_sent_us, int(row.created_us))


def register(conn: Connection, pk: int, rid: str, principal: Principal, topic: str, status: str,
             heartbeat_seconds: int = 0, channel: str = "rest-hook") -> None:
    """A Subscription was written (in that write's transaction): who owns it now, what it asks for.
    A changed subscription starts over with a handshake; its event numbers continue."""
    values = {"client_id": principal.client_id, "principal": json.dumps(principal_snapshot(principal)),
              "owner": owner_code(principal.client_id, principal.fhir_user, principal.patient), "topic": topic,
              "channel": channel,
              "status": status, "handshake_done": False, "failing_since_us": None, "last_error": None,
              "attempts": 0, "next_attempt_us": 0, "lease_owner": None, "lease_until_us": None,
              "heartbeat_us": max(0, heartbeat_seconds) * 1_000_000}
    res = conn.execute(update(subscription_state).where(subscription_state.c.resource_pk == pk).values(**values))
    if res.rowcount == 0:
        conn.execute(insert(subscription_state).values(
            resource_pk=pk, id=rid, paused=False, events_since_start=0, delivered_through=0, withheld=0,
            created_us=now_us(), **values))


def retire(conn: Connection, pk: int) -> None:
    """A Subscription was deleted: nothing more is numbered or sent for it."""
    conn.execute(update(subscription_state).where(subscription_state.c.resource_pk == pk).values(status="off"))


def get(conn: Connection, rid: str) -> Sub | None:
    row = conn.execute(select(subscription_state).where(subscription_state.c.id == rid)).first()
    return _sub(row) if row is not None else None


def get_by_pk(conn: Connection, pk: int) -> Sub | None:
    row = conn.execute(select(subscription_state).where(subscription_state.c.resource_pk == pk)).first()
    return _sub(row) if row is not None else None


def listing(conn: Connection) -> list[Sub]:
    return [_sub(r) for r in conn.execute(select(subscription_state).order_by(subscription_state.c.created_us))]


def live(conn: Connection) -> list[tuple[Sub, int]]:
    """Subscriptions that number events (requested or active, whether paused or not), whose
    resource is not deleted, with the resource's current version."""
    rows = conn.execute(select(subscription_state, resource.c.version.label("resource_version"))
                        .join(resource, resource.c.pk == subscription_state.c.resource_pk)
                        .where(subscription_state.c.status.in_(LIVE), resource.c.deleted.is_(False))
                        .order_by(subscription_state.c.resource_pk))
    return [(_sub(r), int(r.resource_version)) for r in rows]


def set_paused(conn: Connection, rid: str, paused: bool) -> bool:
    values: dict[str, Any] = {"paused": paused}
    if not paused:  # resumed: a subscription in error starts again from its last acknowledged event
        values.update(attempts=0, next_attempt_us=0, failing_since_us=None)
    res = conn.execute(update(subscription_state).where(subscription_state.c.id == rid).values(**values))
    if not paused:
        conn.execute(update(subscription_state).where(subscription_state.c.id == rid,
                                                      subscription_state.c.status == "error")
                     .values(status="requested", handshake_done=False))
    return res.rowcount == 1


# ---- the outbox
def pending_changes(conn: Connection, limit: int) -> list[Change]:
    """The oldest unconsumed changes (read, not locked: `take_changes` decides who numbers them)."""
    stmt = select(change_event).order_by(change_event.c.seq).limit(limit)
    return [Change(r.seq, r.resource_pk, r.type, r.id, r.version, r.method, r.recorded_us) for r in conn.execute(stmt)]


def take_changes(conn: Connection, seqs: list[int]) -> set[int]:
    """Consume these changes; the ones this transaction removed (another instance may have taken
    some since they were read: those it numbered, not this one)."""
    if not seqs:
        return set()
    rows = conn.execute(delete(change_event).where(change_event.c.seq.in_(seqs)).returning(change_event.c.seq))
    return {int(r[0]) for r in rows}


def number(conn: Connection, matches: list[tuple[int, Change]]) -> int:
    """Give each (subscription, change) the subscription's next event number, in the order given
    (in the consuming transaction): one UPDATE ... RETURNING per subscription, which takes its
    state row's lock, and one INSERT for all the events. The events numbered."""
    by_sub: dict[int, list[Change]] = {}
    for sub_pk, change in matches:
        by_sub.setdefault(sub_pk, []).append(change)
    rows: list[dict[str, Any]] = []
    s = subscription_state
    for sub_pk in sorted(by_sub):  # state rows locked in one order: two numbering instances never deadlock
        changes = by_sub[sub_pk]
        last = conn.execute(update(s).where(s.c.resource_pk == sub_pk)
                            .values(events_since_start=s.c.events_since_start + len(changes))
                            .returning(s.c.events_since_start)).scalar_one()
        first = int(last) - len(changes) + 1
        rows.extend({"subscription_pk": sub_pk, "number": first + i, "resource_pk": ch.resource_pk, "type": ch.type,
                     "id": ch.id, "version": ch.version, "method": ch.method, "recorded_us": ch.recorded_us}
                    for i, ch in enumerate(changes))
    if rows:
        conn.execute(insert(subscription_event), rows)
    return len(rows)


# ---- delivery
def _due(now: ColumnElement[int] | int) -> ColumnElement[bool]:
    """Something to send now: the handshake, events past the acknowledged one, or a heartbeat
    (nothing sent for the subscription's heartbeat period)."""
    s = subscription_state
    heartbeat = (s.c.heartbeat_us > 0) & (func.coalesce(s.c.last_sent_us, 0) + s.c.heartbeat_us <= now)
    return (s.c.status.in_(LIVE) & s.c.paused.is_(False) & (s.c.next_attempt_us <= now)
            & ((s.c.lease_until_us.is_(None)) | (s.c.lease_until_us < now))
            & ((s.c.handshake_done.is_(False)) | (s.c.delivered_through < s.c.events_since_start) | heartbeat))


# the dispatcher's polls and claims, built once (each binds `now` and the channel): an idle server
# polls several times a second
_DUE = select(subscription_state.c.resource_pk).where(_due(bindparam("now", type_=BigInteger)),
                                                     subscription_state.c.channel == bindparam("channel"))
_ANY_DUE = _DUE.limit(1)
_CLAIMABLE = _DUE.order_by(subscription_state.c.next_attempt_us).limit(bindparam("limit"))


def any_due(conn: Connection, now: int, channel: str = "rest-hook", pk: int | None = None) -> bool:
    """Whether a subscription of `channel` (or subscription `pk`) has something due: a read, so an
    idle poll takes no write lock."""
    stmt = _ANY_DUE if pk is None else _ANY_DUE.where(subscription_state.c.resource_pk == pk)
    return conn.execute(stmt, {"now": now, "channel": channel}).first() is not None


def claim_due(conn: Connection, worker: str, now: int, lease_us: int, channel: str = "rest-hook",
              pk: int | None = None) -> Sub | None:
    """One subscription of `channel` (or subscription `pk`) with something to send, leased to
    `worker` (as `claim_due_many`)."""
    subs = claim_due_many(conn, worker, now, lease_us, 1, channel, pk)
    return subs[0] if subs else None


def claim_due_many(conn: Connection, worker: str, now: int, lease_us: int, limit: int, channel: str = "rest-hook",
                   pk: int | None = None) -> list[Sub]:
    """Up to `limit` subscriptions of `channel` (or subscription `pk`) with something to send (a
    handshake, events past the acknowledged one, a heartbeat) whose next attempt is due, leased to
    `worker` so no other instance sends for them (PostgreSQL: rows another instance is claiming
    are skipped)."""
    s = subscription_state
    stmt = _CLAIMABLE if pk is None else _CLAIMABLE.where(s.c.resource_pk == pk)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    pks = [int(p) for p in conn.execute(stmt, {"now": now, "limit": limit, "channel": channel}).scalars()]
    if not pks:
        return []
    rows = conn.execute(update(s).where(s.c.resource_pk.in_(pks))
                        .values(lease_owner=worker, lease_until_us=now + lease_us).returning(*s.c))
    return sorted((_sub(r) for r in rows), key=lambda sub: sub.next_attempt_us)


def events_after(conn: Connection, sub_pk: int, after: int, limit: int, upto: int | None = None) -> list[Event]:
    e = subscription_event
    stmt = select(e).where(e.c.subscription_pk == sub_pk, e.c.number > after)
    if upto is not None:
        stmt = stmt.where(e.c.number <= upto)
    return [_event(r) for r in conn.execute(stmt.order_by(e.c.number).limit(limit))]


def events_after_many(conn: Connection, after: dict[int, int], limit: int) -> dict[int, list[Event]]:
    """`events_after` for several subscriptions in one statement: subscription -> up to `limit`
    of its events past its acknowledged number, in order."""
    if not after:
        return {}
    e = subscription_event
    ranked = (select(e, func.row_number().over(partition_by=e.c.subscription_pk, order_by=e.c.number).label("rank"))
              .where(or_(*[(e.c.subscription_pk == pk) & (e.c.number > n) for pk, n in after.items()]))
              .subquery())
    out: dict[int, list[Event]] = {}
    for r in conn.execute(select(ranked).where(ranked.c.rank <= limit)
                          .order_by(ranked.c.subscription_pk, ranked.c.number)):
        out.setdefault(int(r.subscription_pk), []).append(_event(r))
    return out


def delivered_many(conn: Connection, worker: str, done: list[tuple[int, int | None, int]], now: int) -> int:
    """Record a round's successes, (subscription, events up to `through` -- or the handshake when
    None --, events withheld): one statement for the handshakes and one for the events. Returns
    how many were still leased to `worker` (one whose lease was lost meanwhile is left alone:
    the instance that took it over resends, under the same numbers)."""
    s = subscription_state
    common: dict[str, Any] = {"attempts": 0, "failing_since_us": None, "last_error": None, "last_sent_us": now,
                              "next_attempt_us": 0, "withheld": s.c.withheld + bindparam("b_withheld"),
                              "lease_owner": None, "lease_until_us": None}
    live = or_(*[s.c.status == status for status in LIVE])  # not IN: executemany takes no expanding IN
    where = (s.c.resource_pk == bindparam("b_pk"), s.c.lease_owner == worker, live)
    count = 0
    handshakes = [{"b_pk": pk, "b_withheld": w} for pk, through, w in done if through is None]
    if handshakes:
        count += conn.execute(update(s).where(*where).values(handshake_done=True, status="active", **common),
                              handshakes).rowcount
    events = [{"b_pk": pk, "b_withheld": w, "b_through": through} for pk, through, w in done if through is not None]
    if events:
        count += conn.execute(update(s).where(*where).values(delivered_through=bindparam("b_through"), **common),
                              events).rowcount
    return count


def failed(conn: Connection, sub: Sub, worker: str, error: str, next_us: int, give_up: bool, now: int) -> None:
    s = subscription_state
    values: dict[str, Any] = {"attempts": sub.attempts + 1, "last_error": error[:500], "next_attempt_us": next_us,
                              "failing_since_us": sub.failing_since_us or now, "lease_owner": None,
                              "lease_until_us": None}
    if give_up:
        values["status"] = "error"
    conn.execute(update(s).where(s.c.resource_pk == sub.pk, s.c.lease_owner == worker).values(**values))


def rebind(conn: Connection, sub_pk: int) -> None:
    """A websocket client bound: a handshake on the new connection, and no waiting out an earlier
    connection's failures."""
    conn.execute(update(subscription_state).where(subscription_state.c.resource_pk == sub_pk).values(
        handshake_done=False, attempts=0, next_attempt_us=0, failing_since_us=None, last_error=None))


def issue_token(conn: Connection, sub_pk: int, now: int, ttl_us: int) -> str:
    """A one-time websocket binding token for the subscription (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    conn.execute(delete(subscription_ws_token).where(subscription_ws_token.c.expires_us < now))
    conn.execute(insert(subscription_ws_token).values(token_hash=hashlib.sha256(token.encode()).hexdigest(),
                                                      subscription_pk=sub_pk, expires_us=now + ttl_us))
    return token


def redeem_token(conn: Connection, token: str, now: int) -> int | None:
    """The subscription a binding token was issued for, once (the token is spent), if unexpired."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    t = subscription_ws_token
    row = conn.execute(select(t.c.subscription_pk, t.c.expires_us).where(t.c.token_hash == digest)).first()
    conn.execute(delete(t).where(t.c.token_hash == digest))
    return int(row.subscription_pk) if row is not None and row.expires_us >= now else None


def release(conn: Connection, sub_pk: int, worker: str) -> None:
    s = subscription_state
    conn.execute(update(s).where(s.c.resource_pk == sub_pk, s.c.lease_owner == worker)
                 .values(lease_owner=None, lease_until_us=None))
