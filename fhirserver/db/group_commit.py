"""Group commit: concurrent write transactions of one process share a database transaction.

Every FHIR request writes (at least its AuditEvent), and SQLite has one writer at a time, so
under load requests queue for the write lock and each pays for its own commit: appending ~80
pages to the WAL. Here, a thread that wants to write while another thread of the same process
holds the write transaction joins that transaction instead of queueing behind it. Members run
one at a time (a baton), each inside its own SAVEPOINT, so a failing request rolls back only its
own work -- except the first member to run in the transaction, whose savepoint would be the whole
transaction: its failure rolls the transaction back and the members after it run in a fresh one
(so a lone request, the usual case, spends no SAVEPOINT and RELEASE: two statements and, on
PostgreSQL, two round trips). The last member commits for everyone, and nobody's
`with engine.begin()` block returns before that commit, so no response leaves before its data
and AuditEvent are durable. The commit, the lock hand-over and the B-tree pages that
neighbouring rows share are paid once per group instead of once per request.

`GroupCommitEngine` wraps an Engine: `begin()` is grouped, everything else is delegated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import Connection, Engine

from . import raw
from .engine import READONLY, release_write_lock

DEFAULT_MAX_GROUP = 16


class _Group:
    def __init__(self) -> None:
        self.baton = threading.Lock()
        self.baton.acquire()  # held by the leader until its body ran
        self.committed = threading.Event()
        self.accepting = True
        self.pending = 1  # members that have not finished their body
        self.size = 1
        self.succeeded = 0  # members whose body completed (nothing to commit when 0)
        self.cm: AbstractContextManager[Connection] | None = None
        self.conn: Connection | None = None
        self.error: BaseException | None = None
        self.used = False  # a member's body ran in the open transaction (the next one needs a savepoint)


@contextmanager
def _savepoint(conn: Connection) -> Iterator[None]:
    """A member's own savepoint, as plain SQL on the transaction's cursor: SQLAlchemy's
    begin_nested costs two statement executions of its machinery (~0.1 ms) on every request.
    Savepoints the body opens itself (a batch Bundle's entries) nest inside it."""
    raw.execute(conn, "SAVEPOINT group_member").close()
    try:
        yield
    except BaseException:
        raw.execute(conn, "ROLLBACK TO SAVEPOINT group_member").close()
        raw.execute(conn, "RELEASE SAVEPOINT group_member").close()
        raise
    raw.execute(conn, "RELEASE SAVEPOINT group_member").close()


@contextmanager
def _on_held(conn: Connection) -> Iterator[Connection]:
    """A write transaction on a connection the caller keeps: the write lock goes when it ends."""
    conn.execution_options(**{READONLY: False})  # a read snapshot's: its next BEGIN takes the write lock
    try:
        with conn.begin():
            yield conn
    finally:
        release_write_lock(conn)


class GroupCommitEngine:
    def __init__(self, engine: Engine, max_group: int = DEFAULT_MAX_GROUP) -> None:
        self.raw = engine
        self.max_group = max_group
        self._mutex = threading.Lock()
        self._open: _Group | None = None
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    @contextmanager
    def begin(self, held: Connection | None = None) -> Iterator[Connection]:
        """A write transaction, shared with the writers of this process that arrive meanwhile.
        `held`: a connection of this engine the caller has checked out, with no transaction open
        (a read's snapshot, db/engine.Snapshot.hand_over); a leader runs the group's transaction
        on it rather than checking out another (its page cache is the warm one, and the
        checkout, SQLAlchemy's Connection and, on PostgreSQL, the pool's ping are saved). The
        caller closes it afterwards."""
        if getattr(self._local, "inside", False):
            raise RuntimeError("nested write transaction in one thread (it would wait for itself)")
        with self._mutex:
            group = self._open
            if group is not None and group.accepting and group.size < self.max_group:
                group.pending += 1
                group.size += 1
                leader = False
            else:
                group = _Group()
                self._open = group
                leader = True
        if not leader:
            group.baton.acquire()
        if group.cm is None and group.error is None:
            # the leader's, or a fresh one after a first member failed
            own = held if leader and held is not None and not held.closed and held.engine is self.raw else None
            self._open_transaction(group, own)
        self._local.inside = True
        body_error: BaseException | None = None
        try:
            if group.error is not None:
                body_error = group.error
            else:
                assert group.conn is not None
                first, group.used = not group.used, True
                try:
                    if first:
                        yield group.conn
                    else:
                        with _savepoint(group.conn):
                            yield group.conn
                except BaseException as exc:
                    body_error = exc
                    if first:  # nothing but its own work is in the transaction: roll it all back
                        self._roll_back(group, exc)
        finally:
            self._local.inside = False
            self._finish(group, body_error)

    def _open_transaction(self, group: _Group, held: Connection | None = None) -> None:
        try:
            group.cm = _on_held(held) if held is not None else self.raw.begin()
            group.conn = group.cm.__enter__()
        except BaseException as exc:
            group.cm = group.conn = None
            group.error = exc
            with self._mutex:
                group.accepting = False

    @staticmethod
    def _roll_back(group: _Group, exc: BaseException) -> None:
        """End the group's transaction with a rollback; a member after this one opens a new one."""
        cm, group.cm, group.conn, group.used = group.cm, None, None, False
        assert cm is not None
        try:
            cm.__exit__(type(exc), exc, exc.__traceback__)  # ROLLBACK; the write lock is released
        except BaseException as err:
            if err is not exc:
                group.error = err

    def _finish(self, group: _Group, body_error: BaseException | None) -> None:
        with self._mutex:
            group.pending -= 1
            group.succeeded += body_error is None
            closer = group.pending == 0
            if closer:
                group.accepting = False
                if self._open is group:
                    self._open = None
        if closer:
            if group.cm is not None and group.error is None and group.succeeded:
                try:
                    group.cm.__exit__(None, None, None)  # COMMIT, and the write lock is released
                except BaseException as exc:
                    group.error = exc
            elif group.cm is not None:  # nothing to keep: roll back
                failure = group.error or body_error or RuntimeError("no member succeeded")
                group.cm.__exit__(type(failure), failure, None)
            group.committed.set()
            group.baton.release()
        else:
            group.baton.release()  # the next member runs its body
            if body_error is None:
                group.committed.wait()
        if body_error is not None:
            raise body_error
        if group.error is not None:
            raise group.error
