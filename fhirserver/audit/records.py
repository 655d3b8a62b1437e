"""Access records: how the audit log is written and read back (docs/audit.md).

Every access appends one compact `access_record` row in its own transaction -- no row or lock
that other requests share -- plus one `access_subject` row per reference its AuditEvent would
index (agent, entity, patient). The record itself is the AuditRecord's fields as canonical JSON,
encrypted under the `audit` data key with the record id as associated data; `content_hash` is
its SHA-256. The BALP AuditEvent is rendered from it on read (`render`), byte for byte what
`build_audit_event` makes, so reads, searches and exports see the same resource as before.

The search index of an event is the same rows `AuditIndexer` computes, split three ways: the
references go to `access_subject`; the token, uri and string rows (codes and keyed digests
shared by many records) form an interned `audit_term` set the record points to; the date row
is the record's time. `search/sources.py` presents these as the index tables of AuditEvent.
`RecordIndex` (audit/record_index.py) computes the set and the references for each record.

Records get their place in the Merkle tree later, from the sequencer (audit/sequencer.py).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, select

from .. import metrics
from ..crypto.cipher import DecryptionError, open_sealed, seal
from ..crypto.keyring import KeyError_
from ..db import guard
from ..db import raw as raw_sql
from ..db.rows import AnyRow
from ..db.schema import access_record, access_subject
from ..fhir.dates import instant_text
from ..storage.codec import dump_json, parse_json
from ..storage.repository import CorruptDataError, Repository, Stored
from .events import AuditIndexer, AuditRecord, build_audit_event
from .merkle import leaf_hash
from .record_index import RecordIndex, subject_rows

AUDIT_KEY_SCOPE = "audit"
CHAIN_SCOPE = "audit-chain"  # the server's MAC key for redactions (a data key, wrapped by the master key)
RECORD_VERSION = 1

_INS_RECORD = ("INSERT INTO access_record (id, recorded_us, terms, key_id, detail, content_hash) "
               "VALUES (?, ?, ?, ?, ?, ?)")
_INS_SUBJECT = ("INSERT INTO access_subject (record_pk, recorded_us, param, target_type, target_id, url) "
                "VALUES (?, ?, ?, ?, ?, ?)")
_INS_TERM = ("INSERT INTO audit_term (set_id, n, tbl, param, system, code, kind, value) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")


_RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord))


def leaf_content(record_id: str, recorded_us: int, content_hash: str) -> bytes:
    """What a Merkle leaf commits to: the record's id, time and content digest."""
    return f"fhirserver-access-record:v1:{record_id}:{recorded_us}:{content_hash}".encode()


def record_leaf(record_id: str, recorded_us: int, content_hash: str) -> str:
    return leaf_hash(leaf_content(record_id, recorded_us, content_hash))


def _aad(record_id: str) -> bytes:
    return f"access-record/{record_id}".encode()


@dataclass
class PreparedRecord:
    """A record built, indexed and encrypted outside any transaction."""

    id: str
    recorded_us: int
    terms: str
    term_rows: list[tuple[Any, ...]]
    subjects: list[tuple[Any, ...]]  # (param, target_type, target_id, url)
    key_id: int
    detail: bytes
    content_hash: str


class AuditSink(Protocol):
    """Where built access records go: `write` inside the access's own transaction (fail closed:
    the record commits with the access or neither does), `committed` after that commit."""

    def write(self, conn: Connection, p: PreparedRecord) -> None: ...

    def committed(self, p: PreparedRecord) -> None: ...


class AccessRecordTable:
    """The default sink: one `access_record` row, its `access_subject` rows, and its term set
    interned in `audit_term` (written once per set; `committed` remembers the sets stored)."""

    def __init__(self) -> None:
        self._known_sets: set[str] = set()

    def write(self, conn: Connection, p: PreparedRecord) -> None:
        started = metrics.now()
        if p.terms not in self._known_sets:
            raw_sql.executemany(conn, _INS_TERM, p.term_rows)
        pk = raw_sql.insert_returning_pk(conn, _INS_RECORD, (p.id, p.recorded_us, p.terms, p.key_id, p.detail,
                                                             p.content_hash))
        raw_sql.executemany(conn, _INS_SUBJECT, [(pk, p.recorded_us, *s) for s in p.subjects])
        metrics.audit_append(metrics.now() - started)

    def committed(self, p: PreparedRecord) -> None:
        self._known_sets.add(p.terms)


