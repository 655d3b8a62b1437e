"""Subscriptions under load (issue 26): with N active subscriptions (each for its own patient, the
`new-result` topic, id-only, a real receiving HTTP server on loopback), paced writes of
Observations spread over those patients; reports

- write throughput with subscriptions vs a second server without any, same run, interleaved rounds
  (the outbox row and the dispatcher's work are what subscriptions cost a writer);
- write-to-delivery latency (the 201's arrival to the notification's arrival), p50/p95/max;
- events delivered vs writes (nothing lost);
- with --outage SECONDS: the receiver answers 503 for that long while writes go on, then comes
  back; how long until everything arrived, whether each subscription's events came in order, and
  whether any number was missing.

    python scripts/bench_subscriptions.py --subscriptions 100 --rate 50 --seconds 20
    python scripts/bench_subscriptions.py --subscriptions 10 --rate 5 --seconds 30 --outage 600 --rounds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchserver import BenchServer  # noqa: E402

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
FHIR = {"Content-Type": "application/fhir+json"}


class Receiver:
    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}  # Observation id -> arrival time
        self.events = 0
        self.down = False
        self.numbers: dict[str, list[int]] = {}  # subscription -> event numbers, as received
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if outer.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                now = time.perf_counter()
                with lock:
                    params = body["entry"][0]["resource"]["parameter"]
                    sub = next(p["valueReference"]["reference"] for p in params if p["name"] == "subscription")
                    for p in params:
                        if p["name"] == "notification-event":
                            outer.numbers.setdefault(sub, []).extend(
                                int(q["valueString"]) for q in p["part"] if q["name"] == "event-number")
                    for p in params:
                        if p["name"] == "notification-event":
                            outer.events += 1
                            for q in p["part"]:
                                if q["name"] == "focus":
                                    outer.arrived.setdefault(q["valueReference"]["reference"].rsplit("/", 1)[1], now)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default 5 refuses connections when 16 senders arrive at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (gunicorn's master and workers)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def setup(server: BenchServer, receiver: Receiver, subscriptions: int) -> list[str]:
    jwks = server.data_dir / "bench-jwks.json"
    server.client_id = server.cli("client", "register", "--name", "subscriber", "--jwks-file", str(jwks), "--scopes",
                                  "system/*.cruds", "--subscription-endpoint", receiver.url)
    h = {"Authorization": f"Bearer {server.token()}", **FHIR}
    patients = []
    for i in range(max(subscriptions, 20)):
        r = requests.post(f"{server.base}/Patient", json={"resourceType": "Patient", "name": [{"family": f"S{i}"}]},
                          headers=h, timeout=30)
        patients.append(r.json()["id"])
    for pid in patients[:subscriptions]:
        sub = {"resourceType": "Subscription", "status": "requested", "reason": "bench",
               "criteria": "http://fhirserver.dev/SubscriptionTopic/new-result",
               "_criteria": {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                            "valueString": f"Observation?patient=Patient/{pid}"}]},
               "channel": {"type": "rest-hook", "endpoint": receiver.url, "payload": "application/fhir+json",
                           "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content",
                                                       "valueCode": "id-only"}]}}}
        r = requests.post(f"{server.base}/Subscription", json=sub, headers=h, timeout=30)
        r.raise_for_status()
    return patients


def write_round(server: BenchServer, patients: list[str], rate: float, seconds: float,
                sent: dict[str, float] | None, took: list[float] | None = None) -> float:
    """Paced writes (rate per second) for `seconds`; returns achieved writes per second (each
    write's response time in ms appended to `took`)."""
    h = {"Authorization": f"Bearer {server.token()}", **FHIR}
    n = int(rate * seconds)
    session = requests.Session()

    def one(i: int) -> None:
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        body = {"resourceType": "Observation", "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "laboratory"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                "subject": {"reference": f"Patient/{patients[i % len(patients)]}"},
                "valueQuantity": {"value": i, "unit": "mg/dL"}}
        t0 = time.perf_counter()
        r = session.post(f"{server.base}/Observation", json=body, headers=h, timeout=60)
        r.raise_for_status()
        if took is not None:
            took.append((time.perf_counter() - t0) * 1000)
        if sent is not None:
            sent[r.json()["id"]] = time.perf_counter()

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscriptions", type=int, default=100)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pg", action="store_true", help="a throwaway PostgreSQL with durable settings (fsync, "
                                                       "synchronous commit) for both servers, instead of SQLite")
    ap.add_argument("--outage", type=float, default=0.0, help="seconds the receiver is down during the paced run")
    args = ap.parse_args()
    pg = None
    urls = ["", ""]
    if args.pg:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.support.pg import ThrowawayPostgres

        pg = ThrowawayPostgres()
        pg.start(durable=True)
        urls = [pg.create_database(f"subs_{i}_{int(time.time())}") for i in (1, 2)]
    receiver = Receiver()
    env = {"FHIRSERVER_SUBSCRIPTION_ALLOW_HTTP_LOOPBACK": "1"}
    with_subs_retry_max = 600.0  # the default subscription_retry_max_seconds: the longest wait after an outage
    with_subs = BenchServer(database_url=urls[0])
    without = BenchServer(database_url=urls[1])
    for s in (with_subs, without):
        s.env.update(env)
        s.start()
    try:
        patients = setup(with_subs, receiver, args.subscriptions)
        plain = setup(without, receiver, 0)
        time.sleep(2)  # handshakes
        sent: dict[str, float] = {}
        rates: dict[str, list[float]] = {"with": [], "without": []}
        unpaced, burst = 1000.0, 0.6  # throughput: 600 writes per round, as fast as 16 writers go
        unpaced_writes = [0]
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.rounds):  # each round: a fixed number of writes, as fast as they go
            for label, server, pats in (("without", without, plain), ("with", with_subs, patients)):
                assert server.proc is not None
                before_cpu = tree_cpu(server.proc.pid)
                rates[label].append(write_round(server, pats, unpaced, burst, None))
                if label == "with":
                    unpaced_writes[0] += int(unpaced * burst)
                    while receiver.events < unpaced_writes[0]:  # its notifications are part of its cost
                        time.sleep(0.05)
                cpu[label].append((tree_cpu(server.proc.pid) - before_cpu) * 1000 / (unpaced * burst))
        drain_from = time.perf_counter()
        while receiver.events < unpaced_writes[0] and time.perf_counter() - drain_from < 300:
            time.sleep(0.2)  # the unpaced rounds' notifications first: the paced run starts from an empty queue
        print(f"unpaced rounds' {unpaced_writes[0]} notifications drained "
              f"{time.perf_counter() - drain_from:.1f} s after their last write")
        before = receiver.events
        if args.outage:
            receiver.down = True
            up_at = time.time() + args.outage
            up_perf = time.perf_counter() + args.outage
            threading.Timer(args.outage, lambda: setattr(receiver, "down", False)).start()
        paced: dict[str, tuple[float, list[float]]] = {}
        if not args.outage:  # the same paced load on the server without subscriptions first
            took: list[float] = []
            paced["without"] = (write_round(without, plain, args.rate, args.seconds, None, took), took)
        took = []
        paced["with"] = (write_round(with_subs, patients[:args.subscriptions], args.rate, args.seconds, sent, took),
                         took)
        if args.outage:
            while time.time() < up_at:
                write_round(with_subs, patients[:args.subscriptions], args.rate, min(5.0, up_at - time.time() + 0.1),
                            sent)  # writes go on through the outage
        deadline = time.time() + 120 + (with_subs_retry_max if args.outage else 0)
        while time.time() < deadline and not all(oid in receiver.arrived for oid in sent):
            time.sleep(0.2)
        lat = sorted((receiver.arrived[o] - t) * 1000 for o, t in sent.items() if o in receiver.arrived)
        missing = [o for o in sent if o not in receiver.arrived]
        if missing:
            print(f"not arrived ({len(missing)}): {missing[:5]}; waited {time.time() - deadline + 120:.0f} s")
            if not args.pg:
                import sqlite3
                db = sqlite3.connect(with_subs.data_dir / "fhirserver.sqlite3")
                for oid in missing[:5]:
                    rows = db.execute("SELECT s.id, e.number FROM subscription_event e JOIN subscription_state s "
                                      "ON s.resource_pk = e.subscription_pk WHERE e.id = ?", (oid,)).fetchall()
                    for sid, number in rows:
                        got = receiver.numbers.get(f"{with_subs.base}/Subscription/{sid}", [])
                        print(f"  {oid}: Subscription/{sid} event {number}; receiver has that number: {number in got}"
                              f" (its numbers {sorted(got)[-5:]})")
        p95 = lat[int(len(lat) * 0.95) - 1] if lat else float("nan")
        print(f"{'PostgreSQL (durable)' if args.pg else 'SQLite'}; subscriptions {args.subscriptions}, paced writes {args.rate:.0f}/s for {args.seconds:.0f} s "
              f"({len(sent)} writes)")
        print(f"delivered {len(lat)}/{len(sent)} paced writes' notifications; events received in total "
              f"{receiver.events} ({receiver.events - before} during the paced run)")
        if args.outage:
            drained = max(receiver.arrived.values()) - up_perf
            in_order = all(nums == sorted(nums) for nums in receiver.numbers.values())
            gaps = sum(len(set(range(1, max(n) + 1)) - set(n)) for n in receiver.numbers.values() if n)
            print(f"outage {args.outage:.0f} s: everything arrived {drained:.1f} s after the receiver came back; "
                  f"in order per subscription: {in_order}; missing numbers: {gaps}")
        else:
            print(f"write-to-delivery latency ms: p50 {statistics.median(lat):.0f}  p95 {p95:.0f}  max {lat[-1]:.0f}")
            for label, (rate, took) in paced.items():
                took.sort()
                print(f"paced {args.rate:.0f}/s, {label} subscriptions: achieved {rate:.1f} writes/s; write response "
                      f"p50 {statistics.median(took):.1f} ms, p95 {took[int(len(took) * 0.95) - 1]:.1f} ms")
            if len(paced) == 2:
                print(f"paced write throughput with / without subscriptions: "
                      f"{100 * paced['with'][0] / paced['without'][0]:.0f}%")
        dupes = receiver.events - sum(len(set(n)) for n in receiver.numbers.values())
        listed = json.loads(with_subs.cli("subscription", "list", "--json"))
        errors = sorted({str(r["last_error"]) for r in listed if r["last_error"]})
        print(f"events received more than once (at-least-once resends): {dupes}; subscriptions with a failed "
              f"attempt now: {sum(1 for r in listed if r['attempts'])} {errors[:3]}; numbered "
              f"{sum(r['events'] for r in listed)}, withheld {sum(r['withheld'] for r in listed)}")
        counted = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                   for line in requests.get(f"http://127.0.0.1:{with_subs.port}/metrics", timeout=30).text.splitlines()
                   if line.startswith("fhirserver_subscription_notifications_total{")}
        print("dispatcher counters: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(counted.items())))
        if rates["with"]:
            w, wo = statistics.median(rates["with"]), statistics.median(rates["without"])
            print(f"unpaced write throughput (16 writers, median of {args.rounds} interleaved rounds): "
                  f"with subscriptions {w:.0f}/s, without {wo:.0f}/s -> {100 * w / wo:.0f}%")
            cw, cwo = statistics.median(cpu["with"]), statistics.median(cpu["without"])
            print(f"server CPU per write, its notification included: with subscriptions {cw:.1f} ms, without "
                  f"{cwo:.1f} ms (+{cw - cwo:.1f} ms per notified write)")
    finally:
        with_subs.stop()
        without.stop()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
