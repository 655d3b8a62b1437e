"""Read replicas (issue 28, docs/operations.md): a GET request's read snapshot -- the token, the
consent state and the data it returns -- may come from a PostgreSQL streaming replica, but only
from one that has replayed everything the primary had written when the request began. So a
client always sees its own writes, and a Consent withdrawn or a token revoked through any
instance is in force on the replica before the replica serves anyone: a lagging replica is
simply passed over for the primary. The access record is written on the primary as always
(fail closed).

The cost on the primary is one `pg_current_wal_lsn()` per GET (no table is read); the statement,
its consent predicates and the token lookup run on the replica."""

from __future__ import annotations

import itertools
import logging
import threading
import time

from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine

from .. import metrics
from .engine import read_connection

log = logging.getLogger("fhirserver.db")
# the primary's flushed WAL: every commit acknowledged to a client so far lies before it
_PRIMARY_LSN = text("SELECT pg_current_wal_flush_lsn()::text")
CATCH_UP_POLLS = 5  # a replica a little behind (replay usually trails by a millisecond or two) is
CATCH_UP_PAUSE = 0.001  # asked again this many times, this far apart, before it is passed over
_CAUGHT_UP = text("SELECT pg_is_in_recovery() AND pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)")


class ReplicaRouter:
    """Round-robin over the replicas that have caught up with the primary."""

    def __init__(self, primary: Engine, replicas: list[Engine]) -> None:
        self.primary = primary
        self.replicas = replicas
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def connection(self) -> Connection:
        """A read connection for one GET request: a replica's when one has caught up, else the
        primary's."""
        with self.primary.connect() as conn:
            lsn = conn.execute(_PRIMARY_LSN).scalar_one()
        with self._lock:
            start = next(self._turn)
        for i in range(len(self.replicas)):
            engine = self.replicas[(start + i) % len(self.replicas)]
            try:
                conn = read_connection(engine)
            except Exception as exc:  # noqa: BLE001 - a replica down is a replica passed over
                log.warning("read replica unavailable: %s", type(exc).__name__)
                continue
            try:
                for _poll in range(CATCH_UP_POLLS):
                    if conn.execute(_CAUGHT_UP, {"lsn": lsn}).scalar_one():
                        conn.rollback()  # the check's snapshot is over; the request's reads see newer data
                        metrics.read_snapshot("replica")
                        return conn
                    conn.rollback()
                    time.sleep(CATCH_UP_PAUSE)
            except Exception as exc:  # noqa: BLE001
                log.warning("read replica check failed: %s", type(exc).__name__)
            conn.close()
        metrics.read_snapshot("primary")
        return read_connection(self.primary)
