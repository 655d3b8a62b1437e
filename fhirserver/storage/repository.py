"""The resource repository: versioned, encrypted resources and their search indexes.

Everything a request does to resources goes through this small interface; it knows nothing of
HTTP, scopes or audit. Writes are two-phase: `prepare()` runs outside the database transaction
(validation already done by the caller; id assignment, indexing, data-key lookup/creation), then
`create`/`update`/`delete` run inside the request's transaction.

Ciphertext AAD is `type/id/version`, so a ciphertext copied to another row fails to decrypt.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import ColumnElement, Connection, and_, bindparam, delete, select, update

from ..clock import now_us
from ..crypto.cipher import DecryptionError, open_sealed, seal
from ..crypto.datakeys import DataKeyStore
from ..crypto.keyring import KeyError_
from ..db import guard
from ..db import raw as raw_sql
from ..db.rows import AnyRow
from ..db.schema import INDEX_TABLES, compartment, resource, resource_version
from ..fhir.dates import instant_text
from ..search.indexer import Indexer
from ..search.values import IndexRows
from .changes import ChangeFeed
from .codec import dump_json
from .errors import AlreadyExists, Deleted, NotFound, VersionConflict
from .index_rows import index_params, raw_insert
from .write_hooks import WriteHook


class CorruptDataError(Exception):
    """Stored ciphertext failed authentication or its key is unavailable."""


@dataclass
class Stored:
    type: str
    id: str
    version: int
    last_updated_us: int
    deleted: bool
    method: str
    body: bytes | None  # serialized JSON, meta included; None for deletions
    pk: int = 0
    patients: tuple[str, ...] = ()  # the compartments holding it (filled by the access gate, for the audit)

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


@dataclass
class PreparedWrite:
    type: str
    id: str
    body: dict[str, Any]
    index: IndexRows
    key_id: int
    key: bytes
    sealed: tuple[int, int, bytes, bytes] | None = None  # (version, when_us, plaintext, ciphertext)


def key_scope_for(resource_type: str, patients: list[str]) -> str:
    if resource_type == "AuditEvent":
        return "audit"
    return f"patient:{patients[0]}" if patients else "shared"


def _aad(rtype: str, rid: str, version: int) -> bytes:
    return f"{rtype}/{rid}/{version}".encode()


class Head(NamedTuple):
    """The `resource` row of a logical resource (attribute access like a SQLAlchemy Row)."""

    pk: int
    type: str
    id: str
    version: int
    last_updated_us: int
    deleted: bool


# Reads on the request path are raw DB-API statements (see db/raw.py): a read is one statement
# instead of two SQLAlchemy ones, ~70 us less Python per read before any decryption.
_RAW_SEL_CURRENT = "SELECT pk, type, id, version, last_updated_us, deleted FROM resource WHERE type = ? AND id = ?"
_RAW_READ = ("SELECT r.pk, r.version, v.version, v.last_updated_us, v.deleted, v.method, v.key_id, v.body "
             "FROM resource r LEFT JOIN resource_version v ON v.resource_pk = r.pk AND v.version = r.version "
             "WHERE r.type = ? AND r.id = ?")
_RAW_READ_VERSION = ("SELECT r.pk, r.version, v.version, v.last_updated_us, v.deleted, v.method, v.key_id, v.body "
                     "FROM resource r LEFT JOIN resource_version v ON v.resource_pk = r.pk AND v.version = ? "
                     "WHERE r.type = ? AND r.id = ?")
_UPD_RESOURCE = update(resource).where(resource.c.pk == bindparam("rpk"))
_DEL_INDEX = [delete(table).where(table.c.resource_pk == bindparam("rpk")) for table in INDEX_TABLES.values()]
_DEL_COMPARTMENT = delete(compartment).where(compartment.c.resource_pk == bindparam("rpk"))

_RAW_INS_RESOURCE = "INSERT INTO resource (type, id, version, last_updated_us, deleted) VALUES (?, ?, ?, ?, ?)"
_RAW_INS_VERSION = ("INSERT INTO resource_version (resource_pk, type, version, last_updated_us, method, deleted, "
                    "key_id, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


_VERSION_COLS = [resource_version.c[name] for name in
                 ("resource_pk", "type", "version", "last_updated_us", "method", "deleted", "key_id", "body")]


def new_id() -> str:
    return str(uuid.uuid4())


class Repository:
    def __init__(self, keys: DataKeyStore, indexer: Indexer, hooks: Sequence[WriteHook] = (),
                 changes: ChangeFeed | None = None) -> None:
        self.keys = keys
        self.indexer = indexer
        self.hooks = tuple(hooks)
        self.changes = changes or ChangeFeed()  # the subscriptions' outbox (storage/changes.py)

    def _written(self, conn: Connection, pk: int, rtype: str, body: dict[str, Any] | None) -> None:
        for hook in self.hooks:
            hook.written(conn, pk, rtype, body)

    # ---- phase 1: outside the transaction ----
    def prepare(self, rtype: str, body: dict[str, Any], rid: str | None = None,
                also_patients: Sequence[str] = ()) -> PreparedWrite:
        """`also_patients`: compartments the resource joins besides its own references (a
        Provenance the server writes about a patient's resource is part of that patient's record)."""
        for hook in self.hooks:
            body = hook.prepare(rtype, body)
        body = copy.copy(body)
        body["id"] = rid or body.get("id") or new_id()
        index = self.indexer.index(rtype, body)
        index.patients = [*index.patients, *(p for p in also_patients if p not in index.patients)]
        key_id, key = self.keys.ensure(key_scope_for(rtype, index.patients))
        return PreparedWrite(rtype, body["id"], body, index, key_id, key)

    def prepare_indexed(self, rtype: str, body: dict[str, Any], index: IndexRows) -> PreparedWrite:
        """`prepare` for a body the caller built and indexed itself (the server's AuditEvents):
        no copy, no indexing. `body` must carry its id."""
        key_id, key = self.keys.ensure(key_scope_for(rtype, index.patients))
        return PreparedWrite(rtype, body["id"], body, index, key_id, key)

    # ---- reads ----
    def current(self, conn: Connection, rtype: str, rid: str, lock: bool = False) -> Head | None:
        """The `resource` row of rtype/rid, unfiltered: outside a request, or inside the access
        gate or a named system path (db/guard.py)."""
        guard.check("Repository.current")
        return self._head(conn, rtype, rid, lock)

    def _head(self, conn: Connection, rtype: str, rid: str, lock: bool = False) -> Head | None:
        sql = _RAW_SEL_CURRENT if not lock or conn.dialect.name == "sqlite" else _RAW_SEL_CURRENT + " FOR UPDATE"
        row = raw_sql.fetchone(conn, sql, (rtype, rid))
        return None if row is None else Head(row[0], row[1], row[2], row[3], row[4], bool(row[5]))

    def decrypt(self, rtype: str, rid: str, version: int, key_id: int | None, blob: bytes | None,
                conn: Connection | None = None) -> bytes | None:
        """Decrypt one stored version. `conn`: the caller's open connection (data keys not yet
        cached are read through it, so SQLite never waits on its own transaction)."""
        if blob is None:
            return None
        if key_id is None:
            raise CorruptDataError(f"{rtype}/{rid}/_history/{version} has no data key")
        try:
            key = self.keys.by_id(key_id, conn)
            return open_sealed(AESGCM(key), blob, _aad(rtype, rid, version))
        except (DecryptionError, KeyError_) as exc:
            raise CorruptDataError(f"{rtype}/{rid}/_history/{version} cannot be decrypted") from exc

    def read(self, conn: Connection, rtype: str, rid: str, version: int | None = None) -> Stored:
        """Current or given version. Raises NotFound (unknown) or Deleted."""
        guard.check("Repository.read")
        if version is None:
            row = raw_sql.fetchone(conn, _RAW_READ, (rtype, rid))
        else:
            row = raw_sql.fetchone(conn, _RAW_READ_VERSION, (version, rtype, rid))
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        pk, current, got, last_updated_us, deleted, method, key_id, blob = row
        if got is None:
            wanted = version if version is not None else current
            raise NotFound(f"{rtype}/{rid}/_history/{wanted} is not known")
        stored = Stored(type=rtype, id=rid, version=got, last_updated_us=last_updated_us, deleted=bool(deleted),
                        method=method, body=self.decrypt(rtype, rid, got, key_id, blob, conn), pk=pk)
        if stored.deleted:
            raise Deleted(f"{rtype}/{rid} has been deleted", etag=stored.etag)
        return stored

    def open_row(self, rtype: str, rid: str, row: AnyRow, conn: Connection) -> Stored:
        """A version row the caller fetched (`pk`, `version`, `last_updated_us`, `deleted`,
        `method`, `key_id`, `body`), decrypted: for the access gate's own statements."""
        guard.check("Repository.open_row")
        return Stored(type=rtype, id=rid, version=row.version, last_updated_us=row.last_updated_us,
                      deleted=bool(row.deleted), method=row.method,
                      body=self.decrypt(rtype, rid, row.version, row.key_id, row.body, conn), pk=row.pk)

    def _stored(self, rtype: str, rid: str, row: AnyRow, conn: Connection) -> Stored:
        return Stored(
            type=rtype, id=rid, version=row.version, last_updated_us=row.last_updated_us,
            deleted=row.deleted, method=row.method,
            body=self.decrypt(rtype, rid, row.version, row.key_id, row.body, conn), pk=row.resource_pk,
        )

    def load_current(self, conn: Connection, pks: list[int]) -> list[Stored]:
        """Current versions of the given resource pks, in the given order."""
        guard.check("Repository.load_current")
        if not pks:
            return []
        rows = conn.execute(
            select(resource.c.id.label("rid"), *_VERSION_COLS)
            .join(resource_version, and_(resource_version.c.resource_pk == resource.c.pk,
                                         resource_version.c.version == resource.c.version))
            .where(resource.c.pk.in_(pks))
        ).all()
        by_pk = {r.resource_pk: self._stored(r.type, r.rid, r, conn) for r in rows}
        return [by_pk[pk] for pk in pks if pk in by_pk]

    def history(self, conn: Connection, rtype: str | None, resource_pk: int | None, since_us: int | None,
                count: int, before_version_pk: int | None = None,
                access: Sequence[ColumnElement[bool]] = (), at: tuple[int, int] | None = None) -> list[tuple[int, Stored]]:
        """Versions newest first, keyset-paged by version pk. Returns (version pk, Stored).
        `resource_pk` limits to one resource (instance history); `at` (low, high) to the versions
        current at some moment of that period (written by its end, not replaced before its start)."""
        guard.check("Repository.history")
        stmt = (
            select(resource.c.id.label("rid"), resource_version.c.pk.label("vpk"), *_VERSION_COLS)
            .join(resource, resource.c.pk == resource_version.c.resource_pk)
        )
        if resource_pk is not None:
            stmt = stmt.where(resource_version.c.resource_pk == resource_pk)
        elif rtype:
            stmt = stmt.where(resource_version.c.type == rtype)
        if since_us is not None:
            stmt = stmt.where(resource_version.c.last_updated_us >= since_us)
        if before_version_pk is not None:
            stmt = stmt.where(resource_version.c.pk < before_version_pk)
        if at is not None:
            later = resource_version.alias()
            replaced_before = (select(later.c.pk).where(later.c.resource_pk == resource_version.c.resource_pk,
                                                         later.c.version == resource_version.c.version + 1,
                                                         later.c.last_updated_us <= at[0]).exists())
            stmt = stmt.where(resource_version.c.last_updated_us <= at[1], ~replaced_before)
        if access:
            stmt = stmt.where(*access)
        stmt = stmt.order_by(resource_version.c.pk.desc()).limit(count)
        return [(r.vpk, self._stored(r.type, r.rid, r, conn)) for r in conn.execute(stmt).all()]

    # ---- phase 2: writes inside the transaction ----
    def _seal_version(self, p: PreparedWrite, version: int, when_us: int) -> tuple[bytes, bytes]:
        if p.sealed is not None and p.sealed[:2] == (version, when_us):
            return p.sealed[2], p.sealed[3]
        meta = dict(p.body.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = instant_text(when_us)
        body = dict(p.body)
        body["meta"] = meta
        # keep the client's key order but put id/meta up front like most servers
        ordered = {"resourceType": body.pop("resourceType"), "id": body.pop("id"), "meta": body.pop("meta")}
        ordered.update(body)
        raw = dump_json(ordered)
        return raw, seal(AESGCM(p.key), raw, _aad(p.type, p.id, version))

    def _write_index(self, conn: Connection, pk: int, p: PreparedWrite, replace: bool) -> None:
        """Index rows go straight to the DB-API cursor's executemany: a write produces up to ten
        batches, and SQLAlchemy's per-statement overhead would otherwise dominate the write path."""
        if replace:
            for stmt in _DEL_INDEX:
                conn.execute(stmt, {"rpk": pk})
            conn.execute(_DEL_COMPARTMENT, {"rpk": pk})
        for kind, params in index_params(pk, p.index).items():
            raw_sql.executemany(conn, raw_insert(kind)[0], params)

    def reindex(self, conn: Connection, pk: int, rtype: str, body: dict[str, Any]) -> None:
        index = self.indexer.index(rtype, body)
        p = PreparedWrite(rtype, body.get("id", ""), body, index, 0, b"")
        self._write_index(conn, pk, p, replace=True)
        self._written(conn, pk, rtype, body)

    def create(self, conn: Connection, p: PreparedWrite, when_us: int | None = None,
               fresh_id: bool = False) -> Stored:
        """Insert version 1. `fresh_id`: the id is a new UUID, so skip the existence check."""
        when_us = when_us or now_us()
        if not fresh_id and self._head(conn, p.type, p.id) is not None:
            raise AlreadyExists(f"{p.type}/{p.id} already exists")
        raw, blob = self._seal_version(p, 1, when_us)
        pk = raw_sql.insert_returning_pk(conn, _RAW_INS_RESOURCE, (p.type, p.id, 1, when_us, False))
        raw_sql.execute(conn, _RAW_INS_VERSION, (pk, p.type, 1, when_us, "POST", False, p.key_id, blob)).close()
        self._write_index(conn, pk, p, replace=False)
        self._written(conn, pk, p.type, p.body)
        self.changes.changed(conn, pk, p.type, p.id, 1, "POST", when_us)
        return Stored(p.type, p.id, 1, when_us, False, "POST", raw, pk)

    def create_many(self, conn: Connection, batch: Sequence[PreparedWrite], when_us: int | None = None) -> list[int]:
        """Insert version 1 of many resources whose ids are known not to exist (imports): the
        same rows as `create`, in a few set-wise statements instead of ~5 round trips each, which
        is what a client/server database such as PostgreSQL pays for. Returns the new pks."""
        if not batch:
            return []
        when_us = when_us or now_us()
        sealed = [self._seal_version(p, 1, when_us)[1] for p in batch]
        if conn.dialect.name == "sqlite":  # in-process: one statement per row costs little
            pks = [raw_sql.insert_returning_pk(conn, _RAW_INS_RESOURCE, (p.type, p.id, 1, when_us, False))
                   for p in batch]
        else:
            values = ", ".join(["(?, ?, 1, ?, FALSE)"] * len(batch))
            params = [v for p in batch for v in (p.type, p.id, when_us)]
            cursor = raw_sql.execute(conn, "INSERT INTO resource (type, id, version, last_updated_us, deleted) "
                                           f"VALUES {values} RETURNING pk, type, id", params)
            try:
                by_key = {(t, i): pk for pk, t, i in cursor.fetchall()}
            finally:
                cursor.close()
            pks = [by_key[(p.type, p.id)] for p in batch]
        raw_sql.executemany(conn, _RAW_INS_VERSION, [(pk, p.type, 1, when_us, "POST", False, p.key_id, blob)
                                                     for pk, p, blob in zip(pks, batch, sealed, strict=True)])
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for pk, p in zip(pks, batch, strict=True):
            for kind, index_rows in index_params(pk, p.index).items():
                rows.setdefault(kind, []).extend(index_rows)
        for kind, index_rows in rows.items():
            raw_sql.executemany(conn, raw_insert(kind)[0], index_rows)
        for pk, p in zip(pks, batch, strict=True):
            self._written(conn, pk, p.type, p.body)
            self.changes.changed(conn, pk, p.type, p.id, 1, "POST", when_us)
        return pks

    def update(self, conn: Connection, p: PreparedWrite, if_match: int | None = None) -> tuple[Stored, bool]:
        """Update (or create with the client's id). Returns (stored, created)."""
        head = self._head(conn, p.type, p.id, lock=True)
        if head is None:
            if if_match is not None:
                raise VersionConflict(f"{p.type}/{p.id} does not exist (If-Match given)")
            return self.create(conn, p), True
        if if_match is not None and if_match != head.version:
            raise VersionConflict(f"Version conflict: If-Match {if_match} but current version is {head.version}")
        when_us = max(now_us(), head.last_updated_us + 1)
        version = head.version + 1
        raw, blob = self._seal_version(p, version, when_us)
        conn.execute(_UPD_RESOURCE, {"rpk": head.pk, "version": version, "last_updated_us": when_us, "deleted": False})
        raw_sql.execute(conn, _RAW_INS_VERSION, (head.pk, p.type, version, when_us, "PUT", False, p.key_id, blob)).close()
        self._write_index(conn, head.pk, p, replace=True)
        self._written(conn, head.pk, p.type, p.body)
        self.changes.changed(conn, head.pk, p.type, p.id, version, "PUT", when_us)
        return Stored(p.type, p.id, version, when_us, False, "PUT", raw, head.pk), head.deleted

    def erase(self, conn: Connection, pk: int, rtype: str) -> None:
        """Physically remove every version, index and compartment row of one resource and leave
        a single bodiless tombstone version (reads answer 410). Used by patient erasure."""
        head = conn.execute(select(resource.c.version, resource.c.last_updated_us).where(resource.c.pk == pk)).one()
        when_us = max(now_us(), head.last_updated_us + 1)
        version = head.version + 1
        conn.execute(delete(resource_version).where(resource_version.c.resource_pk == pk))
        for stmt in _DEL_INDEX:
            conn.execute(stmt, {"rpk": pk})
        conn.execute(_DEL_COMPARTMENT, {"rpk": pk})
        conn.execute(_UPD_RESOURCE, {"rpk": pk, "version": version, "last_updated_us": when_us, "deleted": True})
        raw_sql.execute(conn, _RAW_INS_VERSION, (pk, rtype, version, when_us, "DELETE", True, None, None)).close()

    def delete(self, conn: Connection, rtype: str, rid: str, if_match: int | None = None) -> Stored | None:
        """Logical delete: a new version without body. None if nothing to delete."""
        head = self._head(conn, rtype, rid, lock=True)
        if head is None:
            if if_match is not None:
                raise VersionConflict(f"{rtype}/{rid} does not exist (If-Match given)")
            return None
        if if_match is not None and if_match != head.version:
            raise VersionConflict(f"Version conflict: If-Match {if_match} but current version is {head.version}")
        if head.deleted:
            return None
        when_us = max(now_us(), head.last_updated_us + 1)
        version = head.version + 1
        conn.execute(_UPD_RESOURCE, {"rpk": head.pk, "version": version, "last_updated_us": when_us, "deleted": True})
        raw_sql.execute(conn, _RAW_INS_VERSION, (head.pk, rtype, version, when_us, "DELETE", True, None, None)).close()
        for stmt in _DEL_INDEX:
            conn.execute(stmt, {"rpk": head.pk})
        self._written(conn, head.pk, rtype, None)
        # compartment rows are kept: the deleted resource still belongs to its patient (history)
        return Stored(rtype, rid, version, when_us, True, "DELETE", None, head.pk)
