"""`fhirserver audit verify`: check every access record, the Merkle tree and every checkpoint.

One pass over the records in tree order:
- each decrypts under the audit key with its id as associated data, and its content hashes to
  `content_hash` (or, after an erasure, to a redaction the server's chain key authorized);
- its search rows are the ones its AuditEvent indexes to (an index changed to hide an event
  from searches is found);
- positions are 0..n-1 with no gap or repeat; the leaves fold into the stored subtree hashes
  (proofs are served from them) and into the root of every checkpoint size;
- every checkpoint -- the database's and those in the file outside it -- carries a valid
  signature, and none claims more records than the database holds (newest records removed, or
  the database rolled back to a backup).
Records not yet sequenced are checked the same way, except for their place in the tree (the
sequencer runs first, so there are normally none). After retention dropped a prefix of the log
(audit/retention.py), the check starts at its authenticated horizon from the stored tree.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from ..db.engine import read_connection
from ..db.rows import AnyRow
from ..db.schema import access_record, access_subject, audit_checkpoint, audit_node, audit_term
from ..storage.codec import parse_json
from ..storage.repository import CorruptDataError
from .checkpoints import Checkpoint, Signer, read_file
from .merkle import EMPTY_ROOT, CompactRange
from .record_index import subject_rows, term_set
from .records import CHAIN_SCOPE, AuditLog, record_leaf, redaction_mac
from .retention import read_horizon
from .sequencer import frontier

BATCH = 2000


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    root: str
    checkpoints: int = 0
    file_checkpoints: int = 0
    pending: int = 0
    dropped: int = 0  # positions below the retention horizon (audit/retention.py)
    first_bad_seq: int | None = None
    first_bad_event: str | None = None
    reason: str = ""
    warnings: list[str] = field(default_factory=list)


class _Bad(Exception):
    def __init__(self, seq: int | None, event: str | None, reason: str) -> None:
        super().__init__(reason)
        self.seq, self.event, self.reason = seq, event, reason


def _check_record(log: AuditLog, conn: Connection, row: AnyRow, chain_key: bytes, terms: dict[str, list[Any]]) -> None:
    try:
        raw = log.decrypt(row.id, row.key_id, row.detail, conn)
    except CorruptDataError:
        raise _Bad(row.seq, row.id, "access record ciphertext was tampered with (or moved)") from None
    digest = hashlib.sha256(raw).hexdigest()
    if row.redaction:
        redacted, _, mac = row.redaction.partition(":")
        if not hmac.compare_digest(redaction_mac(chain_key, row.id, row.content_hash, redacted), mac):
            raise _Bad(row.seq, row.id, "redaction record was forged or modified")
        if digest != redacted:
            raise _Bad(row.seq, row.id, "access record content does not match its redaction")
    elif digest != row.content_hash:
        raise _Bad(row.seq, row.id, "access record content does not match its hash")
    content = parse_json(raw)
    if content.get("resourceType") != "AuditEvent" and content.get("recorded_us") != row.recorded_us:
        raise _Bad(row.seq, row.id, "the record's time was changed")
    event = parse_json(log.render(raw, row.recorded_us))
    rows = log.indexer.index(event)
    want_refs = sorted((p, t or "", i or "", u or "") for p, t, i, u in subject_rows(rows))
    got_refs = sorted((s.param, s.target_type or "", s.target_id or "", s.url or "") for s in conn.execute(
        select(access_subject).where(access_subject.c.record_pk == row.pk)).all())
    if want_refs != got_refs:
        raise _Bad(row.seq, row.id, "the record's search references were changed")
    set_id, want_terms = term_set(rows)
    if row.terms not in terms:  # the stored rows of a set, in term_set's order
        terms[row.terms] = [(t.tbl, t.param, t.system, t.code, t.kind, t.value) for t in conn.execute(
            select(audit_term).where(audit_term.c.set_id == row.terms).order_by(audit_term.c.n)).all()]
    if row.terms != set_id or terms[row.terms] != want_terms:
        raise _Bad(row.seq, row.id, "the record's search codes were changed")


def verify_log(log: AuditLog, signer: Signer, checkpoint_file: Path) -> VerifyResult:
    engine = log.repo.keys.engine
    chain_key = log.repo.keys.ensure(CHAIN_SCOPE)[1]
    file_cps, unreadable = read_file(checkpoint_file)
    result = VerifyResult(False, 0, EMPTY_ROOT)
    if unreadable:
        result.warnings.append(f"{unreadable} unreadable line(s) in {checkpoint_file}")
    with read_connection(engine) as conn:
        cr = CompactRange()
        db_cps = [Checkpoint(r.tree_size, r.root, r.time_us, r.key_id, r.signature)
                  for r in conn.execute(select(audit_checkpoint).order_by(audit_checkpoint.c.id)).all()]
        try:
            for cp in db_cps + file_cps:
                if not signer.verifies(cp):
                    raise _Bad(None, None, f"checkpoint of size {cp.tree_size} at {cp.time_us} has an invalid signature")
            by_size: dict[int, set[str]] = {}
            for cp in db_cps + file_cps:
                by_size.setdefault(cp.tree_size, set()).add(cp.root)
            for size, roots in by_size.items():
                if len(roots) > 1:
                    raise _Bad(None, None, f"two signed checkpoints of size {size} disagree (the log was forked)")
            stored_nodes = {(r.level, r.idx): r.hash for r in conn.execute(select(audit_node)).all()}
            try:
                start = read_horizon(conn, chain_key)
            except ValueError as exc:
                raise _Bad(None, None, str(exc)) from None
            if start:  # records below the horizon were dropped by retention: start from the stored tree
                cr = frontier(conn, start)
                result.dropped = start
                before = sum(1 for cp in db_cps + file_cps if cp.tree_size < start)
                if before:
                    result.warnings.append(f"{before} checkpoint(s) cover only records dropped by retention "
                                           f"(positions below {start}): their signatures were checked, their roots not")
            last_pk = start - 1
            terms: dict[str, list[Any]] = {}
            ck = {s: next(iter(r)) for s, r in by_size.items()}

            def check_size() -> None:
                if cr.size in ck and cr.size >= start and ck[cr.size] != cr.root():
                    raise _Bad(cr.size - 1, None, f"the first {cr.size} records do not match the signed checkpoint "
                                                  "of that size (records changed, removed or reordered)")

            check_size()
            while True:
                rows = conn.execute(select(access_record).where(access_record.c.seq.is_not(None),
                                                                access_record.c.seq > last_pk)
                                    .order_by(access_record.c.seq).limit(BATCH)).all()
                if not rows:
                    break
                for row in rows:
                    if row.seq != cr.size:
                        reason = (f"record {cr.size} is missing (next is {row.seq})" if row.seq > cr.size
                                  else f"record position {row.seq} appears twice")
                        raise _Bad(cr.size, row.id, reason)
                    _check_record(log, conn, row, chain_key, terms)
                    cr.append(record_leaf(row.id, row.recorded_us, row.content_hash))
                    for level, idx, h in cr.completed:
                        if stored_nodes.get((level, idx)) != h:
                            raise _Bad(row.seq, row.id, f"stored tree node ({level}, {idx}) does not match the records")
                    cr.completed.clear()
                    check_size()
                    last_pk = row.seq
                result.checked = cr.size
            beyond = [cp for cp in db_cps + file_cps if cp.tree_size > cr.size]
            if beyond:
                top = max(beyond, key=lambda c: c.tree_size)
                where = "the checkpoint file" if top in file_cps else "the database"
                raise _Bad(cr.size, None, f"a checkpoint in {where} signed {top.tree_size} records but only {cr.size} "
                                          "exist (newest records removed, or the database rolled back)")
            pending = conn.execute(select(access_record).where(access_record.c.seq.is_(None))).all()
            for row in pending:
                _check_record(log, conn, row, chain_key, terms)
            result.pending = len(pending)
        except _Bad as bad:
            result.checked = cr.size
            result.first_bad_seq, result.first_bad_event, result.reason = bad.seq, bad.event, bad.reason
            return result
    result.ok, result.root = True, cr.root()
    result.checkpoints, result.file_checkpoints = len(db_cps), len(file_cps)
    if not file_cps:
        result.warnings.append(f"no checkpoints in {checkpoint_file}: a rollback of the whole database cannot be "
                               "detected without them")
    return result
