"""Raw DB-API statements for the hottest paths: writes (resource, version, index and audit rows)
and the reads every request makes (its token, the resource it reads).

Each request's transaction issues about twenty inserts; through SQLAlchemy Core each costs
~50-100 us of Python while the database write lock is held, which serializes every writer.
Here the SQL text is written once with `?` placeholders, translated to the driver's style, and
run on the same transaction's cursor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, Engine

_CACHE: dict[tuple[str, str], str] = {}


def _sql(conn: Connection | Engine, sql: str) -> str:
    style = conn.dialect.paramstyle
    key = (style, sql)
    if key not in _CACHE:
        _CACHE[key] = sql if style == "qmark" else sql.replace("?", "%s")
    return _CACHE[key]


def _driver(conn: Connection) -> Any:
    """The DB-API connection under a SQLAlchemy connection (always present once connected)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    return driver


def execute(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """Run one statement in `conn`'s transaction; returns the DB-API cursor (caller closes).

    A connection not yet in a transaction begins one first, as SQLAlchemy's autobegin would, so
    raw and Core statements on one connection share a transaction (and its snapshot)."""
    return execute_compiled(conn, _sql(conn, sql), tuple(params))


class Cursor(Protocol):
    """The DB-API cursor methods used here and by the compiled statements."""

    description: Sequence[Sequence[object]]

    def fetchone(self) -> Sequence[object] | None: ...

    def close(self) -> None: ...

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> object: ...


def execute_compiled(conn: Connection, sql: str, params: Sequence[Any] | dict[str, Any]) -> Cursor:
    """Run SQL already written in the driver's parameter style (db/compiled.py) in `conn`'s
    transaction, beginning one first as `execute` does."""
    if not conn.in_transaction():
        conn.begin()
    cursor: Cursor = _driver(conn).cursor()
    cursor.execute(sql, params)
    return cursor


def executemany(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    if not conn.in_transaction():
        conn.begin()
    cursor = _driver(conn).cursor()
    try:
        cursor.executemany(_sql(conn, sql), rows)
    finally:
        cursor.close()


def insert_returning_pk(conn: Connection, sql: str, params: Sequence[Any]) -> int:
    """INSERT and return the new integer primary key `pk` (lastrowid / RETURNING)."""
    if conn.dialect.name == "sqlite":
        cursor = execute(conn, sql, params)
        try:
            return int(cursor.lastrowid)
        finally:
            cursor.close()
    cursor = execute(conn, sql + " RETURNING pk", params)
    try:
        return int(cursor.fetchone()[0])
    finally:
        cursor.close()


def fetchone(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    cursor = execute(conn, sql, params)
    try:
        return cursor.fetchone()
    finally:
        cursor.close()


def fetchone_pooled(engine: Engine, sql: str, params: Sequence[Any] = ()) -> Any:
    """One read on a pooled DB-API connection, outside any transaction: no SQLAlchemy
    Connection and no BEGIN/ROLLBACK round (the pool still resets the connection on return).
    For a single-statement read, such as the per-request token lookup."""
    dbapi = engine.raw_connection()
    try:
        cursor = dbapi.cursor()
        try:
            cursor.execute(_sql(engine, sql), tuple(params))
            return cursor.fetchone()
        finally:
            cursor.close()
    finally:
        dbapi.close()
