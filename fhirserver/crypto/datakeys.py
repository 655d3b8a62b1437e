"""Envelope data keys: one AES-256 key per patient compartment, plus system keys.

Scopes: `patient:<id>` (everything in that patient's compartment; shredding it erases them),
`shared` (resources with no patient), `audit` (AuditEvents: must survive patient erasure),
`blind-index` (the HMAC key for searchable identifying values).

Data keys are created in their own short transaction *before* the request's transaction, so a
rolled-back request never leaves a cached key that is not in the database.
"""

from __future__ import annotations

import os
import threading
import time

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.exc import IntegrityError

from ..db.engine import read_connection, transaction
from ..db.schema import data_key
from .cipher import DecryptionError
from .keyring import KeyError_, MasterKeyRing


def _aad(scope: str) -> bytes:
    return b"fhirserver-dek:" + scope.encode()


class DataKeyStore:
    def __init__(self, engine: Engine, ring: MasterKeyRing) -> None:
        self.engine = engine
        self.ring = ring
        self._lock = threading.Lock()
        self._by_scope: dict[str, tuple[int, bytes]] = {}
        self._by_id: dict[int, bytes] = {}

    def _remember(self, key_pk: int, scope: str, raw: bytes) -> None:
        with self._lock:
            self._by_scope[scope] = (key_pk, raw)
            self._by_id[key_pk] = raw

    def _unwrap_row(self, row) -> bytes:  # type: ignore[no-untyped-def]
        if row.shredded:
            raise KeyError_(f"data key {row.id} has been shredded")
        try:
            return self.ring.unwrap(row.master_kid, row.wrapped, _aad(row.scope))
        except DecryptionError as exc:
            raise KeyError_(f"data key {row.id} cannot be unwrapped") from exc

    def ensure(self, scope: str) -> tuple[int, bytes]:
        """Return (key id, raw key) for a scope, creating it in its own transaction if needed."""
        cached = self._by_scope.get(scope)
        if cached:
            return cached
        with read_connection(self.engine) as conn:
            row = conn.execute(select(data_key).where(data_key.c.scope == scope)).first()
        if row is None:
            raw = os.urandom(32)
            kid, wrapped = self.ring.wrap(raw, _aad(scope))
            try:
                with transaction(self.engine) as conn:
                    conn.execute(
                        data_key.insert().values(
                            scope=scope, master_kid=kid, wrapped=wrapped,
                            created_us=int(time.time() * 1e6), shredded=False,
                        )
                    )
            except IntegrityError:
                pass  # created concurrently by another node: use theirs
            with read_connection(self.engine) as conn:
                row = conn.execute(select(data_key).where(data_key.c.scope == scope)).one()
        raw = self._unwrap_row(row)
        self._remember(row.id, scope, raw)
        return row.id, raw

    def destroy(self, conn: Connection, scope: str) -> int | None:
        """Crypto-shred: delete a scope's wrapped key inside the caller's transaction and forget
        it here. Every ciphertext under it becomes noise. Returns the key id, None if absent."""
        row = conn.execute(select(data_key.c.id).where(data_key.c.scope == scope)).first()
        if row is None:
            return None
        conn.execute(delete(data_key).where(data_key.c.id == row.id))
        with self._lock:
            self._by_scope.pop(scope, None)
            self._by_id.pop(row.id, None)
        return int(row.id)

    def by_id(self, key_pk: int, conn: Connection | None = None) -> bytes:
        """Raw data key by id; read through `conn` when given (inside a request transaction)."""
        cached = self._by_id.get(key_pk)
        if cached is not None:
            return cached
        if conn is not None:
            row = conn.execute(select(data_key).where(data_key.c.id == key_pk)).first()
        else:
            with read_connection(self.engine) as own:
                row = own.execute(select(data_key).where(data_key.c.id == key_pk)).first()
        if row is None:
            raise KeyError_(f"data key {key_pk} does not exist")
        raw = self._unwrap_row(row)
        self._remember(row.id, row.scope, raw)
        return raw

    def rewrap_all(self) -> tuple[int, list[str]]:
        """Re-wrap every data key under the active master key. Returns (count, old kids)."""
        active = self.ring.active_kid
        count, old = 0, set()
        with read_connection(self.engine) as conn:
            rows = conn.execute(
                select(data_key.c.id).where(data_key.c.master_kid != active, data_key.c.shredded.is_(False))
            ).all()
        for (key_pk,) in rows:
            # One short transaction per key: readers are never blocked for long.
            with transaction(self.engine) as conn:
                row = conn.execute(select(data_key).where(data_key.c.id == key_pk)).one()
                if row.master_kid == active:
                    continue
                raw = self._unwrap_row(row)
                kid, wrapped = self.ring.wrap(raw, _aad(row.scope))
                conn.execute(update(data_key).where(data_key.c.id == key_pk).values(master_kid=kid, wrapped=wrapped))
                old.add(row.master_kid)
                count += 1
        with read_connection(self.engine) as conn:
            still = {r[0] for r in conn.execute(select(data_key.c.master_kid).distinct()).all()}
        return count, sorted(old - still)
