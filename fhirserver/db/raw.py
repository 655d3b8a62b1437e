"""Raw DB-API statements for the hottest paths: writes (resource, version, index and audit rows)
and the reads every request makes (its token, the resource it reads).

Each request's transaction issues about twenty inserts; through SQLAlchemy Core each costs
~50-100 us of Python while the database write lock is held, which serializes every writer.
Here the SQL text is written once with `?` placeholders, translated to the driver's style, and
run on the same transaction's cursor.
"""

from __future__ import annotations

import re
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
    """Run `sql` once per row. On PostgreSQL an `INSERT ... VALUES (...)` runs as multi-row
    INSERTs instead (`_multi_row`)."""
    if not rows:
        return
    if not conn.in_transaction():
        conn.begin()
    cursor = _driver(conn).cursor()
    try:
        if len(rows) > 1 and conn.dialect.name == "postgresql" and _VALUES.match(sql):
            start = 0
            for size in _chunks(len(rows)):
                chunk = rows[start:start + size]
                cursor.execute(_multi_row(sql, size), tuple(v for row in chunk for v in row))
                start += size
        else:
            cursor.executemany(_sql(conn, sql), rows)
    finally:
        cursor.close()


# PostgreSQL runs each row of an executemany as its own statement execution (executor start-up
# and shut-down): measured, four rows as one INSERT spare the backend ~35 us, and every request
# inserts several (its access record's subjects, a write's index rows). One INSERT with many
# VALUES rows is one execution. Chunk sizes are powers of two up to MULTI_ROW_MAX, so each INSERT
# has at most eight texts (`_MULTI` stays small, and so does PostgreSQL's own variety of
# statements to parse and plan; nothing is prepared, db/engine.make_engine).
MULTI_ROW_MAX = 128
_VALUES = re.compile(r"(INSERT INTO [^;]*? VALUES )(\((?:\?, )*\?\))", re.S)  # (head, one row)
_MULTI: dict[tuple[str, int], str] = {}


def _chunks(n: int) -> list[int]:
    """`n` rows as chunks whose sizes are powers of two (largest first), at most MULTI_ROW_MAX."""
    out = [MULTI_ROW_MAX] * (n // MULTI_ROW_MAX)
    rest = n % MULTI_ROW_MAX
    bit = MULTI_ROW_MAX
    while rest:
        if rest & bit:
            out.append(bit)
            rest -= bit
        bit >>= 1
    return out


def _multi_row(sql: str, n: int) -> str:
    """`sql` (one `VALUES (?, ...)` row) with `n` rows, in psycopg's `%s` style."""
    key = (sql, n)
    if key not in _MULTI:
        found = _VALUES.match(sql)
        assert found is not None
        head, row = found.groups()
        _MULTI[key] = (head + ", ".join([row] * n) + sql[found.end():]).replace("?", "%s")
    return _MULTI[key]


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
