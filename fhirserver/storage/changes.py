"""The change outbox (docs/subscriptions.md): every create and update writes one `change_event`
row in its own transaction, so a change is either committed with its event or not at all, and a
dispatcher that dies loses nothing (it consumes rows in transactions of its own).

Rows are written only while some subscription is live: the check is one indexed SELECT per write
until a subscription is seen, then the feed stays on for the life of the process (a subscription
made on another instance is seen in the same transaction as the write, so no change is missed).
"""

from __future__ import annotations

from sqlalchemy import Connection

from ..db import raw

# raw statements on the write's own cursor (db/raw.py): every write pays for them
_LIVE = "SELECT 1 FROM subscription_state WHERE status IN ('requested', 'active') LIMIT 1"
_INSERT = "INSERT INTO change_event (resource_pk, type, id, version, method, recorded_us) VALUES (?, ?, ?, ?, ?, ?)"


class ChangeFeed:
    def __init__(self) -> None:
        self._on = False

    def changed(self, conn: Connection, pk: int, rtype: str, rid: str, version: int, method: str, when_us: int) -> None:
        if not self._on:
            cursor = raw.execute(conn, _LIVE)
            try:
                if cursor.fetchone() is None:
                    return
            finally:
                cursor.close()
            self._on = True
        raw.execute(conn, _INSERT, (pk, rtype, rid, version, method, when_us)).close()
