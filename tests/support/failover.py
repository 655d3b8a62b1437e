"""Mixed load against a real `fhirserver serve` on the HA cluster while the primary is killed
(tests/functional/db/test_failover.py, scripts/bench_failover.py), and the checks that follow:
every acknowledged create is still there, every acknowledged read or search has its access record,
and how long the service was away."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from tests.support.cli import cli, ok
from tests.support.live import free_port, server_env, start_server, stop_server

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@dataclass
class Outcome:
    acked_creates: list[str] = field(default_factory=list)  # Observation ids answered 201
    acked_reads: list[str] = field(default_factory=list)  # request ids of reads/searches answered 200
    failures: list[tuple[float, float, str]] = field(default_factory=list)  # (started, ended, status or error)
    successes: list[tuple[float, float]] = field(default_factory=list)  # (started, ended)
    killed_at: float = 0.0

    def outage_seconds(self) -> float:
        """From the kill to the end of the first request that started after the last failure and
        succeeded: how long clients saw no service."""
        after = [f for f in self.failures if f[0] >= self.killed_at - 1]
        if not after:
            return 0.0
        last_failure_start = max(f[0] for f in after)
        back = min((end for start, end in self.successes if start >= last_failure_start), default=float("inf"))
        return back - self.killed_at


@dataclass
class Served:
    base: str
    headers: dict[str, str]
    auditor: dict[str, str]
    data: Path
    env: dict[str, str]


def _register(root: Path, env: dict[str, str], name: str, scopes: str, *flags: str) -> tuple[str, object]:
    key = generate_key("ES384")
    (root / f"{name}.jwks").write_text(json.dumps(public_jwks(key)))
    client_id = ok(cli("client", "register", "--name", name, "--jwks-file", str(root / f"{name}.jwks"),
                       "--scopes", scopes, *flags, data_dir=root / "data", real=True,
                       FHIRSERVER_DATABASE_URL=env["FHIRSERVER_DATABASE_URL"])).strip()
    return client_id, key


@contextmanager
def serve(root: Path, database_url: str, workers: int = 2, **settings: str) -> Iterator[Served]:
    """`fhirserver serve` on `database_url` (and FHIRSERVER_* `settings`), with a read-write
    client and an auditor."""
    env_db = {"FHIRSERVER_DATABASE_URL": database_url}
    writer, wkey = _register(root, env_db, "load", "system/*.cruds")
    auditor, akey = _register(root, env_db, "auditor", "system/AuditEvent.rs", "--auditor", "--audit-query-values",
                              "--purpose", "HOPERAT")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(root, root / "data", FHIRSERVER_BASE_URL=f"{base}/fhir", **env_db, **settings)
    proc = start_server(["serve", "--port", str(port), "--workers", str(workers)], env, root, root / "serve.log", port)
    try:
        tokens = []
        for client_id, key, scopes in ((writer, wkey, "system/*.cruds"), (auditor, akey, "system/AuditEvent.rs")):
            form = token_request_form(key, client_id, f"{base}/auth/token", scopes)  # type: ignore[arg-type]
            tokens.append(requests.post(f"{base}/auth/token", data=form, timeout=30).json()["access_token"])
        yield Served(base, {"Authorization": f"Bearer {tokens[0]}"}, {"Authorization": f"Bearer {tokens[1]}"},
                     root / "data", env)
    finally:
        stop_server(proc)


def run_load(srv: Served, patient: str, kill: Callable[[], object], clients: int = 8, before: float = 4.0,
             after: float = 6.0, max_outage: float = 60.0) -> Outcome:
    """`clients` threads of 30 % creates, 50 % reads, 20 % searches; `kill` after `before`
    seconds; the load goes on until the service is back and then `after` seconds more."""
    out = Outcome()
    lock = threading.Lock()
    stop = threading.Event()
    fhir = f"{srv.base}/fhir"

    def one(rng: random.Random) -> None:
        rid = str(uuid.uuid4())
        headers = {**srv.headers, "X-Request-ID": rid}
        started = time.time()
        kind = rng.random()
        try:
            if kind < 0.3 or not out.acked_creates:
                body = {"resourceType": "Observation", "status": "final", "code": {"text": "failover"},
                        "subject": {"reference": f"Patient/{patient}"}}
                resp = requests.post(f"{fhir}/Observation", data=json.dumps(body), headers={**headers, **FHIR_JSON},
                                     timeout=60)
                ok_status = resp.status_code == 201
                if ok_status:
                    with lock:
                        out.acked_creates.append(resp.headers["Location"].split("/Observation/")[1].split("/")[0])
            else:
                if kind < 0.8:
                    with lock:
                        target = rng.choice(out.acked_creates)
                    resp = requests.get(f"{fhir}/Observation/{target}", headers=headers, timeout=60)
                else:
                    resp = requests.get(f"{fhir}/Observation", params={"subject": f"Patient/{patient}", "_count": "5"},
                                        headers=headers, timeout=60)
                ok_status = resp.status_code == 200
                if ok_status:
                    with lock:
                        out.acked_reads.append(rid)
            with lock:
                if ok_status:
                    out.successes.append((started, time.time()))
                else:
                    out.failures.append((started, time.time(), str(resp.status_code)))
        except requests.RequestException as exc:
            with lock:
                out.failures.append((started, time.time(), type(exc).__name__))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            one(rng)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(before)
    out.killed_at = time.time()
    kill()
    deadline = time.time() + max_outage
    while time.time() < deadline:
        time.sleep(0.5)
        with lock:
            back = any(start > out.killed_at + 1 and start >= max((f[0] for f in out.failures), default=0)
                       for start, _ in out.successes)
        if back:
            break
    time.sleep(after)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    return out


def lost_creates(srv: Served, out: Outcome) -> list[str]:
    """Acknowledged creates that cannot be read back."""
    return [i for i in out.acked_creates
            if requests.get(f"{srv.base}/fhir/Observation/{i}", headers=srv.headers, timeout=60).status_code != 200]


def reads_without_record(srv: Served, out: Outcome) -> list[str]:
    """Request ids of acknowledged reads and searches that no AuditEvent names (read as an auditor)."""
    seen: set[str] = set()
    url: str | None = f"{srv.base}/fhir/AuditEvent?_count=500"
    while url:
        bundle = requests.get(url, headers=srv.auditor, timeout=120).json()
        assert bundle.get("resourceType") == "Bundle", bundle
        for entry in bundle.get("entry", []):
            for entity in entry["resource"].get("entity", []):
                value = ((entity.get("what") or {}).get("identifier") or {}).get("value")
                if value:
                    seen.add(value)
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return [rid for rid in out.acked_reads if rid not in seen]


def audit_verify(srv: Served) -> str:
    return ok(cli("audit", "verify", data_dir=srv.data, real=True,
                  FHIRSERVER_DATABASE_URL=srv.env["FHIRSERVER_DATABASE_URL"]))
