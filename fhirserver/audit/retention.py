"""Retention of the access records (issue 15, item 1): drop whole months older than the period
(default 6 years, HIPAA's documentation rule), keep the log verifiable.

Records are dropped as a prefix of the Merkle tree: the new horizon H is the smallest position
of any record from the first kept month, rounded down to an even number, and everything below H
goes -- on PostgreSQL by dropping the monthly partitions that hold nothing else, the rest by
DELETE; the hourly roll-up of those months goes too. The stored subtree hashes stay: the tree of
the first H leaves is still summarized by them (H is even, so no single leaf is needed), later
checkpoints still verify against records from H on, and inclusion proofs of kept records still
work (the sibling of a kept leaf is kept). H is recorded in `audit_state` with an HMAC under the
server's chain key, so removing a prefix of the log by hand is not mistaken for retention.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import re
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, select, text, update

from ..clock import now_us
from ..db.schema import access_agent_hour, access_hourly, access_record, access_subject, audit_state
from ..fhir.dates import instant_text
from .events import AuditRecord
from .records import CHAIN_SCOPE, AuditLog
from .sequencer import month_bounds

HORIZON = "horizon"
_PARTITION = re.compile(r"^access_record_(\d{4})_(\d{2})$")


@dataclass
class Dropped:
    horizon: int
    before_us: int
    records: int
    partitions: list[str]


def horizon_mac(key: bytes, horizon: int, before_us: int) -> str:
    return hmac.new(key, f"horizon|{horizon}|{before_us}".encode(), hashlib.sha256).hexdigest()


def read_horizon(conn: Connection, key: bytes) -> int:
    """The verified horizon (0 when nothing was ever dropped); ValueError if it was forged."""
    row = conn.execute(select(audit_state).where(audit_state.c.name == HORIZON)).first()
    if row is None:
        return 0
    before = int(json.loads(row.detail or "{}").get("before_us", -1))
    if not hmac.compare_digest(horizon_mac(key, int(row.value), before), row.mac or ""):
        raise ValueError("the retention horizon of the audit log was forged or modified")
    return int(row.value)


def month_start(us: int) -> int:
    day = datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC)
    return month_bounds(day.year, day.month)[0]


def drop_before(log: AuditLog, conn: Connection, cutoff_us: int) -> Dropped | None:
    """Drop the records of the months wholly before `cutoff_us` (inside the caller's transaction,
    which must hold the sequencer's lock or run with the sequencer stopped). None: nothing to do."""
    key = log.repo.keys.ensure(CHAIN_SCOPE)[1]
    before = month_start(cutoff_us)
    old = read_horizon(conn, key)
    first_kept = conn.execute(select(func.min(access_record.c.seq)).where(access_record.c.recorded_us >= before)).scalar()
    if first_kept is None:
        first_kept = (conn.execute(select(func.max(access_record.c.seq))).scalar() or -1) + 1
    horizon = int(first_kept) & ~1
    if horizon <= old:
        return None
    records = conn.execute(select(func.count()).select_from(access_record).where(access_record.c.seq < horizon)).scalar_one()
    partitions: list[str] = []
    if conn.dialect.name == "postgresql":
        partitions = _drop_partitions(conn, before, horizon)
    gone = select(access_record.c.pk).where(access_record.c.seq < horizon)
    conn.execute(delete(access_subject).where(access_subject.c.record_pk.in_(gone)))
    conn.execute(delete(access_record).where(access_record.c.seq < horizon))
    for table in (access_hourly, access_agent_hour):
        conn.execute(delete(table).where(table.c.hour_us < before))
    detail = json.dumps({"before_us": before, "before": instant_text(before), "at": instant_text(now_us())})
    values = {"value": horizon, "detail": detail, "mac": horizon_mac(key, horizon, before)}
    if conn.execute(select(audit_state.c.name).where(audit_state.c.name == HORIZON)).first() is None:
        conn.execute(audit_state.insert().values(name=HORIZON, **values))
    else:
        conn.execute(update(audit_state).where(audit_state.c.name == HORIZON).values(**values))
    rec = AuditRecord(interaction="delete", request_id=f"audit-retention-{now_us()}", network_address="localhost",
                      recorded_us=now_us(), status=200,
                      outcome_desc=f"access records before {instant_text(before)} dropped by retention: positions "
                                   f"{old}..{horizon - 1} ({records} records"
                                   + (f", partitions {', '.join(partitions)}" if partitions else "") + ")")
    rec.subtype_code = ("urn:fhirserver:privacy-job", "audit-retention", "audit retention")
    log.append(conn, rec)
    return Dropped(horizon, before, records, partitions)


def _drop_partitions(conn: Connection, before: int, horizon: int) -> list[str]:
    """PostgreSQL: drop the monthly partitions that end by `before` and hold only records below
    the horizon (with their access_subject partitions)."""
    names = conn.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                              "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'access_record'")).scalars()
    dropped = []
    for name in sorted(names):
        m = _PARTITION.match(name)
        if m is None or month_bounds(int(m[1]), int(m[2]))[1] > before:
            continue
        rest = conn.execute(text(f"SELECT 1 FROM {name} WHERE seq IS NULL OR seq >= :h LIMIT 1"), {"h": horizon}).first()
        if rest is not None:
            continue
        subject = name.replace("access_record_", "access_subject_")
        conn.execute(text(f"DROP TABLE IF EXISTS {subject}"))
        conn.execute(text(f"DROP TABLE {name}"))
        dropped.append(name)
    return dropped
