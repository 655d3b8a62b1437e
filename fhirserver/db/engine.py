"""Engine creation and the transaction helper used by every request.

SQLite specifics:
- WAL, foreign keys, and `BEGIN IMMEDIATE` for write transactions. Every FHIR request writes (at
  least its AuditEvent), so taking the write lock up front avoids the deadlock-prone upgrade from
  a read lock to a write lock. Reads outside a request (`read_connection`) use a plain BEGIN.
- Servers checkpoint the WAL in a background thread (`start_checkpointer`) instead of inside
  the commit of whichever request crosses the auto-checkpoint threshold, which otherwise adds
  the checkpoint's fsyncs to that request (a 2-3x slower commit on average).
- Writers queue on an OS file lock (`<db>.writelock`, flock) before BEGIN IMMEDIATE. SQLite's own
  busy handler polls with sleeps of up to 100 ms, which wastes most of the time under contention
  between gunicorn workers; a blocking flock hands the lock over as soon as it is released.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry

READONLY = "fhirserver_readonly"


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


CONNECT_TIMEOUT_SECONDS = 5  # PostgreSQL, unless the URL says otherwise (docs/operations.md)


def make_engine(url: str, background_checkpoint: bool = False) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url, background_checkpoint)
    # JIT off: our statements are short OLTP queries whose correlated consent sub-queries push the
    # estimated cost over jit_above_cost, and compiling then costs more than running (≈ 50 ms)
    # No prepared statements: psycopg prepares a statement at its fifth execution on a connection
    # and forgets them all at each ROLLBACK (a DEALLOCATE ALL round trip). Kept across requests
    # they made mixed load slower (bench_production pg1: 167 against 182-203 requests/s, 3.4
    # against 2.9-3.1 ms of PostgreSQL CPU per request). Off, nothing is prepared that a
    # transaction-pooling proxy could route to another session.
    args: dict[str, object] = {"options": "-c jit=off", "prepare_threshold": None}
    if "connect_timeout" not in make_url(url).query:
        # a node that is gone without refusing (a dead machine, a partition) must not hold a request,
        # a failover's reconnect or a replica check for the operating system's minutes-long timeout
        args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=args)


def _driver_begin(conn: Connection, statement: str) -> None:
    """BEGIN on the DB-API connection itself: SQLAlchemy's statement machinery (exec_driver_sql)
    costs ~40 us, and every request begins two transactions. A failure is raised as SQLAlchemy
    would raise it (an OperationalError wrapping the driver's)."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    try:
        driver.execute(statement).close()
    except sqlite3.Error as err:
        raise DBAPIError.instance(statement, (), err, sqlite3.Error) from err


def _sqlite_engine(url: str, background_checkpoint: bool) -> Engine:
    # LIFO: a request's read snapshot and its write transaction (and the next request) get the
    # connection used last. A commit on one connection makes SQLite discard every *other*
    # connection's page cache, so round-robin (FIFO) checkout re-read the token, resource and
    # index pages from the WAL at every request (measured: 466 -> 346 us of SQLite per read)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_use_lifo=True)
    database = make_url(url).database
    lock_path = f"{database}.writelock" if database and database != ":memory:" else None

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        # Index B-trees of a large database do not fit the 2 MB default page cache: reads of
        # random index pages (blind-index digests are random by design) then dominate writes.
        cur.execute("PRAGMA cache_size=-32768")
        cur.execute("PRAGMA mmap_size=268435456")
        cur.execute("PRAGMA temp_store=MEMORY")
        if background_checkpoint:
            # a safety net only: the checkpointer thread normally keeps the WAL far below this
            cur.execute("PRAGMA wal_autocheckpoint=20000")
            cur.execute("PRAGMA journal_size_limit=67108864")
        cur.close()
        if lock_path:
            record.info["lock_fd"] = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)

    @event.listens_for(engine, "close")
    def _close(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        fd = record.info.pop("lock_fd", None)
        if fd is not None:
            os.close(fd)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        if conn.get_execution_options().get(READONLY, False):
            _driver_begin(conn, "BEGIN")
            return
        info = conn.connection.info
        fd = info.get("lock_fd")
        if fd is not None and not info.get("locked"):
            fcntl.flock(fd, fcntl.LOCK_EX)
            info["locked"] = True
        _driver_begin(conn, "BEGIN IMMEDIATE")

    def _release(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, *_args: object) -> None:
        _unlock(record.info)

    # A write transaction ends when its connection goes back to the pool (engine.begin() blocks).
    event.listen(engine, "checkin", _release)
    return engine


def start_checkpointer(engine: Engine, interval_s: float = 0.5) -> threading.Thread | None:
    """Checkpoint a SQLite WAL from a daemon thread (PASSIVE: never blocks readers or writers)."""
    engine = getattr(engine, "raw", engine)  # unwrap a GroupCommitEngine
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:":
        return None

    stop = threading.Event()
    event.listen(engine, "engine_disposed", lambda _engine: stop.set())

    def run() -> None:
        conn = sqlite3.connect(database, timeout=30, isolation_level=None, check_same_thread=False)
        rounds = 0
        try:
            while not stop.wait(interval_s):
                rounds += 1
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    if rounds % 1200 == 120:  # after a minute, then every ~10 minutes
                        # keep planner statistics fresh; analysis_limit keeps ANALYZE to a sample
                        conn.execute("PRAGMA analysis_limit=400").fetchall()
                        conn.execute("PRAGMA optimize").fetchall()
                except sqlite3.Error:
                    continue  # busy or the file went away; try again next round
        finally:
            conn.close()

    thread = threading.Thread(target=run, name="sqlite-checkpoint", daemon=True)
    thread.start()
    return thread


if TYPE_CHECKING:
    from .replicas import ReplicaRouter


def read_connection(engine: Engine) -> Connection:
    """A connection for reads outside a request transaction (SQLite: no write lock taken)."""
    return engine.connect().execution_options(**{READONLY: True})


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One database transaction: committed on success, rolled back on any exception."""
    with engine.begin() as conn:
        yield conn


def write_transaction(engine: Engine, held: Connection | None) -> AbstractContextManager[Connection]:
    """`engine.begin()`, on `held` (a connection of the engine's, checked out by the caller with no
    transaction open) where group commit can run its transaction there."""
    from .group_commit import GroupCommitEngine

    if isinstance(engine, GroupCommitEngine):
        return engine.begin(held=held)
    return engine.begin()


def release_write_lock(conn: Connection) -> None:
    """Release the write lock (`<db>.writelock`) a write transaction on `conn` took, for a
    connection that stays checked out after its transaction (checkin releases it otherwise)."""
    if conn.closed or conn.invalidated:
        return  # a closed or invalidated connection was checked in or its file closed: no lock left
    _unlock(conn.connection.info)


def _unlock(info: dict[Any, Any]) -> None:
    """Release the write lock a pooled connection's (`info`) write transaction took, if it did."""
    if info.pop("locked", False):
        fcntl.flock(info["lock_fd"], fcntl.LOCK_UN)


class Snapshot:
    """A request's one read transaction: authentication, the consent stage's state and a read's
    data come from the same connection and snapshot (opened on first use). Ended before the
    request's write transaction opens, which runs on the same connection (`hand_over`), and
    closed when the request ends, so a request holds at most one pooled connection at a time."""

    def __init__(self, engine: Engine, router: ReplicaRouter | None = None) -> None:
        self.engine = engine
        self.router = router  # a GET request's: it may read from a caught-up replica (db/replicas.py)
        self._conn: Connection | None = None
        self._lent: Connection | None = None  # handed over to the write transaction (`hand_over`)

    def connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.router.connection() if self.router is not None else read_connection(self.engine)
        return self._conn

    def hand_over(self) -> Connection | None:
        """End the read transaction and lend its connection to the request's write transaction
        (`write_transaction`): the change and/or the access record are then written on the
        connection the request read on instead of on a second checkout. It goes back to the pool
        at `close`, as before; a read after this opens a new snapshot. None when nothing was read
        or the rollback failed (the snapshot is then closed)."""
        conn = self._conn
        if conn is None:
            return None
        try:
            conn.rollback()
        except Exception:
            self.close()
            return None
        self._conn, self._lent = None, conn
        return conn

    def close(self) -> None:
        """End the snapshot. Its server may have gone away meanwhile (a failover): there is then
        nothing to roll back, and the request is already answering 503 -- the failed rollback
        must not turn that answer into a 500 (SQLAlchemy has invalidated the connection)."""
        held = [c for c in (self._conn, self._lent) if c is not None]
        self._conn = self._lent = None
        failure: Exception | None = None
        for conn in held:
            try:
                conn.close()
            except Exception as exc:
                if not database_unavailable(exc, self.engine):
                    failure = failure or exc
        if failure is not None:
            raise failure


def database_unavailable(exc: BaseException, engine: Engine) -> bool:
    """Whether `exc` says PostgreSQL cannot be reached or the connection died with its server (a
    primary killed, a failover under way, a node shutting down), as opposed to a failing query.
    Follows the exception's causes: a group-commit member sees its group's dead connection as
    SQLAlchemy's "can't reconnect until invalid transaction is rolled back". On SQLite every
    such error is local and not transient in this sense."""
    if engine.dialect.name != "postgresql":
        return False
    import psycopg  # the PostgreSQL driver; raw statements (db/raw.py) raise its errors unwrapped
    from sqlalchemy.exc import OperationalError, PendingRollbackError

    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, psycopg.OperationalError):
            return True
        if isinstance(link, psycopg.Error) and _transient(link.sqlstate):
            return True
        if isinstance(link, DBAPIError) and (link.connection_invalidated or isinstance(link, OperationalError)
                                             or _transient(getattr(link.orig, "sqlstate", None))):
            return True
        if isinstance(link, PendingRollbackError) and "Can't reconnect until invalid" in str(link):
            return True
        link = link.__cause__ or link.__context__
    return False


def _transient(sqlstate: str | None) -> bool:
    """57P01-57P03: admin / crash shutdown, cannot connect now; 08xxx: connection exceptions;
    25006: read-only transaction (a pooled connection to a node that is now a standby)."""
    return sqlstate is not None and (sqlstate.startswith(("57P", "08")) or sqlstate == "25006")
