"""Append AuditEvents to a hash chain and verify it.

Each AuditEvent is stored like any resource (encrypted under the `audit` data key, indexed for
search) and linked by one `audit_chain` row:

    hash = HMAC-SHA-256(chain key, prev_hash | seq | event_id | recorded_us | SHA-256(stored JSON))

Erasure of a patient pseudonymizes the events that name them; such a row then also carries
`redaction` = SHA-256(redacted JSON) with an HMAC by the chain key over (seq, event, original and
redacted hashes), so the redacted body verifies while any other change still breaks the chain.

The chain key is a data key (scope `audit-chain`) wrapped by the master key, which never enters
the database: someone who can write to the database but does not hold the master key cannot
re-link the chain after deleting or changing a record.

`audit_head` is the single serialization point (row lock on PostgreSQL; SQLite transactions are
already serialized). Appending happens in the same transaction as the access it records, so an
access without its audit record cannot commit (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select, update

from ..db import raw as raw_sql
from ..db.engine import read_connection
from ..db.schema import audit_chain, audit_head, resource, resource_version
from ..storage.repository import CorruptDataError, PreparedWrite, Repository
from .events import AuditIndexer, AuditRecord, build_audit_event

GENESIS = "0" * 64
_RAW_SEL_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"  # + FOR UPDATE where supported
_RAW_INS_CHAIN = ("INSERT INTO audit_chain (seq, event_id, recorded_us, content_hash, prev_hash, hash) "
                  "VALUES (?, ?, ?, ?, ?, ?)")
_RAW_UPD_HEAD = "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1"


CHAIN_SCOPE = "audit-chain"


def link_hash(key: bytes, prev_hash: str, seq: int, event_id: str, recorded_us: int, content_hash: str) -> str:
    message = f"{prev_hash}|{seq}|{event_id}|{recorded_us}|{content_hash}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def redaction_mac(key: bytes, seq: int, event_id: str, content_hash: str, redacted_hash: str) -> str:
    """Authorizes a redacted body: only the holder of the chain key (the server) can pseudonymize an
    event; the chain link keeps committing to the original content."""
    message = f"redaction|{seq}|{event_id}|{content_hash}|{redacted_hash}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def record_redaction(conn: Connection, repo: Repository, event_id: str, redacted_body: bytes) -> None:
    """Mark one chained AuditEvent as redacted to `redacted_body` (already stored by the caller)."""
    row = conn.execute(select(audit_chain.c.seq, audit_chain.c.content_hash)
                       .where(audit_chain.c.event_id == event_id)).one()
    digest = hashlib.sha256(redacted_body).hexdigest()
    mac = redaction_mac(chain_key(repo), row.seq, event_id, row.content_hash, digest)
    conn.execute(update(audit_chain).where(audit_chain.c.event_id == event_id).values(redaction=f"{digest}:{mac}"))


def chain_key(repo: Repository) -> bytes:
    return repo.keys.ensure(CHAIN_SCOPE)[1]


class AuditLog:
    def __init__(self, repo: Repository, server_url: str) -> None:
        self.repo = repo
        self.server_url = server_url
        self.indexer = AuditIndexer(repo.indexer)

    def prepare(self, rec: AuditRecord) -> PreparedWrite:
        """Build, index and encrypt the AuditEvent -- all the work that needs no lock."""
        event = build_audit_event(rec, self.server_url)
        prepared = self.repo.prepare_indexed("AuditEvent", event, self.indexer.index(event))
        self.repo.seal_first_version(prepared, rec.recorded_us)
        return prepared

    def append(self, conn: Connection, rec: AuditRecord, prepared: PreparedWrite | None = None) -> None:
        """Append one AuditEvent (prepared beforehand or now) to the chain inside `conn`'s transaction."""
        prepared = prepared or self.prepare(rec)
        head_seq, head_hash = raw_sql.fetchone(
            conn, _RAW_SEL_HEAD + ("" if conn.dialect.name == "sqlite" else " FOR UPDATE"))
        stored = self.repo.create(conn, prepared, when_us=rec.recorded_us, fresh_id=True)
        assert stored.body is not None
        content_hash = hashlib.sha256(stored.body).hexdigest()
        seq = head_seq + 1
        new_hash = link_hash(chain_key(self.repo), head_hash, seq, stored.id, rec.recorded_us, content_hash)
        raw_sql.execute(conn, _RAW_INS_CHAIN, (seq, stored.id, rec.recorded_us, content_hash, head_hash, new_hash)).close()
        raw_sql.execute(conn, _RAW_UPD_HEAD, (seq, new_hash)).close()


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    head_hash: str
    first_bad_seq: int | None = None
    first_bad_event: str | None = None
    reason: str = ""


def verify_chain(engine: Engine, repo: Repository, batch: int = 2000) -> VerifyResult:
    """Walk the whole chain; report the first record that is changed, missing or out of order."""
    prev_hash, expected_seq, checked = GENESIS, 1, 0
    key = chain_key(repo)

    def bad(seq: int | None, event: str | None, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, prev_hash, seq, event, reason)

    with read_connection(engine) as conn:
        last = 0
        while True:
            rows = conn.execute(
                select(audit_chain).where(audit_chain.c.seq > last).order_by(audit_chain.c.seq).limit(batch)
            ).all()
            if not rows:
                break
            for row in rows:
                if row.seq != expected_seq:
                    return bad(expected_seq, None, f"record {expected_seq} is missing (next is {row.seq})")
                if row.prev_hash != prev_hash:
                    return bad(row.seq, row.event_id, "previous-hash link is broken (record changed, removed or reordered)")
                if not hmac.compare_digest(
                        link_hash(key, row.prev_hash, row.seq, row.event_id, row.recorded_us, row.content_hash), row.hash):
                    return bad(row.seq, row.event_id, "chain record was modified")
                stored = conn.execute(
                    select(resource_version.c.version, resource_version.c.key_id, resource_version.c.body,
                           resource_version.c.last_updated_us)
                    .join(resource, resource.c.pk == resource_version.c.resource_pk)
                    .where(resource.c.type == "AuditEvent", resource.c.id == row.event_id)
                ).all()
                if len(stored) != 1:
                    return bad(row.seq, row.event_id, "AuditEvent is missing or has been altered (versions)")
                try:
                    body = repo.decrypt("AuditEvent", row.event_id, stored[0].version, stored[0].key_id, stored[0].body, conn)
                except CorruptDataError:
                    return bad(row.seq, row.event_id, "AuditEvent ciphertext was tampered with")
                expected = row.content_hash
                if row.redaction:
                    redacted, _, mac = row.redaction.partition(":")
                    if not hmac.compare_digest(redaction_mac(key, row.seq, row.event_id, row.content_hash, redacted), mac):
                        return bad(row.seq, row.event_id, "redaction record was forged or modified")
                    expected = redacted
                if body is None or hashlib.sha256(body).hexdigest() != expected:
                    return bad(row.seq, row.event_id, "AuditEvent content does not match its hash")
                prev_hash, expected_seq, last = row.hash, expected_seq + 1, row.seq
                checked += 1
        head = conn.execute(select(audit_head).where(audit_head.c.id == 1)).one()
        if head.seq != checked or head.hash != prev_hash:
            return bad(head.seq, None, "chain head does not match the last record (records removed at the end?)")
        orphan = conn.execute(
            select(resource.c.id).where(resource.c.type == "AuditEvent",
                                        resource.c.id.not_in(select(audit_chain.c.event_id))).limit(1)
        ).first()
        if orphan:
            return bad(None, orphan[0], "an AuditEvent exists outside the chain")
    return VerifyResult(True, checked, prev_hash)
