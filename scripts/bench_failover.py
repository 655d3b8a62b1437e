"""Failover benchmark (issue 28): a three-node PostgreSQL cluster under Patroni (synchronous
replication, durable settings; scripts/ensure_ha.sh), `fhirserver serve` on it, 8-client mixed load
(30 % creates, 50 % reads, 20 % searches), and the primary killed (kill -9 of its Patroni and
PostgreSQL) --rounds times; each time the killed node is brought back as a standby before the next.
Prints, per kill and in all: acknowledged creates lost, acknowledged reads without an access
record (RPO), how long clients saw no service (RTO), the failed requests by status, and whether
`fhirserver audit verify` passes at the end.

    python scripts/bench_failover.py [--rounds 5] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.failover import audit_verify, lost_creates, reads_without_record, run_load, serve  # noqa: E402
from tests.support.ha import Cluster, running_cluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--before", type=float, default=5.0, help="seconds of load before each kill")
    ap.add_argument("--after", type=float, default=5.0, help="seconds of load after service is back")
    ap.add_argument("--keep", action="store_true", help="keep the server's data directory and log (path printed)")
    args = ap.parse_args()
    totals: Counter[str] = Counter()
    outages: list[float] = []
    tmp = tempfile.mkdtemp(prefix="fhirbench-failover-")
    try:
        with running_cluster() as cluster:
            _rounds(args, cluster, Path(tmp), totals, outages)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _rounds(args: argparse.Namespace, cluster: Cluster, tmp: Path, totals: Counter[str], outages: list[float]) -> None:
    """The kills, each followed by the checks, then the summary."""
    url = cluster.create_database("failover")
    with serve(tmp, url) as srv:
        made = requests.post(f"{srv.base}/fhir/Patient", data=json.dumps({"resourceType": "Patient"}),
                             headers={**srv.headers, "Content-Type": "application/fhir+json"}, timeout=30)
        patient = made.headers["Location"].split("/Patient/")[1].split("/")[0]
        for n in range(1, args.rounds + 1):
            old = cluster.leader()
            out = run_load(srv, patient, cluster.kill_leader, clients=args.clients, before=args.before,
                           after=args.after)
            lost, unrecorded = lost_creates(srv, out), reads_without_record(srv, out)
            outage = out.outage_seconds()
            outages.append(outage)
            failed = Counter(f[2] for f in out.failures)
            totals.update({"creates": len(out.acked_creates), "reads": len(out.acked_reads), "lost": len(lost),
                           "unrecorded": len(unrecorded)})
            print(f"kill {n}: {old.name} -> {cluster.leader().name}; acknowledged creates {len(out.acked_creates)}, "
                  f"lost {len(lost)}; acknowledged reads+searches {len(out.acked_reads)}, without an access "
                  f"record {len(unrecorded)}; no service for {outage:.1f} s; failed requests "
                  f"{dict(failed)}", flush=True)
            cluster.restart(old)
            cluster.wait_healthy()
        verified = audit_verify(srv).strip()
    print(f"in all: {totals['creates']} acknowledged creates, {totals['lost']} lost; {totals['reads']} acknowledged "
          f"reads+searches, {totals['unrecorded']} without an access record (RPO 0 when both are 0)")
    print(f"time without service per kill (RTO): {', '.join(f'{o:.1f}' for o in outages)} s; "
          f"max {max(outages):.1f} s")
    print(f"audit verify: {verified}")
    errors = Counter(line.split('"frames":')[1][:300] for line in (Path(tmp) / "serve.log").read_text().splitlines()
                     if '"logger":"fhirserver.pipeline"' in line and '"level":"ERROR"' in line and '"frames":' in line)
    for where, count in errors.most_common(5):
        print(f"server errors ({count}): {where}")


if __name__ == "__main__":
    main()
