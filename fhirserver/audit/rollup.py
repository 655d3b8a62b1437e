"""The hourly roll-up of the access records: who touched which patient, when, how often.

For each sequenced record below the watermark `rollup_seq`, and each (agent, patient) pair it
names, `access_hourly` holds per (agent, hour, patient, action, outcome) the number of records and
their first and last time. The sequencer extends it in the transaction that sequences records, so
it is written by one process at a time and never contended by requests; records that were
sequenced before the roll-up existed are caught up the same way, a batch at a time.

Readers (breach report, snooping detection) combine whole hours of the roll-up with the records
outside it (edge hours, records not rolled up yet) in one statement, so the answer is exact and
consistent. An erasure renames the patient in the roll-up as it does in the records.
"""

from __future__ import annotations

from sqlalchemy import Connection, select, text, update

from ..db.schema import access_agent_hour, access_hourly, audit_state

HOUR_US = 3_600_000_000
WATERMARK = "rollup_seq"
BATCH = 5000

# Driven by the batch's seq range: `x || ''` keeps the planner off the (param, target) and
# (tbl, param) indexes for the joined rows -- with them SQLite walked every agent row of the log
# for each batch (measured: 30 s a batch at 5 million records) instead of the batch's own rows.
_SELECT = f"""
SELECT who.target_type, who.target_id, (r.recorded_us / {HOUR_US}) * {HOUR_US}, pat.target_id, act.code, res.code,
       COUNT(DISTINCT r.pk), MIN(r.recorded_us), MAX(r.recorded_us)
FROM access_record r
JOIN access_subject who ON who.record_pk = r.pk AND who.param || '' = 'agent' AND who.target_id IS NOT NULL
JOIN access_subject pat ON pat.record_pk = r.pk AND pat.param || '' = 'patient' AND pat.target_type = 'Patient'
JOIN audit_term act ON act.set_id = r.terms AND act.tbl || '' = 'token' AND act.param || '' = 'action'
JOIN audit_term res ON res.set_id = r.terms AND res.tbl || '' = 'token' AND res.param || '' = 'outcome'
WHERE r.seq >= :lo AND r.seq < :hi
GROUP BY who.target_type, who.target_id, (r.recorded_us / {HOUR_US}) * {HOUR_US}, pat.target_id, act.code, res.code
"""

_UPSERT = {
    "sqlite": "MIN(access_hourly.first_us, excluded.first_us)", "postgresql": "LEAST(access_hourly.first_us, excluded.first_us)",
}
_UPSERT_MAX = {
    "sqlite": "MAX(access_hourly.last_us, excluded.last_us)", "postgresql": "GREATEST(access_hourly.last_us, excluded.last_us)",
}


def watermark(conn: Connection) -> int:
    value = conn.execute(select(audit_state.c.value).where(audit_state.c.name == WATERMARK)).scalar()
    return int(value or 0)


def roll_up(conn: Connection, tree_size: int) -> int:
    """Add the records in [watermark, min(watermark + BATCH, tree_size)) to the roll-up and move
    the watermark. Call inside the sequencer's transaction (its lock makes it the only writer).
    Returns the number of positions rolled up."""
    lo = watermark(conn)
    hi = min(lo + BATCH, tree_size)
    if hi <= lo:
        return 0
    dialect = conn.dialect.name
    conn.execute(text(
        "INSERT INTO access_hourly (agent_type, agent_id, hour_us, patient_id, action, outcome, n, first_us, last_us) "
        + _SELECT + " ON CONFLICT (agent_type, agent_id, hour_us, patient_id, action, outcome) DO UPDATE SET "
        f"n = access_hourly.n + excluded.n, first_us = {_UPSERT[dialect]}, last_us = {_UPSERT_MAX[dialect]}"),
        {"lo": lo, "hi": hi})
    if lo == 0 and conn.execute(select(audit_state.c.name).where(audit_state.c.name == WATERMARK)).first() is None:
        conn.execute(audit_state.insert().values(name=WATERMARK, value=hi))
    else:
        conn.execute(update(audit_state).where(audit_state.c.name == WATERMARK).values(value=hi))
    return hi - lo


def rename_patient(conn: Connection, patient_id: str, pseudonym: str) -> None:
    """An erased patient appears in the roll-up under the pseudonym that replaced them in the records."""
    conn.execute(update(access_hourly).where(access_hourly.c.patient_id == patient_id).values(patient_id=pseudonym))
    for table in (access_hourly, access_agent_hour):
        conn.execute(update(table).where(table.c.agent_type == "Patient", table.c.agent_id == patient_id)
                     .values(agent_id=pseudonym))


def hour_floor(us: int) -> int:
    return us // HOUR_US * HOUR_US


def hour_ceil(us: int) -> int:
    return -(-us // HOUR_US) * HOUR_US
