"""Kill -9 of the dispatching instance in the middle of a delivery (docs/subscriptions.md, "Nothing
is lost"): real `fhirserver serve` processes on one SQLite database, a slow real receiver. After
the first instance dies, a second one takes the subscription over when the lease runs out and
every event arrives; an event resent is resent under its own number, never another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from tests.support.cli import CLI, cli, ok
from tests.support.live import free_port, server_env
from tests.support.receiver import Receiver, status_of

from .test_rest_hook import subscription

FHIR = {"Content-Type": "application/fhir+json"}


def _serve(root: Path, data: Path, port: int, base: str, name: str) -> subprocess.Popen[bytes]:
    env = server_env(root, data, FHIRSERVER_BASE_URL=base, FHIRSERVER_SUBSCRIPTION_ALLOW_HTTP_LOOPBACK="1",
                     FHIRSERVER_SUBSCRIPTION_TIMEOUT_SECONDS="1", FHIRSERVER_SUBSCRIPTION_POLL_SECONDS="0.05")
    with (root / f"{name}.log").open("w") as log:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "1"], env=env, cwd=root,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 45
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError((root / f"{name}.log").read_text())


def _setup(tmp_path: Path, receiver: Receiver) -> tuple[Path, str, object]:
    data = tmp_path / "data"
    key = generate_key("ES384")
    (tmp_path / "jwks.json").write_text(json.dumps(public_jwks(key)))
    ok(cli("db", "upgrade", data_dir=data, real=True))
    client_id = ok(cli("client", "register", "--name", "feed", "--jwks-file", str(tmp_path / "jwks.json"),
                       "--scopes", "system/*.cruds", "--subscription-endpoint", receiver.url, data_dir=data,
                       real=True)).strip()
    return data, client_id, key


def _headers(port: int, client_id: str, key: object) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}/auth/token"
    token = requests.post(url, data=token_request_form(key, client_id, url, "system/*.cruds"),  # type: ignore[arg-type]
                          timeout=30).json()["access_token"]
    return {"Authorization": f"Bearer {token}", **FHIR}



def test_kill_9_mid_delivery_loses_nothing_and_renumbers_nothing(tmp_path: Path) -> None:
    receiver = Receiver()
    data, client_id, key = _setup(tmp_path, receiver)
    port_a, port_b = free_port(), free_port()
    base = f"http://127.0.0.1:{port_a}/fhir"
    first = _serve(tmp_path, data, port_a, base, "a")
    second = None
    try:
        h = _headers(port_a, client_id, key)
        pid = requests.post(f"{base}/Patient", json={"resourceType": "Patient"}, headers=h, timeout=30).json()["id"]
        sub = subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",))
        assert requests.post(f"{base}/Subscription", json=sub, headers=h, timeout=30).status_code == 201
        receiver.wait(lambda b: len(b) >= 1)  # handshake
        receiver.delay = 2.0  # each delivery now hangs in the receiver: the instance dies during one
        written = []
        for i in range(30):
            body = {"resourceType": "Observation", "status": "final", "code": {"text": f"crash {i}"},
                    "subject": {"reference": f"Patient/{pid}"}}
            r = requests.post(f"{base}/Observation", json=body, headers=h, timeout=30)
            assert r.status_code == 201
            written.append(r.json()["id"])
        receiver.wait(lambda b: any(status_of(x)["type"] == "event-notification" for x in b))
        os.killpg(first.pid, signal.SIGKILL)  # mid-send: the receiver holds the request
        first.wait(timeout=10)
        receiver.delay = 0.0
        second = _serve(tmp_path, data, port_b, base, "b")

        def complete(bundles: list[dict[str, object]]) -> bool:
            numbers = {int(e["event-number"]) for b in bundles if status_of(b)["type"] == "event-notification"
                       for e in status_of(b)["events"]}
            return numbers == set(range(1, 31))

        got = receiver.wait(complete, timeout=60)
        by_number: dict[int, set[str]] = {}
        for b in got:
            for e in status_of(b)["events"] if status_of(b)["type"] == "event-notification" else []:
                by_number.setdefault(int(e["event-number"]), set()).add(e["focus"]["reference"].rsplit("/", 1)[1])
        # every event once by number, each number naming one resource, in the order written
        assert all(len(ids) == 1 for ids in by_number.values()), by_number
        assert [next(iter(by_number[n])) for n in range(1, 31)] == written
        resent = sum(len(status_of(b)["events"]) for b in got if status_of(b)["type"] == "event-notification") - 30
        assert resent >= 1  # the batch in flight at the kill was sent again (at-least-once), same numbers
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        receiver.close()
