"""Production benchmark (issue "Production at scale"): the mixed workload -- 30% creates, 50%
reads, 20% searches, 8 concurrent clients -- against

  (a) SQLite, one instance;
  (b) PostgreSQL with its default durable settings (fsync, synchronous commit), one instance;
  (c) the same PostgreSQL, two instances (each with its own data directory, sharing the keys);

for this checkout and, with --baseline DIR, for another checkout (e.g. `git worktree add DIR
<commit>`), the two run alternately configuration by configuration on the same machine. Prints
requests/s, p50/p95 per kind, the server's own /healthz p50 measured during the same load (the
floor), the share of active PostgreSQL backends waiting on a lock (sampled from
pg_stat_activity every 50 ms), and the rows written per audited read (pg_stat_user_tables).
Asserts nothing: speed is not a test.

    python scripts/bench_production.py [--seconds 20] [--clients 8] [--baseline /tmp/basewt]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import Client, pct  # noqa: E402
from benchserver import BenchServer  # noqa: E402

from tests.support.pg import ThrowawayPostgres  # noqa: E402

KINDS = ("create", "read", "search")
WEIGHTS = (30, 50, 20)
FAMILIES = [f"Prodbench{c}" for c in "ABCDEFGHIJKLMNOP"]


def patient(n: int) -> bytes:
    return json.dumps({"resourceType": "Patient", "name": [{"family": FAMILIES[n % len(FAMILIES)], "given": [f"G{n}"]}],
                       "gender": "female", "birthDate": f"19{50 + n % 50}-0{1 + n % 9}-1{n % 9}"}).encode()


def start_servers(code: Path | None, database_url: str, n: int) -> list[BenchServer]:
    """n instances of the checkout at `code` (None: this one) on one database."""
    shared = {"FHIRSERVER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
              "FHIRSERVER_AUDIT_SIGNING_KEY_FILE": str(Path(tempfile.mkdtemp(prefix="fhirbench-keys-")) / "sig.pem")}
    servers = []
    for _ in range(n):
        s = BenchServer(workers=2, threads=4, database_url=database_url)
        s.env.update(shared)
        if code is not None:
            s.env["PYTHONPATH"] = str(code)
            s.code = code
        servers.append(s)
    servers[0].start()  # migrates and registers the client
    for s in servers[1:]:
        s.key, s.client_id = servers[0].key, servers[0].client_id
        s.start_only()
        time.sleep(6)  # its workers compile the JSON schema validators (off the clock)
    return servers


class LockSampler(threading.Thread):
    """Share of active backends (other than itself) waiting on a lock, sampled every 50 ms."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True)
        import psycopg

        self.conn = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        self.active = self.waiting = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            rows = self.conn.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
                "AND datname = current_database()").fetchall()
            self.active += len(rows)
            self.waiting += sum(1 for (w,) in rows if w == "Lock")

    def share(self) -> float:
        return self.waiting / self.active if self.active else 0.0


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) so far of the fhirserver server processes and of PostgreSQL's."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"server": 0.0, "postgres": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used = (int(fields[11]) + int(fields[12])) / tick
        if b"fhirserver serve" in cmd:
            out["server"] += used
        elif cmd.startswith(b"postgres"):
            out["postgres"] += used
    return out


def rows_written(database_url: str) -> int:
    import psycopg

    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(conn.execute("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) "
                                "FROM pg_stat_user_tables").fetchone()[0])


def run_load(servers: list[BenchServer], seconds: float, clients: int, seed_ids: list[str]) -> dict[str, object]:
    tokens = [s.token() for s in servers]
    latencies: dict[str, list[float]] = {k: [] for k in (*KINDS, "healthz")}
    ids = list(seed_ids)
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    errors = [0]

    def client(n: int) -> None:
        server = servers[n % len(servers)]
        c = Client(server.base, tokens[n % len(servers)])
        rnd = random.Random(n)
        i = 0
        while time.monotonic() < stop_at:
            kind = rnd.choices(KINDS, WEIGHTS)[0]
            started = time.perf_counter()
            if kind == "create":
                status, headers, _ = c.request("POST", "/Patient", patient(rnd.randrange(10**6)))
                if status == 201:
                    with lock:
                        ids.append(headers["Location"].split("/Patient/")[1].split("/")[0])
            elif kind == "read":
                status, _, _ = c.request("GET", f"/Patient/{rnd.choice(ids)}")
            else:
                status, _, _ = c.request("GET", f"/Patient?family={FAMILIES[i % len(FAMILIES)]}&_count=10")
            elapsed = time.perf_counter() - started
            with lock:
                if status >= 400:
                    errors[0] += 1
                latencies[kind].append(elapsed)
            i += 1

    def healthz() -> None:
        import http.client

        conns = [http.client.HTTPConnection("127.0.0.1", s.port, timeout=30) for s in servers]
        i = 0
        while time.monotonic() < stop_at:
            conn = conns[i % len(conns)]
            started = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            latencies["healthz"].append(time.perf_counter() - started)
            i += 1
            time.sleep(0.02)

    cpu_before = cpu_seconds()
    started = time.monotonic()
    with ThreadPoolExecutor(clients + 1) as pool:
        futures = [pool.submit(client, n) for n in range(clients)] + [pool.submit(healthz)]
        for f in futures:
            f.result()
    wall = time.monotonic() - started
    cpu_after = cpu_seconds()
    done = sum(len(latencies[k]) for k in KINDS)
    cpu = {k: 1000 * (cpu_after[k] - cpu_before[k]) / done for k in cpu_after}
    return {"rps": done / wall, "errors": errors[0], "latencies": latencies, "ids": ids, "cpu": cpu}


