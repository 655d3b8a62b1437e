"""Read-replica benchmark (issue 28): a three-node Patroni cluster (scripts/ensure_ha.sh), and
`fhirserver serve` on it without and with FHIRSERVER_READ_REPLICA_URLS naming the asynchronous
replica, alternating round by round under the same 8-client mixed load (30 % creates, 50 % reads,
20 % searches). Prints requests/s, the share of GET requests a replica served (the server's
fhirserver_read_snapshots_total), and the primary's PostgreSQL CPU per request (its postmaster
and backends, from /proc), same run.

    python scripts/bench_replicas.py [--rounds 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.failover import run_load, serve  # noqa: E402
from tests.support.ha import Node, running_cluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def node_cpu(node: Node) -> float:
    """CPU seconds used so far by the node's postmaster and every process below it."""
    root = int((node.data / "postmaster.pid").read_text().split()[0])
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICK
    mine = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return sum(cpu.get(pid, 0.0) for pid in mine)


def snapshots(base: str) -> dict[str, float]:
    text = requests.get(f"{base}/metrics", timeout=30).text
    return {m[0]: float(m[1]) for m in re.findall(r'fhirserver_read_snapshots_total\{node="(\w+)"\} ([0-9.e+]+)', text)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    with running_cluster() as cluster:
        url = cluster.create_database("replicas")
        replica = next(n for n in cluster.nodes if n.name == next(m["name"] for m in cluster.members()
                                                                  if m["role"] == "replica"))
        replica_url = f"postgresql+psycopg://postgres@127.0.0.1:{replica.pg_port}/replicas"
        root = Path(tempfile.mkdtemp(prefix="fhirbench-replicas-"))
        patient = ""
        results: dict[str, list[tuple[float, float, float]]] = {"without": [], "with": []}
        for n in range(args.rounds):
            for label in ("without", "with"):
                extra = {"FHIRSERVER_READ_REPLICA_URLS": replica_url} if label == "with" else {}
                with serve(root, url, **extra) as srv:
                    if not patient:
                        made = requests.post(f"{srv.base}/fhir/Patient", data=json.dumps({"resourceType": "Patient"}),
                                             headers={**srv.headers, "Content-Type": "application/fhir+json"},
                                             timeout=30)
                        patient = made.headers["Location"].split("/Patient/")[1].split("/")[0]
                    primary = cluster.leader()
                    cpu0, t0 = node_cpu(primary), time.time()
                    out = run_load(srv, patient, lambda: None, clients=args.clients, before=args.seconds, after=0)
                    cpu1, t1 = node_cpu(primary), time.time()
                    done = len(out.successes)
                    snaps = snapshots(srv.base)
                    share = snaps.get("replica", 0) / max(1.0, snaps.get("replica", 0) + snaps.get("primary", 0))
                    results[label].append((done / (t1 - t0), (cpu1 - cpu0) * 1000 / max(1, done), share))
                    print(f"round {n + 1} {label:7s} replica: {done / (t1 - t0):6.1f} requests/s, primary PostgreSQL "
                          f"CPU {(cpu1 - cpu0) * 1000 / max(1, done):.2f} ms per request, GETs served by the replica "
                          f"{100 * share:.0f}% (failed: {dict(Counter(f[2] for f in out.failures))})", flush=True)
        for label, rows in results.items():
            rate = sum(r[0] for r in rows) / len(rows)
            cpu = sum(r[1] for r in rows) / len(rows)
            share = sum(r[2] for r in rows) / len(rows)
            print(f"{label:7s} replica: {rate:.1f} requests/s, primary CPU {cpu:.2f} ms/request, "
                  f"GETs on the replica {100 * share:.0f}% (= {0.7 * 100 * share:.0f}% of all requests)")


if __name__ == "__main__":
    main()
