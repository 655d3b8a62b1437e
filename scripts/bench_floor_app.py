"""The floor of an audited, encrypted read in this stack, as a WSGI app (scripts/bench_gate.py
--floor serves it with gunicorn beside the real server): no FHIR, no Flask, no SQLAlchemy.

`GET /livez` answers "ok". `GET /floor/<id>` does only what no implementation of "every read is
audited, data and records encrypted, the record durable before the response" can skip, with
the same SQLite settings as the server: in one read transaction the token row and the resource's
current version (two indexed SELECTs on a copy of the server's database), an AES-256-GCM open of
a body of the stored size, a ~600-byte JSON record serialized and sealed, and one write
transaction (BEGIN IMMEDIATE, one INSERT, COMMIT) before the answer. What the real read adds on
top of this floor is the server's own work (scopes, consent, FHIR rendering, the index of the
access record); the floor against `/livez` says how far below 2x any read can get here.

    FLOOR_DB=/path/to/copy.db gunicorn -w 2 --threads 4 bench_floor_app:app
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DB = os.environ["FLOOR_DB"]
_local = threading.local()
_KEY = AESGCM(os.urandom(32))
_SEALED: dict[int, tuple[bytes, bytes]] = {}


def _conn() -> sqlite3.Connection:
    if not hasattr(_local, "c"):
        c = sqlite3.connect(DB, timeout=30, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "cache_size=-32768",
                       "mmap_size=268435456", "temp_store=MEMORY"):
            c.execute(f"PRAGMA {pragma}")
        c.execute("CREATE TABLE IF NOT EXISTS floor_record (id TEXT PRIMARY KEY, recorded_us INTEGER, detail BLOB)")
        _local.c = c
    conn: sqlite3.Connection = _local.c
    return conn


def _open(size: int) -> bytes:
    """Decrypt a sealed blob of `size` bytes (sealed once per size: the cost is the open)."""
    if size not in _SEALED:
        nonce = os.urandom(12)
        _SEALED[size] = (nonce, _KEY.encrypt(nonce, os.urandom(size), None))
    nonce, sealed = _SEALED[size]
    return _KEY.decrypt(nonce, sealed, None)


def floor_read(rid: str, token_hash: str) -> bytes:
    c = _conn()
    c.execute("BEGIN")
    try:
        c.execute("SELECT client_id, scope, expires_us FROM access_token WHERE token_hash = ?", (token_hash,)).fetchone()
        row = c.execute("SELECT v.body FROM resource r JOIN resource_version v ON v.resource_pk = r.pk "
                        "AND v.version = r.version WHERE r.type = 'Observation' AND r.id = ?", (rid,)).fetchone()
    finally:
        c.execute("COMMIT")
    body = _open(len(row[0]) if row and row[0] else 600)
    record_id = str(uuid.uuid4())
    record = orjson.dumps({"id": record_id, "interaction": "read", "resources": [f"Observation/{rid}/_history/1"],
                           "patients": ["p"], "client_id": "bench", "status": 200, "purpose": ["TREAT"],
                           "request_id": str(uuid.uuid4()), "network_address": "127.0.0.1",
                           "recorded_us": time.time_ns() // 1000, "detail": "x" * 300})
    nonce = os.urandom(12)
    sealed = nonce + _KEY.encrypt(nonce, record, record_id.encode())
    c.execute("BEGIN IMMEDIATE")
    try:
        c.execute("INSERT INTO floor_record VALUES (?, ?, ?)", (record_id, time.time_ns() // 1000, sealed))
        c.execute("COMMIT")
    except BaseException:
        c.execute("ROLLBACK")
        raise
    return body


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path.startswith("/floor/"):
        auth = environ.get("HTTP_AUTHORIZATION", "")
        body = floor_read(path.rsplit("/", 1)[1], auth[-64:])
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
