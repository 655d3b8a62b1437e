"""What an auditor or a patient needs to check, offline, that an access record is in the log:
the leaf, its inclusion path to the root of a signed checkpoint, and that checkpoint
(docs/audit.md, "Checking a proof"). Only public hashes: no other record's content."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, select

from ..db.schema import access_record, audit_checkpoint
from .checkpoints import Checkpoint
from .merkle import inclusion_path
from .records import leaf_content, record_leaf
from .sequencer import perfect_hashes


@dataclass
class InclusionProof:
    record_id: str
    recorded_us: int
    content_hash: str
    leaf_content: str
    leaf_hash: str
    leaf_index: int
    path: list[str]
    checkpoint: Checkpoint
    redacted: bool


def sequenced(conn: Connection, record_id: str) -> int | None:
    """The record's position in the tree (None: not yet sequenced, or unknown)."""
    return conn.execute(select(access_record.c.seq).where(access_record.c.id == record_id)).scalar()


def covering_checkpoint(conn: Connection, seq: int) -> Checkpoint | None:
    """The latest checkpoint whose tree holds position `seq`."""
    row = conn.execute(select(audit_checkpoint).where(audit_checkpoint.c.tree_size > seq)
                       .order_by(audit_checkpoint.c.id.desc()).limit(1)).first()
    return None if row is None else Checkpoint(row.tree_size, row.root, row.time_us, row.key_id, row.signature)


def prove(conn: Connection, record_id: str) -> InclusionProof | None:
    row = conn.execute(select(access_record.c.id, access_record.c.recorded_us, access_record.c.content_hash,
                              access_record.c.seq, access_record.c.redaction)
                       .where(access_record.c.id == record_id)).first()
    if row is None or row.seq is None:
        return None
    cp = covering_checkpoint(conn, row.seq)
    if cp is None:
        return None
    path = inclusion_path(row.seq, cp.tree_size, perfect_hashes(conn))
    return InclusionProof(row.id, row.recorded_us, row.content_hash,
                          leaf_content(row.id, row.recorded_us, row.content_hash).decode(),
                          record_leaf(row.id, row.recorded_us, row.content_hash), row.seq, path, cp,
                          row.redaction is not None)
