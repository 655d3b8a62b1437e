"""The dispatcher in a process of its own (fhirserver/dispatcher_process.py): `fhirserver serve`
runs exactly one beside its workers, starts it again when it dies, and it does not outlive the
master; `fhirserver subscription dispatch` runs it in the foreground for a server started without
one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.support.cli import CLI
from tests.support.live import free_port, server_env
from tests.support.receiver import Receiver, status_of

from .test_crash import _headers, _serve, _setup
from .test_rest_hook import subscription


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append((int(entry), cmd))
    return out


def _dispatchers(master: int) -> list[int]:
    return [p for p, cmd in _children(master) if "spawn_main" in cmd]  # not its resource tracker


def _wait(cond, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def _observation(base: str, h: dict[str, str], pid: str) -> str:
    r = requests.post(f"{base}/Observation", json={"resourceType": "Observation", "status": "final",
                                                   "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}},
                      headers=h, timeout=30)
    assert r.status_code == 201
    return str(r.json()["id"])


def _up(port: int, proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, log.read_text()
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def _notified(receiver: Receiver, oid: str) -> bool:
    return any(e["focus"]["reference"].endswith(f"/{oid}") for b in receiver.bundles()
               if status_of(b)["type"] == "event-notification" for e in status_of(b)["events"])


def test_serve_runs_one_dispatcher_process_restarts_it_and_it_dies_with_the_master(tmp_path: Path) -> None:
    receiver = Receiver()
    data, client_id, key = _setup(tmp_path, receiver)
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    proc = _serve(tmp_path, data, port, base, "a")
    try:
        first = _wait(lambda: _dispatchers(proc.pid))
        assert len(first) == 1  # one per instance, not one per worker
        h = _headers(port, client_id, key)
        pid = requests.post(f"{base}/Patient", json={"resourceType": "Patient"}, headers=h, timeout=30).json()["id"]
        sub = subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",))
        assert requests.post(f"{base}/Subscription", json=sub, headers=h, timeout=30).status_code == 201
        receiver.wait(lambda b: len(b) >= 1)  # the handshake, sent by that process
        oid = _observation(base, h, pid)
        receiver.wait(lambda _b: _notified(receiver, oid))

        os.kill(first[0], signal.SIGKILL)  # the dispatcher dies: the master starts another
        second = _wait(lambda: [p for p in _dispatchers(proc.pid) if p != first[0]])
        assert len(second) == 1
        oid = _observation(base, h, pid)
        receiver.wait(lambda _b: _notified(receiver, oid), timeout=30)

        os.kill(proc.pid, signal.SIGKILL)  # the master alone dies: its dispatcher does not linger
        proc.wait(timeout=10)
        _wait(lambda: not Path(f"/proc/{second[0]}").exists() or
              Path(f"/proc/{second[0]}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by the master's kill
        receiver.close()


def test_subscription_dispatch_delivers_for_a_server_started_without_a_dispatcher(tmp_path: Path) -> None:
    receiver = Receiver()
    data, client_id, key = _setup(tmp_path, receiver)
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    env = server_env(tmp_path, data, FHIRSERVER_BASE_URL=base, FHIRSERVER_SUBSCRIPTION_ALLOW_HTTP_LOOPBACK="1",
                     FHIRSERVER_SUBSCRIPTION_POLL_SECONDS="0.05", FHIRSERVER_SUBSCRIPTION_DISPATCHER="0")
    with (tmp_path / "web.log").open("w") as log:
        web = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "1"], env=env, cwd=tmp_path,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dispatch = None
    try:
        _wait(lambda: _up(port, web, tmp_path / "web.log"), timeout=45)
        assert _dispatchers(web.pid) == []
        h = _headers(port, client_id, key)
        pid = requests.post(f"{base}/Patient", json={"resourceType": "Patient"}, headers=h, timeout=30).json()["id"]
        sub = subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",))
        assert requests.post(f"{base}/Subscription", json=sub, headers=h, timeout=30).status_code == 201
        oid = _observation(base, h, pid)
        time.sleep(2)
        assert receiver.bundles() == []  # nobody dispatches yet: nothing is sent, nothing is lost

        dispatch = subprocess.Popen([*CLI, "subscription", "dispatch"], env=env, cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        receiver.wait(lambda _b: _notified(receiver, oid), timeout=30)  # the handshake, then the event
        dispatch.send_signal(signal.SIGTERM)
        assert dispatch.wait(timeout=30) == 0
    finally:
        if dispatch is not None and dispatch.poll() is None:
            dispatch.kill()
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=30)
        receiver.close()
