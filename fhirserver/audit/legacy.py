"""Moving AuditEvents of the old hash chain (before migration 0009) into access records.

Before the redesign every AuditEvent was an encrypted resource row linked by `audit_chain`
(hash = HMAC(chain key, prev | seq | id | recorded_us | SHA-256(JSON))) under one `audit_head`.
At the first start after the upgrade, with the keys at hand, `migrate_chain` checks that whole
chain exactly as the old `audit verify` did and, only if it is intact, turns each event into an
access record in chain order: the stored JSON becomes the record's content (rendered verbatim),
its chain content hash becomes the record's `content_hash`, an erasure's redaction is re-signed
in the new form, and the sequencer then gives them their leaves. All in one transaction; a
broken chain stops the server with the first bad record named, nothing changed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from sqlalchemy import Connection, delete, inspect, select, text

from ..db import raw as raw_sql
from ..db.schema import INDEX_TABLES, audit_chain, compartment, resource, resource_version
from ..storage.codec import parse_json
from .record_index import subject_rows, term_set
from .records import (
    _INS_RECORD,
    _INS_SUBJECT,
    _INS_TERM,
    AUDIT_KEY_SCOPE,
    CHAIN_SCOPE,
    AuditLog,
    _aad,
    redaction_mac,
)

log = logging.getLogger("fhirserver.audit")
GENESIS = "0" * 64


class LegacyChainError(Exception):
    """The old chain does not verify; it is left untouched."""


def _link(key: bytes, prev: str, seq: int, event_id: str, recorded_us: int, content_hash: str) -> str:
    return hmac.new(key, f"{prev}|{seq}|{event_id}|{recorded_us}|{content_hash}".encode(), hashlib.sha256).hexdigest()


def _old_redaction_mac(key: bytes, seq: int, event_id: str, content_hash: str, redacted: str) -> str:
    message = f"redaction|{seq}|{event_id}|{content_hash}|{redacted}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def migrate_chain(audit: AuditLog) -> int:
    """Move every chained AuditEvent into access records; returns how many (0: nothing to do)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from ..crypto.cipher import seal

    keys = audit.repo.keys
    with keys.engine.begin() as conn:
        if not inspect(conn).has_table("audit_chain"):
            return 0
        rows = conn.execute(select(audit_chain).order_by(audit_chain.c.seq)).all()
        if not rows:
            return 0
        chain_key = keys.ensure(CHAIN_SCOPE)[1]
        key_id, key = keys.ensure(AUDIT_KEY_SCOPE)
        prev = GENESIS
        for n, row in enumerate(rows, 1):
            if row.seq != n or row.prev_hash != prev or not hmac.compare_digest(
                    _link(chain_key, prev, row.seq, row.event_id, row.recorded_us, row.content_hash), row.hash):
                raise LegacyChainError(f"old audit chain broken at seq={row.seq} event={row.event_id}")
            prev = row.hash
        head = conn.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).first()
        if head is None or head.seq != len(rows) or head.hash != prev:
            raise LegacyChainError("old audit chain head does not match its last record")
        for row in rows:
            pk, body = _event(audit, conn, row.event_id)
            digest = hashlib.sha256(body).hexdigest()
            redaction = None
            if row.redaction:
                redacted, _, mac = row.redaction.partition(":")
                if not hmac.compare_digest(_old_redaction_mac(chain_key, row.seq, row.event_id, row.content_hash,
                                                              redacted), mac) or digest != redacted:
                    raise LegacyChainError(f"old audit chain redaction invalid at seq={row.seq}")
                redaction = f"{digest}:{redaction_mac(chain_key, row.event_id, row.content_hash, digest)}"
            elif digest != row.content_hash:
                raise LegacyChainError(f"old AuditEvent content does not match its hash at seq={row.seq}")
            event = parse_json(body)
            index = audit.indexer.indexer.index("AuditEvent", event)
            set_id, terms = term_set(index)
            raw_sql.executemany(conn, _INS_TERM, [(set_id, i, *t) for i, t in enumerate(terms)])
            detail = seal(AESGCM(key), body, _aad(row.event_id))
            rpk = raw_sql.insert_returning_pk(conn, _INS_RECORD, (row.event_id, row.recorded_us, set_id, key_id,
                                                                  detail, row.content_hash))
            if redaction:
                conn.execute(text("UPDATE access_record SET redaction = :r WHERE pk = :pk"), {"r": redaction, "pk": rpk})
            raw_sql.executemany(conn, _INS_SUBJECT, [(rpk, row.recorded_us, *s) for s in subject_rows(index)])
            for table in INDEX_TABLES.values():
                conn.execute(delete(table).where(table.c.resource_pk == pk))
            conn.execute(delete(compartment).where(compartment.c.resource_pk == pk))
            conn.execute(delete(resource_version).where(resource_version.c.resource_pk == pk))
            conn.execute(delete(resource).where(resource.c.pk == pk))
        conn.execute(delete(audit_chain))
        conn.execute(text("UPDATE audit_head SET seq = 0, hash = :g WHERE id = 1"), {"g": GENESIS})
    log.info("moved %d AuditEvents of the old hash chain into access records", len(rows))
    return len(rows)


def _event(audit: AuditLog, conn: Connection, event_id: str) -> tuple[int, bytes]:
    row = conn.execute(select(resource.c.pk, resource_version.c.version, resource_version.c.key_id,
                              resource_version.c.body)
                       .join(resource_version, resource_version.c.resource_pk == resource.c.pk)
                       .where(resource.c.type == "AuditEvent", resource.c.id == event_id)).all()
    if len(row) != 1:
        raise LegacyChainError(f"old AuditEvent {event_id} is missing or has several versions")
    pk, version, key_id, blob = row[0]
    body = audit.repo.decrypt("AuditEvent", event_id, version, key_id, blob, conn)
    if body is None:
        raise LegacyChainError(f"old AuditEvent {event_id} has no content")
    return pk, body