def light_latency(server: BenchServer, ids: list[str], n: int = 300) -> tuple[float, float]:
    """p50 of a read and of /healthz with one client, interleaved (no queueing), on one keep-alive
    connection (one worker: the floor on a connection of its own may meet the other, idle one):
    what a read costs above the server's own floor."""
    c = Client(server.base, server.token())
    reads, floors = [], []
    for i in range(n):
        started = time.perf_counter()
        c.request("GET", f"/Patient/{ids[i % len(ids)]}")
        reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        c.conn.request("GET", "/healthz")
        c.conn.getresponse().read()
        floors.append(time.perf_counter() - started)
    return pct(reads, 50), pct(floors, 50)


def audited_read_rows(servers: list[BenchServer], database_url: str, ids: list[str], n: int = 200) -> float:
    """Rows inserted/updated/deleted in the database per read, sequencing included."""
    c = Client(servers[0].base, servers[0].token())
    time.sleep(2)  # the previous load's records are sequenced
    before = rows_written(database_url)
    for i in range(n):
        c.request("GET", f"/Patient/{ids[i % len(ids)]}")
    time.sleep(2)  # ...and these (the sequencer runs every 0.5 s)
    return (rows_written(database_url) - before) / n


def one_config(label: str, code: Path | None, pg: ThrowawayPostgres | None, instances: int, seconds: float,
               clients: int) -> dict[str, object]:
    url = pg.create_database(f"bench_{int(time.time() * 1000) % 10**9}") if pg else ""
    servers = start_servers(code, url, instances)
    try:
        seed = Client(servers[0].base, servers[0].token())
        seed_ids = []
        for n in range(200):
            _, headers, _ = seed.request("POST", "/Patient", patient(n))
            seed_ids.append(headers["Location"].split("/Patient/")[1].split("/")[0])
        sampler = LockSampler(url) if pg else None
        if sampler:
            sampler.start()
        result = run_load(servers, seconds, clients, seed_ids)
        result["light"] = light_latency(servers[0], seed_ids)
        if sampler:
            sampler.stop.set()
            sampler.join()
            result["lock_share"] = sampler.share()
            result["rows_per_read"] = audited_read_rows(servers, url, result["ids"])  # type: ignore[arg-type]
        result["label"] = label
        return result
    finally:
        for s in servers:
            s.stop()


def report(r: dict[str, object]) -> str:
    lat: dict[str, list[float]] = r["latencies"]  # type: ignore[assignment]
    cpu: dict[str, float] = r["cpu"]  # type: ignore[assignment]
    parts = [f"{r['label']:<34} {r['rps']:7.1f} req/s  errors {r['errors']}  CPU/request: server "
             f"{cpu['server']:.2f} ms, PostgreSQL {cpu['postgres']:.2f} ms"]
    for k in KINDS:
        parts.append(f"{k} p50 {pct(lat[k], 50):6.1f} p95 {pct(lat[k], 95):6.1f} ms")
    hz = pct(lat["healthz"], 50)
    parts.append(f"under load: healthz p50 {hz:5.1f} ms (read/healthz {pct(lat['read'], 50) / hz:4.1f}x)")
    read1, hz1 = r["light"]  # type: ignore[misc]
    parts.append(f"one client: read p50 {read1:5.2f} ms, healthz p50 {hz1:5.2f} ms (read/healthz {read1 / hz1:4.1f}x)")
    if "lock_share" in r:
        parts.append(f"lock-wait share {100 * float(r['lock_share']):4.1f}%  rows/audited read "  # type: ignore[arg-type]
                     f"{float(r['rows_per_read']):5.1f}")  # type: ignore[arg-type]
    return "\n    ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--baseline", type=Path, help="another checkout to compare (its code serves alternately)")
    ap.add_argument("--only", choices=("sqlite", "pg1", "pg2"), action="append")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --baseline: run the pair this many times, the order reversed every other round "
                         "(a later run on the same cluster pays for the earlier one's autovacuum)")
    args = ap.parse_args()
    pg = ThrowawayPostgres()
    pg.start(durable=True)
    codes: list[tuple[str, Path | None]] = [("this checkout", None)]
    if args.baseline:
        codes.insert(0, ("baseline", args.baseline.resolve()))
    configs = [("sqlite", "SQLite, 1 instance", None, 1), ("pg1", "PostgreSQL durable, 1 instance", pg, 1),
               ("pg2", "PostgreSQL durable, 2 instances", pg, 2)]
    print(f"{args.clients} clients, {args.seconds:.0f} s per run, mix create/read/search = 30/50/20, "
          f"{os.cpu_count()} CPUs", flush=True)
    try:
        for key, name, db, n in configs:
            if args.only and key not in args.only:
                continue
            for rnd in range(args.rounds):
                for code_label, code in (codes if rnd % 2 == 0 else codes[::-1]):
                    r = one_config(f"{name} ({code_label}, round {rnd + 1})", code, db, n, args.seconds, args.clients)
                    print(report(r), flush=True)
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