class AuditLog:
    """Access records: built once from a request's captured AuditRecord (`build`), written to
    the sink in the access's transaction (`append`), read back and rendered as AuditEvents."""

    def __init__(self, repo: Repository, server_url: str, sink: AuditSink | None = None) -> None:
        self.repo = repo
        self.server_url = server_url
        self.indexer = AuditIndexer(repo.indexer)
        self.record_index = RecordIndex(self.indexer, server_url)
        self.sink: AuditSink = sink or AccessRecordTable()

    # ------------------------------------------------------------------ writing
    def prepare(self, rec: AuditRecord) -> PreparedRecord:
        """Build, index and encrypt ahead of the transaction (no database access: a term set not
        seen before is written by `append`, in the record's own transaction)."""
        return self.build(rec)

    def committed(self, p: PreparedRecord) -> None:
        """`p`'s transaction committed (its term set is stored: later appends skip it)."""
        self.sink.committed(p)

    def build(self, rec: AuditRecord) -> PreparedRecord:
        """Build, index and encrypt one record: no database access."""
        record_id = str(uuid.uuid4())
        # shallow (dataclasses.asdict deep-copies every list): the dict is serialized at once
        content = {"v": RECORD_VERSION, "id": record_id, "site": self.server_url,
                   **{f: getattr(rec, f) for f in _RECORD_FIELDS}}
        raw = dump_json(content)
        set_id, terms, subjects = self.record_index.index(rec, record_id)
        key_id, key = self.repo.keys.ensure(AUDIT_KEY_SCOPE)
        detail = seal(AESGCM(key), raw, _aad(record_id))
        term_rows = [(set_id, n, *t) for n, t in enumerate(terms)]
        return PreparedRecord(record_id, rec.recorded_us, set_id, term_rows, subjects, key_id, detail,
                              hashlib.sha256(raw).hexdigest())

    def append(self, conn: Connection, rec: AuditRecord, prepared: PreparedRecord | None = None) -> PreparedRecord:
        """Append the record inside `conn`'s transaction (fail closed: it commits with the
        access or not at all): `prepared` when it was built ahead from the same record, else
        built now. No lock beyond the rows it inserts. Returns what was written."""
        p = prepared or self.build(rec)
        self.sink.write(conn, p)
        return p

    # ------------------------------------------------------------------ reading
    def decrypt(self, record_id: str, key_id: int, detail: bytes, conn: Connection | None = None) -> bytes:
        try:
            return open_sealed(AESGCM(self.repo.keys.by_id(key_id, conn)), detail, _aad(record_id))
        except (DecryptionError, KeyError_) as exc:
            raise CorruptDataError(f"access record {record_id} cannot be decrypted") from exc

    def render(self, raw: bytes, recorded_us: int) -> bytes:
        """The AuditEvent JSON of a decrypted record (events moved from the old chain are kept verbatim)."""
        content = parse_json(raw)
        if content.get("resourceType") == "AuditEvent":
            return raw
        fields = {k: v for k, v in content.items() if k not in ("v", "id", "site")}
        for name in ("type_code", "subtype_code"):
            if fields.get(name) is not None:
                fields[name] = tuple(fields[name])
        event = build_audit_event(AuditRecord(**fields), content["site"], content["id"])
        meta = dict(event.pop("meta"))
        meta["versionId"] = "1"
        meta["lastUpdated"] = instant_text(recorded_us)
        ordered = {"resourceType": event.pop("resourceType"), "id": event.pop("id"), "meta": meta}
        ordered.update(event)
        return dump_json(ordered)

    def _stored(self, row: AnyRow, conn: Connection) -> Stored:
        body = self.render(self.decrypt(row.id, row.key_id, row.detail, conn), row.recorded_us)
        return Stored(type="AuditEvent", id=row.id, version=1, last_updated_us=row.recorded_us, deleted=False,
                      method="POST", body=body, pk=row.pk)

    def load(self, conn: Connection, pks: list[int]) -> list[Stored]:
        """Rendered AuditEvents of the given record pks, in the given order."""
        guard.check("AuditLog.load")
        if not pks:
            return []
        rows = conn.execute(select(access_record.c.pk, access_record.c.id, access_record.c.recorded_us,
                                   access_record.c.key_id, access_record.c.detail)
                            .where(access_record.c.pk.in_(pks))).all()
        by_pk = {r.pk: self._stored(r, conn) for r in rows}
        return [by_pk[pk] for pk in pks if pk in by_pk]

    def read_content(self, conn: Connection, record_id: str) -> bytes | None:
        """The decrypted record (the JSON its content hash covers)."""
        guard.check("AuditLog.read_content")
        row = conn.execute(select(access_record.c.id, access_record.c.key_id, access_record.c.detail)
                           .where(access_record.c.id == record_id)).first()
        return None if row is None else self.decrypt(row.id, row.key_id, row.detail, conn)

    def read(self, conn: Connection, record_id: str) -> Stored | None:
        guard.check("AuditLog.read")
        row = conn.execute(select(access_record.c.pk, access_record.c.id, access_record.c.recorded_us,
                                  access_record.c.key_id, access_record.c.detail)
                           .where(access_record.c.id == record_id)).first()
        return None if row is None else self._stored(row, conn)


def redaction_mac(key: bytes, record_id: str, content_hash: str, redacted_hash: str) -> str:
    """Authorizes a redacted record: only the holder of the chain key (the server) can
    pseudonymize one; the Merkle leaf keeps committing to the original content."""
    message = f"redaction|{record_id}|{content_hash}|{redacted_hash}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def redact(log: AuditLog, conn: Connection, pk: int, transform: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """Rewrite one record's content (erasure pseudonymizes a patient): re-encrypted in place,
    its search rows rebuilt, and the change recorded as an authorized redaction."""
    row = conn.execute(select(access_record).where(access_record.c.pk == pk)).one()
    raw = log.decrypt(row.id, row.key_id, row.detail, conn)
    new_raw = dump_json(transform(parse_json(raw)))
    if new_raw == raw:
        return False
    digest = hashlib.sha256(new_raw).hexdigest()
    mac = redaction_mac(log.repo.keys.ensure(CHAIN_SCOPE)[1], row.id, row.content_hash, digest)
    detail = seal(AESGCM(log.repo.keys.by_id(row.key_id, conn)), new_raw, _aad(row.id))
    event = parse_json(log.render(new_raw, row.recorded_us))
    rows = log.indexer.indexer.index("AuditEvent", event)
    conn.execute(access_subject.delete().where(access_subject.c.record_pk == pk))
    raw_sql.executemany(conn, _INS_SUBJECT, [(pk, row.recorded_us, *s) for s in subject_rows(rows)])
    conn.execute(access_record.update().where(access_record.c.pk == pk).values(
        detail=detail, redaction=f"{digest}:{mac}"))
    return True
