"""Raw DB-API statements for the hottest writes (resource, version, index and audit rows).

Each request's transaction issues about twenty inserts; through SQLAlchemy Core each costs
~50-100 us of Python while the database write lock is held, which serializes every writer.
Here the SQL text is written once with `?` placeholders, translated to the driver's style, and
run on the same transaction's cursor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

_CACHE: dict[tuple[str, str], str] = {}


def _sql(conn: Connection, sql: str) -> str:
    style = conn.dialect.paramstyle
    key = (style, sql)
    if key not in _CACHE:
        _CACHE[key] = sql if style == "qmark" else sql.replace("?", "%s")
    return _CACHE[key]


def execute(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """Run one statement in `conn`'s transaction; returns the DB-API cursor (caller closes)."""
    cursor = conn.connection.driver_connection.cursor()
    cursor.execute(_sql(conn, sql), tuple(params))
    return cursor


def executemany(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    cursor = conn.connection.driver_connection.cursor()
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
