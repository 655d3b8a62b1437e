"""PostgreSQL: the access-record tables are range-partitioned by time; the sequencer makes the
coming months' partitions ahead, records land in their month's partition, and sequencing,
search and `audit verify` work across partitions."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import text

from fhirserver.audit.events import AuditRecord
from fhirserver.audit.sequencer import month_bounds
from fhirserver.clock import now_us
from fhirserver.db.migrations import upgrade
from fhirserver.services import build_services
from tests.conftest import make_settings
from tests.support.audit import verify_audit


def test_records_land_in_monthly_partitions(postgres: Any, tmp_path: Any) -> None:
    url = postgres.create_database(f"parts_{tmp_path.name[-16:].lower()}")
    upgrade(url)
    svc = build_services(make_settings(tmp_path, database_url=url))
    svc.sequencer.run_once()  # the first run makes the next two months' partitions
    today = datetime.datetime.now(datetime.UTC)
    y, m = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    start, _end = month_bounds(y, m)
    with svc.engine.connect() as conn:
        parts = set(conn.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                      "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'access_record'"))
                    .scalars())
    assert {"access_record_default", f"access_record_{y:04d}_{m:02d}"} <= parts, parts
    for when, rid in ((now_us(), "now"), (start + 5, "next-month")):
        with svc.engine.begin() as conn:
            svc.audit.append(conn, AuditRecord("read", f"part-{rid}", "10.0.0.1", when, client_id="c",
                                               resources=[f"Patient/{rid}/_history/1"], patients=[rid]))
    with svc.engine.connect() as conn:
        where = dict(conn.execute(text("SELECT a.tableoid::regclass::text, s.target_id FROM access_record a "
                                       "JOIN access_subject s ON s.record_pk = a.pk AND s.param = 'patient'")).all())
    assert where.get(f"access_record_{y:04d}_{m:02d}") == "next-month", where
    assert where.get("access_record_default") == "now", where
    result = verify_audit(svc)
    assert result.ok and result.checked == 2, result
