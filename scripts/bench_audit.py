"""Audit benchmark (issue 15): write many access records through the real append path
(AuditLog.prepare + append: built, indexed, encrypted, committed in batches), then time the
breach report (`fhirserver audit report`, audit/report.py) for a quiet and a busy client and
for a user. Prints figures; asserts only that the report found the accesses it should.

    python scripts/bench_audit.py --records 1000000
    python scripts/bench_audit.py --records 5000000   # the issue's size (~20 min of writing here)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fhirserver.audit.events import AuditRecord  # noqa: E402
from fhirserver.audit.report import touched_patients  # noqa: E402
from fhirserver.clock import now_us  # noqa: E402
from fhirserver.config import load_settings  # noqa: E402
from fhirserver.db.engine import read_connection  # noqa: E402
from fhirserver.db.migrations import upgrade  # noqa: E402
from fhirserver.services import build_services, warm_keys  # noqa: E402

INTERACTIONS = [("read", 200), ("read", 200), ("read", 200), ("search-type", 200), ("update", 200),
                ("read", 403), ("read", 404)]


def records(n: int, start_us: int, seconds: int, seed: int = 3):  # type: ignore[no-untyped-def]
    """Access records over `seconds`: 200 clients (client-0 busy: 20 %, client-quiet: 0.1 %), 500
    users, 100,000 patients, one or two patients per record."""
    rng = random.Random(seed)
    for i in range(n):
        r = rng.random()
        client = "client-0" if r < 0.2 else "client-quiet" if r < 0.201 else f"client-{rng.randint(1, 199)}"
        interaction, status = rng.choice(INTERACTIONS)
        patients = [f"p{rng.randint(0, 99_999)}" for _ in range(rng.choice((1, 1, 2)))]
        rtype = "Observation" if interaction != "search-type" else "Patient"
        yield AuditRecord(
            interaction=interaction, request_id=f"r{i}", network_address="10.0.0.1",
            recorded_us=start_us + i * seconds * 1_000_000 // max(n, 1), status=status,
            client_id=client, client_name=client, user=f"Practitioner/u{rng.randint(0, 499)}",
            resources=[f"{rtype}/{patients[0]}-o/_history/1"] if status == 200 else [],
            target=f"Observation/{patients[0]}-o" if rtype == "Observation" else None, patients=patients,
            resource_type=rtype, purpose=["TREAT"])


def write(svc, n: int, batch: int) -> float:  # type: ignore[no-untyped-def]
    start = now_us() - 30 * 86_400_000_000  # the last 30 days
    t0 = time.perf_counter()
    pending = []
    done = 0
    for rec in records(n, start, 30 * 86_400):
        pending.append((rec, svc.audit.prepare(rec)))
        if len(pending) == batch:
            with svc.engine.begin() as conn:
                for rec_, p in pending:
                    svc.audit.append(conn, rec_, p)
            done += len(pending)
            pending = []
            if done % (batch * 40) == 0:
                rate = done / (time.perf_counter() - t0)
                print(f"  {done:,} records, {rate:,.0f}/s", flush=True)
    if pending:
        with svc.engine.begin() as conn:
            for rec_, p in pending:
                svc.audit.append(conn, rec_, p)
    return time.perf_counter() - t0


def timed(svc, agent: str, since_us: int, until_us: int, runs: int = 3) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    times = []
    found = []
    for _ in range(runs):
        t = time.perf_counter()
        with read_connection(svc.engine) as conn:
            found = touched_patients(conn, agent, since_us, until_us)
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(found), sum(sum(r.actions.values()) for r in found)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--data-dir", help="keep the data here (default: a temporary directory)")
    args = ap.parse_args()
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fhirbench-audit-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(data_dir=str(data_dir), base_url="http://127.0.0.1/fhir", audit_sequencer=False)
    upgrade(settings.effective_database_url)
    svc = build_services(settings)
    warm_keys(svc)
    seconds = write(svc, args.records, args.batch)
    print(f"wrote {args.records:,} access records in {seconds:.0f} s: {args.records / seconds:,.0f}/s "
          f"[AuditLog.prepare + append: build, index, encrypt, commit per {args.batch:,}; SQLite]")
    with svc.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    now = now_us()
    day = 86_400_000_000
    print("breach report (median of 3, in-process, the query audit/report.py runs):")
    for label, agent, since in (("quiet client (0.1 % of records), 30 days", "Device/client-quiet", now - 31 * day),
                                ("busy client (20 % of records), 30 days", "Device/client-0", now - 31 * day),
                                ("busy client, one day", "Device/client-0", now - 2 * day),
                                ("one user (0.2 % of records), 30 days", "Practitioner/u7", now - 31 * day)):
        median, patients, accesses = timed(svc, agent, since, now)
        assert patients > 0, label
        print(f"  {label:45s} {median * 1000:9.1f} ms  {patients:,} patients, {accesses:,} successful accesses")
    svc.engine.dispose()


if __name__ == "__main__":
    main()
