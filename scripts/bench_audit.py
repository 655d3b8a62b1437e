"""Audit benchmark (issue 15): write many access records through the real append path
(AuditLog.prepare + append: built, indexed, encrypted, committed in batches), sequence them (the
Merkle tree and the hourly roll-up, as the server's sequencer does), then time

- the breach report (`fhirserver audit report`, audit/report.py) for a quiet and a busy client,
  a user, and per patient;
- snooping detection over one day (`fhirserver audit snoop`, oversight/snooping.py): the first
  run (which also computes the 28 baseline days' per-agent hours) and a day after that (the
  steady state: the previous days are done).

Prints figures; asserts only that the report found the accesses it should.

    python scripts/bench_audit.py --records 1000000
    python scripts/bench_audit.py --records 5000000   # the issue's size
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
from fhirserver.audit.report import accessors, touched_patients  # noqa: E402
from fhirserver.clock import now_us  # noqa: E402
from fhirserver.config import load_settings  # noqa: E402
from fhirserver.db.engine import read_connection  # noqa: E402
from fhirserver.db.migrations import upgrade  # noqa: E402
from fhirserver.oversight.snooping import DAY_US, SnoopRules, detect  # noqa: E402
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
            if agent.startswith("Patient/"):
                found = accessors(conn, agent.split("/")[1], since_us, until_us)
            else:
                found = touched_patients(conn, agent, since_us, until_us)
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(found), sum(sum(r.actions.values()) for r in found)


def busiest(svc, now: int) -> str:  # type: ignore[no-untyped-def]
    """The patient the busy client touched most (one that certainly has accessors)."""
    with read_connection(svc.engine) as conn:
        return touched_patients(conn, "Device/client-0", now - 2 * 86_400_000_000, now)[0].who


def sequence(svc) -> float:  # type: ignore[no-untyped-def]
    """The sequencer's work for everything written: Merkle tree and hourly roll-up."""
    t0 = time.perf_counter()
    while True:
        done = svc.sequencer.run_once(checkpoint=False)
        if done is None or (done.sequenced == 0 and done.rolled_up == 0):
            return time.perf_counter() - t0


def snoop(svc, day: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    with svc.engine.begin() as conn:
        findings = detect(conn, day, SnoopRules.from_settings(svc.settings), svc.repo, svc.blind)
    return time.perf_counter() - t, len(findings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--data-dir", help="keep the data here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="the data dir already holds the records: do not write more")
    args = ap.parse_args()
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fhirbench-audit-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(data_dir=str(data_dir), base_url="http://127.0.0.1/fhir", audit_sequencer=False)
    upgrade(settings.effective_database_url)
    svc = build_services(settings)
    warm_keys(svc)
    if not args.reuse:
        seconds = write(svc, args.records, args.batch)
        print(f"wrote {args.records:,} access records in {seconds:.0f} s: {args.records / seconds:,.0f}/s "
              f"[AuditLog.prepare + append: build, index, encrypt, commit per {args.batch:,}; SQLite]")
    if args.reuse:  # snooping's derived state from an earlier run goes, so its first run is measured again
        with svc.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM job_run")
            conn.exec_driver_sql("DELETE FROM access_agent_hour")
    seconds = sequence(svc)
    if not args.reuse:
        print(f"sequenced {args.records:,} records in {seconds:.0f} s: {args.records / seconds:,.0f}/s "
              "[Merkle tree + hourly roll-up, batches of 5,000]")
    with svc.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    now = now_us()
    day = 86_400_000_000
    print("breach report (median of 3, in-process, the query audit/report.py runs):")
    for label, agent, since in (("quiet client (0.1 % of records), 30 days", "Device/client-quiet", now - 31 * day),
                                ("busy client (20 % of records), 30 days", "Device/client-0", now - 31 * day),
                                ("busy client, one day", "Device/client-0", now - 2 * day),
                                ("one user (0.2 % of records), 30 days", "Practitioner/u7", now - 31 * day),
                                ("one patient, every accessor, 30 days", f"Patient/{busiest(svc, now)}", now - 31 * day)):
        median, patients, accesses = timed(svc, agent, since, now)
        assert patients > 0, label
        print(f"  {label:45s} {median * 1000:9.1f} ms  {patients:,} rows, {accesses:,} successful accesses")
    yesterday = (now // DAY_US - 1) * DAY_US
    first, found = snoop(svc, yesterday - DAY_US)
    print(f"snooping detection over one day ({args.records // 30:,} records a day): first run {first:.1f} s "
          f"(incl. the per-agent hours of its 28 baseline days), {found} findings [uniformly random synthetic "
          "traffic: the count means nothing, the time does]")
    steady, found = snoop(svc, yesterday)
    print(f"  the next day (baseline days already done): {steady:.1f} s, {found} findings")
    svc.engine.dispose()


if __name__ == "__main__":
    main()
