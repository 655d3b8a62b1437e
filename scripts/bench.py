"""Core benchmark: create, read and history through the HTTP API of a real server.

Starts `fhirserver serve` (gunicorn, SQLite, encryption and audit on) in a temp directory, loads
N synthetic patients with M Observations each through POST (concurrent clients), then measures
read and history latency. Prints figures; it asserts nothing (speed is not a test).

    python scripts/bench.py [--patients 1000] [--observations 20] [--clients 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdata import observation, patient  # noqa: E402
from benchserver import BenchServer  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


_local = threading.local()


class Client:
    """A keep-alive HTTP/1.1 client per thread (http.client: far less client-side CPU than requests,
    which matters when client and server share two cores)."""

    def __init__(self, base: str, token: str) -> None:
        url = urlsplit(base)
        self.path = url.path
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json",
                        "Prefer": "return=minimal"}

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            try:
                self.conn.request(method, self.path + path, body=body, headers=self.headers)
                resp = self.conn.getresponse()
                return resp.status, dict(resp.getheaders()), resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # the server closed an idle keep-alive connection: reconnect once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def client(base: str, token: str) -> Client:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = Client(base, token)
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--observations", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    ap.add_argument("--threads", type=int, default=8, help="threads per worker")
    args = ap.parse_args()

    server = BenchServer(workers=args.workers, threads=args.threads).start()
    try:
        token = server.token()
        base = server.base
        rng = random.Random(42)

        def create(c: Client, rtype: str, body: dict) -> str:
            status, headers, data = c.request("POST", f"/{rtype}", json.dumps(body).encode())
            if status != 201:
                raise RuntimeError(f"create {rtype} failed: {status} {data[:300]!r}")
            return headers["Location"].split("/")[-3]

        def create_patient(i: int) -> tuple[str, list[str]]:
            local = random.Random(i)
            c = client(base, token)
            pid = create(c, "Patient", patient(i, local))
            return pid, [create(c, "Observation", observation(pid, local)) for _ in range(args.observations)]

        total = args.patients * (1 + args.observations)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(create_patient, range(args.patients)))
        elapsed = time.perf_counter() - t0
        print(f"created {total} resources in {elapsed:.1f}s: {total / elapsed:.0f} creates/s "
              f"({args.clients} concurrent clients, gunicorn {server.workers} workers x {server.threads} threads, SQLite, encryption+audit on)")

        ids = [("Patient", p) for p, _ in results] + [("Observation", o) for _, obs in results for o in obs]
        s = requests.Session()
        s.headers.update({"Authorization": f"Bearer {token}"})
        reads = []
        for _ in range(args.reads):
            rtype, rid = rng.choice(ids)
            t = time.perf_counter()
            r = s.get(f"{base}/{rtype}/{rid}")
            reads.append(time.perf_counter() - t)
            assert r.status_code == 200
        hist = []
        for _ in range(min(500, args.reads)):
            rtype, rid = rng.choice(ids)
            t = time.perf_counter()
            r = s.get(f"{base}/{rtype}/{rid}/_history")
            hist.append(time.perf_counter() - t)
            assert r.status_code == 200
        print(f"read    p50 {pct(reads, 50):.2f} ms  p95 {pct(reads, 95):.2f} ms  (n={len(reads)}, sequential)")
        print(f"history p50 {pct(hist, 50):.2f} ms  p95 {pct(hist, 95):.2f} ms  (n={len(hist)})")
        print(f"mean read {statistics.mean(reads) * 1000:.2f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
