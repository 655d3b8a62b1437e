"""PATCH work is bounded (issue 29, item 4): the red team's JSON Patch `copy` amplification body
against a real server (gunicorn, one worker, SQLite, encryption + audit on), with the server's own
`/livez` as the floor measured in the same run.

Prints the status, latency (p50/max) and the worker's CPU per request and peak-memory growth.
Target: a 4xx in <= 100 ms and <= 50 MB of growth. `--code DIR` runs another checkout (e.g. the
commit before the fix, with `--copies 16`: 21 copies took 29 s and 1.4 GB there).

    .venv/bin/python scripts/bench_patch.py [--requests 20] [--copies 21]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchserver import BenchServer  # noqa: E402


def worker_pid(master: int) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:
            return int(pid)
    raise SystemExit("no gunicorn worker found")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--copies", type=int, default=21)
    ap.add_argument("--code", help="another checkout to run")
    args = ap.parse_args()
    server = BenchServer(workers=1, threads=1)
    if args.code:
        server.code = Path(args.code)
    server.start()
    try:
        assert server.proc is not None
        pid = worker_pid(server.proc.pid)
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {server.token()}"
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "bench"}}
        oid = s.post(f"{server.base}/Observation", json=obs, headers={"Content-Type": "application/fhir+json"}).json()["id"]
        body = json.dumps([{"op": "add", "path": "/note", "value": [{"text": "C"}]},
                           *[{"op": "copy", "from": "/note", "path": "/note/-"}] * args.copies]).encode()
        root = server.base.rsplit("/fhir", 1)[0]
        livez, patch, statuses = [], [], set()
        peak_before = peak_mb(pid)  # before the first patch: the growth it causes counts
        s.patch(f"{server.base}/Observation/{oid}", data=body, headers={"Content-Type": "application/json-patch+json"})
        cpu_before = cpu_s(pid)
        for _ in range(args.requests):  # interleaved: the floor and the subject see the same machine
            t = time.perf_counter()
            requests.get(f"{root}/livez", timeout=10)
            livez.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = s.patch(f"{server.base}/Observation/{oid}", data=body,
                        headers={"Content-Type": "application/json-patch+json"}, timeout=600)
            patch.append(time.perf_counter() - t)
            statuses.add(r.status_code)
        cpu = (cpu_s(pid) - cpu_before) / args.requests
        print(f"body {len(body)} bytes, {args.copies} copies, {args.requests} requests")
        print(f"  status            : {sorted(statuses)}")
        print(f"  /livez p50        : {1000 * statistics.median(livez):.1f} ms")
        print(f"  PATCH p50 / max   : {1000 * statistics.median(patch):.1f} / {1000 * max(patch):.1f} ms")
        print(f"  worker CPU / req  : {1000 * cpu:.1f} ms (includes the /livez requests)")
        print(f"  worker peak memory: {peak_before:.0f} MB -> {peak_mb(pid):.0f} MB "
              f"(+{peak_mb(pid) - peak_before:.1f} MB)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
