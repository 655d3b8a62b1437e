"""Access-record retention (issue 15, item 1): months older than the period are dropped as a
prefix of the Merkle tree (partitions on PostgreSQL), the log still verifies from the
authenticated horizon -- later checkpoints, inclusion proofs of kept records, new records -- and
tampering with the kept part or the horizon is still found."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from fhirserver.audit.events import AuditRecord
from fhirserver.audit.proof import prove
from fhirserver.audit.retention import month_start
from fhirserver.audit.verify import verify_log
from fhirserver.cli import main
from fhirserver.clock import now_us
from fhirserver.db.schema import access_hourly, access_record, audit_state
from fhirserver.schedule import drop_expired_access_records
from tests.functional.exchange.test_load import cli_env

DAY = 86_400_000_000


def append(svc: Any, when: list[int]) -> None:
    with svc.engine.begin() as conn:
        for n, t in enumerate(when):
            svc.audit.append(conn, AuditRecord(interaction="read", request_id=f"ret{t}{n}", network_address="10.0.0.3",
                                               recorded_us=t, status=200, client_id="ret", client_name="ret",
                                               patients=[f"p{n % 7}"], resource_type="Patient",
                                               resources=[f"Patient/p{n % 7}/_history/1"]))


def verify(svc: Any) -> Any:
    return verify_log(svc.audit, svc.sequencer.signer, svc.settings.checkpoint_path)


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_old_months_go_and_the_rest_still_verifies(app: Any, settings: Any) -> None:
    svc = app.extensions["fhirserver"]
    now = now_us()
    postgres = svc.engine.dialect.name == "postgresql"
    if postgres:  # monthly partitions for the past months too (a server running for years has them)
        _past_partitions(svc, now, 6)
    # 120 days of records, four a day (in time order, as the sequencer sees them), checkpoints along the way
    for week in range(0, 120, 30):
        append(svc, [now - (120 - d) * DAY + k * 3_600_000_000 for d in range(week, week + 30) for k in range(4)])
        svc.sequencer.run_once(force_checkpoint=True)
    total = 480
    with svc.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(access_record)).scalar() == total
    svc.settings = settings = _with(settings, audit_retention_days=45)
    dropped = drop_expired_access_records(svc)
    assert dropped is not None and dropped.horizon % 2 == 0 and dropped.records > 0
    before = month_start(now - 45 * DAY)
    assert dropped.before_us == before
    with svc.engine.connect() as conn:
        oldest = conn.execute(select(func.min(access_record.c.recorded_us)).where(access_record.c.seq.is_not(None))).scalar()
        assert conn.execute(select(func.count()).where(access_record.c.recorded_us < before,
                                                       access_record.c.seq < dropped.horizon)).scalar() == 0
        assert conn.execute(select(func.min(access_hourly.c.hour_us))).scalar() >= before
        kept = conn.execute(select(access_record.c.id).where(access_record.c.seq == dropped.horizon)).scalar()
    assert oldest is not None and oldest >= before - DAY  # at most the straggler that made the horizon even
    if postgres:  # whole months went as partitions: DROP TABLE, not DELETE
        assert dropped.partitions and all(p.startswith("access_record_") for p in dropped.partitions)
        with svc.engine.connect() as conn:
            for name in dropped.partitions:
                assert conn.exec_driver_sql(f"SELECT to_regclass('{name}')").scalar() is None
    result = verify(svc)
    assert result.ok, result.reason
    assert result.dropped == dropped.horizon and result.checked == total
    assert result.pending == 1  # the retention run's own access record, not sequenced yet
    # a kept record's inclusion proof still works against a signed checkpoint
    with svc.engine.connect() as conn:
        proof = prove(conn, kept)
    assert proof is not None and proof.leaf_index == dropped.horizon
    # new records after the drop: sequenced, checkpointed, verified
    append(svc, [now_us() for _ in range(5)])
    svc.sequencer.run_once(force_checkpoint=True)
    assert verify(svc).ok
    # running it again drops nothing more; the CLI reports verification with the horizon
    assert drop_expired_access_records(svc) is None
    out = CliRunner().invoke(main, ["audit", "verify"], env={**cli_env(settings), "FHIRSERVER_AUDIT_RETENTION_DAYS": "45"})
    assert out.exit_code == 0 and f"the first {dropped.horizon} dropped by retention" in out.stdout
    # tampering: removing the first kept record, or moving the horizon, is found
    with svc.engine.begin() as conn:
        conn.execute(update(audit_state).where(audit_state.c.name == "horizon").values(value=dropped.horizon + 2))
    bad = verify(svc)
    assert not bad.ok and "horizon" in bad.reason
    with svc.engine.begin() as conn:
        conn.execute(update(audit_state).where(audit_state.c.name == "horizon").values(value=dropped.horizon))
        conn.execute(access_record.delete().where(access_record.c.seq == dropped.horizon))
    bad = verify(svc)
    assert not bad.ok and bad.first_bad_seq == dropped.horizon


def _with(settings: Any, **kw: Any) -> Any:
    from dataclasses import replace

    return replace(settings, **kw)


def _past_partitions(svc: Any, now: int, months: int) -> None:
    import datetime

    from fhirserver.audit.sequencer import month_bounds

    day = datetime.datetime.fromtimestamp(now / 1e6, datetime.UTC)
    y, m = day.year, day.month
    with svc.engine.begin() as conn:
        for _ in range(months + 1):
            start, end = month_bounds(y, m)
            for table in ("access_record", "access_subject"):
                conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {table}_{y:04d}_{m:02d} PARTITION OF {table} "
                                     f"FOR VALUES FROM ({start}) TO ({end})")
            y, m = (y - 1, 12) if m == 1 else (y, m - 1)
