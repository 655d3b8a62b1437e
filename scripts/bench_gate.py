"""The request path's fixed costs (issue "One access gate"): read, search and `metadata` latency
against the same server's own `/livez` (the floor, measured in the same run, interleaved), the
search against the same query run as raw SQL (compiled by the server's own compiler, no pipeline,
no decryption), and server CPU per audited, encrypted create and per read.

With `--baseline DIR` another checkout (e.g. `git worktree add DIR <commit>`) serves the same
workload in the same run, the two alternating round by round. With `--floor`, the floor of an
audited, encrypted read in this stack (scripts/bench_floor_app.py: two SELECTs, an AES-GCM open
and seal, one durable INSERT, no FHIR) is served by gunicorn with the same workers and threads on
a copy of the database, and measured against its own `/livez` in the same rounds. Prints
figures; asserts nothing.

    .venv/bin/python scripts/bench_gate.py [--rounds 6] [--requests 150] [--baseline /tmp/oldmain] [--floor] [--xml]

With `--xml` the same read and search are also asked for in XML (`_format=xml`), interleaved,
and their latency is reported against the JSON ones (issue 27: XML overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import Client, pct  # noqa: E402
from benchdata import observation, patient  # noqa: E402
from benchserver import BenchServer  # noqa: E402

SEARCH = "Observation?subject=Patient/{pid}&code=http://loinc.org|8867-4"


def server_cpu(server: BenchServer) -> float:
    """CPU seconds (user + system) of the server's master and workers so far."""
    assert server.proc is not None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == server.proc.pid or int(fields[1]) == server.proc.pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Target:
    def __init__(self, name: str, code: Path | None) -> None:
        self.name = name
        self.server = BenchServer(workers=2, threads=4)
        if code is not None:
            self.server.code = code
            self.server.env["PYTHONPATH"] = str(code)
        self.server.start()
        self.token = self.server.token()
        self.root = self.server.base.rsplit("/fhir", 1)[0]
        self.times: dict[str, list[float]] = {k: [] for k in ("livez", "read", "search", "metadata", "raw",
                                                              "read-xml", "search-xml")}
        self.xml = False  # also read and search in XML (`_format=xml`), interleaved with the JSON ones
        self.cpu: dict[str, list[float]] = {"create": [], "read": [], "livez": []}
        self.patients: list[str] = []
        self.observations: list[str] = []

    def client(self) -> Client:
        return Client(self.server.base, self.token)

    def load(self, patients: int, per_patient: int) -> None:
        rng = random.Random(7)
        c = self.client()
        for i in range(patients):
            _s, headers, _b = c.request("POST", "/Patient", json.dumps(patient(i, rng)).encode())
            pid = headers["Location"].split("/Patient/")[1].split("/")[0]
            self.patients.append(pid)
            for _ in range(per_patient):
                obs = observation(pid, rng)
                _s, headers, _b = c.request("POST", "/Observation", json.dumps(obs).encode())
                self.observations.append(headers["Location"].split("/Observation/")[1].split("/")[0])

    def creates(self, n: int) -> None:
        """CPU per audited, encrypted create: n POSTs from 4 clients."""
        rng = random.Random(len(self.observations))
        bodies = [json.dumps(observation(rng.choice(self.patients), rng)).encode() for _ in range(n)]
        before = server_cpu(self.server)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda b: self.client_for().request("POST", "/Observation", b), bodies))
        self.cpu["create"].append((server_cpu(self.server) - before) / n)

    def reads(self, n: int) -> None:
        ids = [random.choice(self.observations) for _ in range(n)]
        before = server_cpu(self.server)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda oid: self.client_for().request("GET", f"/Observation/{oid}"), ids))
        self.cpu["read"].append((server_cpu(self.server) - before) / n)

    def livez_cpu(self, n: int) -> None:
        """The CPU floor: n `/livez` from 4 clients, as the reads are sent (gunicorn, Flask, no FHIR)."""
        from urllib.parse import urlsplit

        url = urlsplit(self.root)
        import http.client
        import threading

        local = threading.local()

        def one(_i: int) -> None:
            if not hasattr(local, "c"):
                local.c = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            local.c.request("GET", "/livez")
            local.c.getresponse().read()

        before = server_cpu(self.server)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(n)))
        self.cpu["livez"].append((server_cpu(self.server) - before) / n)

    def client_for(self) -> Client:
        import threading

        local = self.__dict__.setdefault("_local", threading.local())
        if not hasattr(local, "c"):
            local.c = self.client()
        return local.c  # type: ignore[no-any-return]

    def latencies(self, n: int) -> None:
        """Sequential, one client: the floor and each kind, interleaved request by request, all on
        one keep-alive connection. (The floor on a connection of its own may be accepted by the
        other gunicorn worker, idle between two floor requests and slower to answer: measured,
        /livez p50 1.06 ms there against 0.84 ms on the reads' connection, which flattered every
        ratio to it by about a quarter.)"""
        c = self.client()
        for _ in range(n):
            t = time.perf_counter()
            c.conn.request("GET", "/livez")
            floor = c.conn.getresponse()
            floor.read()
            self.times["livez"].append(time.perf_counter() - t)
            assert floor.status == 200, floor.status
            oid, pid = random.choice(self.observations), random.choice(self.patients)
            kinds = [("read", f"/Observation/{oid}"), ("search", "/" + SEARCH.format(pid=pid)), ("metadata", "/metadata")]
            if self.xml:  # the same resource and query again, answered in XML
                kinds += [("read-xml", f"/Observation/{oid}?_format=xml"),
                          ("search-xml", "/" + SEARCH.format(pid=pid) + "&_format=xml")]
            for kind, path in kinds:
                t = time.perf_counter()
                status, _h, _b = c.request("GET", path)
                self.times[kind].append(time.perf_counter() - t)
                assert status == 200, (kind, status)

    def raw_sql(self, n: int) -> None:
        """The search as the server's compiler writes it, run directly on the database."""
        from fhirserver.config import load_settings
        from fhirserver.db.engine import read_connection
        from fhirserver.search.executor import run_search
        from fhirserver.search.parser import parse_search
        from fhirserver.services import build_services

        if not hasattr(self, "_svc"):
            self._svc = build_services(load_settings(data_dir=str(self.server.data_dir), base_url=self.server.base))
        svc = self._svc
        for _ in range(n):
            query = [("subject", f"Patient/{random.choice(self.patients)}"), ("code", "http://loinc.org|8867-4")]
            t = time.perf_counter()
            with read_connection(svc.engine) as conn:
                parsed = parse_search(svc.params, "Observation", query, 20, 1000, False)
                run_search(conn, parsed, svc.compiler, [], None)
            self.times["raw"].append(time.perf_counter() - t)

    def stop(self) -> None:
        self.server.stop()


