"""The change outbox (docs/subscriptions.md): every create and update writes one `change_event`
row in its own transaction, so a change is either committed with its event or not at all, and a
dispatcher that dies loses nothing (it consumes rows in transactions of its own).

Rows are written only while some subscription is live: the check is one indexed SELECT per write
until a subscription is seen, then the feed stays on for the life of the process (a subscription
made on another instance is seen in the same transaction as the write, so no change is missed).
"""

from __future__ import annotations

from sqlalchemy import Connection, exists, insert, select

from ..db.schema import change_event, subscription_state

_INSERT = insert(change_event)
_LIVE = select(exists().where(subscription_state.c.status.in_(("requested", "active"))))


class ChangeFeed:
    def __init__(self) -> None:
        self._on = False

    def changed(self, conn: Connection, pk: int, rtype: str, rid: str, version: int, method: str, when_us: int) -> None:
        if not self._on:
            if not conn.execute(_LIVE).scalar():
                return
            self._on = True
        conn.execute(_INSERT, {"resource_pk": pk, "type": rtype, "id": rid, "version": version, "method": method,
                               "recorded_us": when_us})
