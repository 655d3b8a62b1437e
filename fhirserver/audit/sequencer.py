"""The sequencer: gives committed access records their place in the Merkle tree, and signs
checkpoints (docs/audit.md).

Requests never wait for it. Every server process runs it every `audit_sequence_seconds`; one
run at a time holds the log (a transaction-scoped PostgreSQL advisory lock taken with
`pg_try_advisory_xact_lock`, so other instances skip instead of queueing; on SQLite the write
transaction itself), takes up to BATCH unsequenced records in pk order, numbers them after the
current tree, stores the new perfect-subtree hashes and, when `audit_checkpoint_seconds` have
passed (or when asked), signs a checkpoint -- all in one transaction, like Trillian's sequencer
and signer. The checkpoint is published (file + log) after that transaction commits.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, select, text

from ..clock import now_us
from ..db import raw as raw_sql
from ..db.engine import read_connection
from ..db.schema import access_record, audit_checkpoint, audit_node
from .checkpoints import Checkpoint, Signer, publish
from .merkle import CompactRange, PerfectHash
from .records import record_leaf
from .rollup import BATCH as ROLLUP_BATCH
from .rollup import roll_up, watermark

log = logging.getLogger("fhirserver.audit")
BATCH = 5000
LOCK_ID = 0x66686972  # "fhir": the advisory lock of the sequencer
_SET_SEQ = "UPDATE access_record SET seq = ? WHERE pk = ? AND recorded_us = ?"
_INS_NODE = "INSERT INTO audit_node (level, idx, hash) VALUES (?, ?, ?)"


def tree_size(conn: Connection) -> int:
    top = conn.execute(select(func.max(access_record.c.seq))).scalar()
    return 0 if top is None else int(top) + 1


def leaf_at(conn: Connection, seq: int) -> str:
    row = conn.execute(select(access_record.c.id, access_record.c.recorded_us, access_record.c.content_hash)
                       .where(access_record.c.seq == seq)).one()
    return record_leaf(row.id, row.recorded_us, row.content_hash)


def perfect_hashes(conn: Connection) -> PerfectHash:
    """(level, index) -> hash, from the leaves (level 0) and the stored nodes."""

    def perfect(level: int, idx: int) -> str:
        if level == 0:
            return leaf_at(conn, idx)
        found = conn.execute(select(audit_node.c.hash).where(audit_node.c.level == level,
                                                             audit_node.c.idx == idx)).scalar()
        if found is None:
            raise LookupError(f"tree node ({level}, {idx}) is missing")
        return str(found)

    return perfect


def frontier(conn: Connection, size: int) -> CompactRange:
    """The compact range of the first `size` leaves, from the stored tree."""
    cr = CompactRange()
    perfect = perfect_hashes(conn)
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            cr.stack.append((level, perfect(level, start >> level)))
            start += 1 << level
    cr.size = size
    return cr


PARTITIONED = ("access_record", "access_subject")
PARTITION_CHECK_US = 3600 * 1_000_000


def month_bounds(year: int, month: int) -> tuple[int, int]:
    """[start, end) of a calendar month (UTC) in microseconds."""
    import calendar

    start = calendar.timegm((year, month, 1, 0, 0, 0)) * 1_000_000
    ny, nm = (year + 1, 1) if month == 12 else (year, month + 1)
    return start, calendar.timegm((ny, nm, 1, 0, 0, 0)) * 1_000_000


def ensure_partitions(conn: Connection, now: int, months_ahead: int = 2) -> list[str]:
    """PostgreSQL: monthly partitions of the access-record tables for the next months (made
    ahead: a month whose rows already sit in the default partition cannot be split off).
    Returns the partitions created."""
    import datetime

    made = []
    day = datetime.datetime.fromtimestamp(now / 1e6, datetime.UTC)
    y, m = day.year, day.month
    for _ in range(months_ahead):
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        start, end = month_bounds(y, m)
        for table in PARTITIONED:
            name = f"{table}_{y:04d}_{m:02d}"
            exists = conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar()
            if exists is None:
                conn.execute(text(f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ({start}) TO ({end})"))
                made.append(name)
    return made


@dataclass
class RunResult:
    sequenced: int
    tree_size: int
    checkpoint: Checkpoint | None
    rolled_up: int = 0


class Sequencer:
    def __init__(self, engine: Engine, signer: Signer, checkpoint_file: object, checkpoint_seconds: float) -> None:
        self.engine = engine
        self.signer = signer
        self.checkpoint_file = checkpoint_file
        self.checkpoint_seconds = checkpoint_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_checkpoint_us = 0  # for the checkpoint-age metric
        self._partitions_checked_us = 0

    def hold(self, conn: Connection) -> bool:
        """Take the log for this transaction (False: another process holds it right now)."""
        return self._locked(conn)

    def _locked(self, conn: Connection) -> bool:
        if conn.dialect.name == "postgresql":
            return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LOCK_ID}).scalar())
        return True  # SQLite: this write transaction already excludes every other writer

    def run_once(self, force_checkpoint: bool = False, checkpoint: bool = True) -> RunResult | None:
        """Sequence what is pending (all of it, in batches) and checkpoint when due (or forced;
        never when `checkpoint` is False). None when another process holds the log right now."""
        if not force_checkpoint:
            idle_size = self._idle(checkpoint)
            if idle_size is not None:
                return RunResult(0, idle_size, None)
        total = 0
        while True:
            done = self._batch(force_checkpoint, checkpoint)
            if done is None:
                return None
            total += done.sequenced
            if done.checkpoint is not None or (done.sequenced < BATCH and done.rolled_up < ROLLUP_BATCH):
                if done.checkpoint is not None:
                    publish(done.checkpoint, self.checkpoint_file)  # type: ignore[arg-type]
                    self.last_checkpoint_us = done.checkpoint.time_us
                return RunResult(total, done.tree_size, done.checkpoint)

    def _idle(self, allow_checkpoint: bool) -> int | None:
        """The tree size when there is nothing to do (no record waiting, no checkpoint due), else
        None. Read-only: an idle server's sequencer threads never take the (SQLite) write lock."""
        with read_connection(self.engine) as conn:
            if conn.execute(select(access_record.c.pk).where(access_record.c.seq.is_(None)).limit(1)).first():
                return None
            size = tree_size(conn)
            if watermark(conn) < size:
                return None  # records still to roll up
            if not allow_checkpoint:
                return size
            last = conn.execute(select(audit_checkpoint.c.tree_size, audit_checkpoint.c.time_us)
                                .order_by(audit_checkpoint.c.id.desc()).limit(1)).first()
        if last is None or (size > last.tree_size and now_us() - last.time_us >= self.checkpoint_seconds * 1e6):
            return None
        return size

    def _batch(self, force_checkpoint: bool, allow_checkpoint: bool) -> RunResult | None:
        with self.engine.begin() as conn:
            if not self._locked(conn):
                return None
            if conn.dialect.name == "postgresql" and now_us() - self._partitions_checked_us > PARTITION_CHECK_US:
                for name in ensure_partitions(conn, now_us()):
                    log.info("created partition %s", name)
                self._partitions_checked_us = now_us()
            size = tree_size(conn)
            rows = conn.execute(select(access_record.c.pk, access_record.c.id, access_record.c.recorded_us,
                                       access_record.c.content_hash)
                                .where(access_record.c.seq.is_(None)).order_by(access_record.c.pk).limit(BATCH)).all()
            cr = frontier(conn, size) if rows else None
            if cr is not None:
                updates = []
                for row in rows:
                    updates.append((cr.size, row.pk, row.recorded_us))
                    cr.append(record_leaf(row.id, row.recorded_us, row.content_hash))
                raw_sql.executemany(conn, _SET_SEQ, updates)
                raw_sql.executemany(conn, _INS_NODE, cr.completed)
                size = cr.size
            rolled = roll_up(conn, size)  # the records just sequenced (or a batch of older ones)
            last = conn.execute(select(audit_checkpoint.c.tree_size, audit_checkpoint.c.time_us)
                                .order_by(audit_checkpoint.c.id.desc()).limit(1)).first()
            now = now_us()
            due = last is None or (size > last.tree_size and now - last.time_us >= self.checkpoint_seconds * 1e6)
            checkpoint = None
            if last is not None:
                self.last_checkpoint_us = max(self.last_checkpoint_us, last.time_us)
            if force_checkpoint or (allow_checkpoint and due and len(rows) < BATCH and rolled < ROLLUP_BATCH):
                root = (cr or frontier(conn, size)).root()
                checkpoint = self.signer.sign(size, root, now)
                conn.execute(audit_checkpoint.insert().values(
                    tree_size=size, root=root, time_us=now, key_id=checkpoint.key_id, signature=checkpoint.signature))
            return RunResult(len(rows), size, checkpoint, rolled)

    # ---- the background thread of a server process
    def start(self, interval: float) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="audit-sequencer", daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep sequencing; the next run retries
                log.exception("audit sequencer run failed")

    def stop(self, final_checkpoint: bool = True) -> None:
        """Stop the thread; sequence what is left and sign a checkpoint (shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if final_checkpoint:
            for _attempt in range(20):
                if self.run_once(force_checkpoint=True) is not None:
                    return
                time.sleep(0.1)