class Floor:
    """scripts/bench_floor_app.py under gunicorn (same workers and threads as the server) on a
    copy of `source`'s database."""

    def __init__(self, source: Target) -> None:
        import shutil
        import sqlite3
        import subprocess

        from benchserver import free_port

        db = source.server.data_dir / "floor.sqlite3"
        src = sqlite3.connect(source.server.data_dir / "fhirserver.sqlite3")
        dst = sqlite3.connect(db)
        src.backup(dst)
        src.close()
        dst.close()
        self.ids = source.observations
        self.port = free_port()
        gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
        assert gunicorn is not None
        self.proc = subprocess.Popen(
            [gunicorn, "-w", str(source.server.workers), "--threads", str(source.server.threads), "-b",
             f"127.0.0.1:{self.port}", "--chdir", str(Path(__file__).resolve().parent), "bench_floor_app:app"],
            env={**os.environ, "FLOOR_DB": str(db)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.times: dict[str, list[float]] = {"livez": [], "floor": []}
        time.sleep(3)

    def latencies(self, n: int) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Authorization": "Bearer " + "0" * 64}
        for _ in range(n):
            for kind, path in (("livez", "/livez"), ("floor", f"/floor/{random.choice(self.ids)}")):
                t = time.perf_counter()
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                self.times[kind].append(time.perf_counter() - t)
                assert resp.status == 200, (kind, resp.status)

    def report(self) -> list[str]:
        livez, floor = pct(self.times["livez"], 50), pct(self.times["floor"], 50)
        return ["floor (bench_floor_app: 2 SELECTs, AES-GCM open + seal, 1 durable INSERT; no FHIR):",
                f"  /livez      p50 {livez:6.2f} ms",
                f"  floor read  p50 {floor:6.2f} ms  = {floor / livez:4.2f} x its livez p50"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def report(t: Target) -> list[str]:
    def p(kind: str, q: float) -> float:
        return pct(t.times[kind], q)

    livez50, livez95 = p("livez", 50), p("livez", 95)
    lines = [f"{t.name}:",
             f"  /livez      p50 {livez50:6.2f} ms  p95 {livez95:6.2f} ms",
             f"  read        p50 {p('read', 50):6.2f} ms  = {p('read', 50) / livez50:4.2f} x livez p50",
             f"  search      p95 {p('search', 95):6.2f} ms  = {p('search', 95) / (livez95 + p('raw', 95)):4.2f} x "
             f"(livez p95 + raw SQL p95 {p('raw', 95):.2f} ms)",
             f"  metadata    p95 {p('metadata', 95):6.2f} ms  = {p('metadata', 95) / livez95:4.2f} x livez p95",
             f"  CPU/create      {1000 * statistics.median(t.cpu['create']):6.2f} ms (median of rounds)",
             f"  CPU/read        {1000 * statistics.median(t.cpu['read']):6.2f} ms (median of rounds)",
             f"  CPU/livez       {1000 * statistics.median(t.cpu['livez']):6.2f} ms (the floor: gunicorn + Flask)"]
    if t.xml:
        for kind in ("read", "search"):
            j50, j95, x50, x95 = p(kind, 50), p(kind, 95), p(f"{kind}-xml", 50), p(f"{kind}-xml", 95)
            lines.append(f"  {kind:6s} JSON p50/p95 {j50:5.2f}/{j95:5.2f} ms, XML {x50:5.2f}/{x95:5.2f} ms = "
                         f"{x50 / j50:4.2f}x / {x95 / j95:4.2f}x")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=150, help="sequential requests of each kind per round")
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--observations", type=int, default=10)
    ap.add_argument("--baseline", type=Path, help="another checkout, measured alternately in the same run")
    ap.add_argument("--floor", action="store_true", help="also measure the stack's floor for an audited read")
    ap.add_argument("--xml", action="store_true", help="also read and search in XML (this checkout only)")
    args = ap.parse_args()
    targets = [Target("this checkout", None)]
    targets[0].xml = args.xml
    if args.baseline:
        targets.append(Target(f"baseline {args.baseline}", args.baseline))
    floor: Floor | None = None
    try:
        for t in targets:
            t.load(args.patients, args.observations)
        if args.floor:
            floor = Floor(targets[0])
        time.sleep(2)
        for r in range(args.rounds):
            for t in (targets if r % 2 == 0 else targets[::-1]):
                t.latencies(args.requests)
                if floor is not None and t is targets[0]:
                    floor.latencies(args.requests)
                t.raw_sql(args.requests // 3)
                t.creates(200)
                t.reads(400)
                t.livez_cpu(400)
        print(f"{os.cpu_count()} CPUs, {args.rounds} rounds x {args.requests} sequential requests per kind")
        for t in targets:
            print("\n".join(report(t)))
        if floor is not None:
            print("\n".join(floor.report()))
    finally:
        for t in targets:
            t.stop()
        if floor is not None:
            floor.stop()


if __name__ == "__main__":
    main()
