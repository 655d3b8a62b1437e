"""Several `fhirserver serve` processes on one database behave as one server: concurrent load
over two instances with `audit verify` passing afterwards, `kill -9` of one instance during
writes losing no acknowledged write and no access record, and a client disabled through one
instance's database refused by both at the next request. On SQLite (two processes, one file) and
on a throwaway PostgreSQL with its default durable settings (two instances with their own data
directories, as on two hosts, sharing the master key and the checkpoint signing key)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.config import load_settings
from fhirserver.services import build_services
from tests.support.cli import CLI
from tests.support.live import free_port, server_env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class Instance:
    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = root / f"{name}.log"
        env = {**env, "FHIRSERVER_BASE_URL": f"{self.base}/fhir"}
        with self.log.open("w") as fh:  # its own session: kill -9 takes gunicorn's workers too
            self.proc = subprocess.Popen([*CLI, "serve", "--port", str(self.port), "--workers", "2", "--threads", "4"],
                                         env=env, cwd=root, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if requests.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert time.time() < deadline, self.log.read_text()
            time.sleep(0.2)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


def _setup(tmp_path: Path, database_url: str) -> tuple[dict[str, str], list[dict[str, str]], Any, str]:
    """Shared key configuration, one env per instance, the client's key and id."""
    keys = tmp_path / "keys"
    keys.mkdir()
    shared = {"FHIRSERVER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
              "FHIRSERVER_AUDIT_SIGNING_KEY_FILE": str(keys / "audit-signing-key.pem"),
              "FHIRSERVER_LOG_LEVEL": "WARNING"}
    if database_url:
        shared["FHIRSERVER_DATABASE_URL"] = database_url
        dirs = [tmp_path / "host-a", tmp_path / "host-b"]  # two hosts: their own data directories
    else:
        dirs = [tmp_path / "data", tmp_path / "data"]  # SQLite: two processes on one file
    envs = [server_env(tmp_path, d, **shared) for d in dirs]
    key = generate_key("ES384")
    (tmp_path / "jwks.json").write_text(json.dumps(public_jwks(key)))
    client_id = ok(run(envs[0], "client", "register", "--name", "load", "--jwks-file", str(tmp_path / "jwks.json"),
                       "--scopes", "system/*.cruds")).strip()
    return shared, envs, key, client_id


def _token(base: str, key: Any, client_id: str) -> str:
    form = token_request_form(key, client_id, f"{base}/auth/token", "system/*.cruds")
    resp = requests.post(f"{base}/auth/token", data=form, timeout=30)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def _settings(env: dict[str, str]) -> Any:
    os_env = {k[len("FHIRSERVER_"):].lower(): v for k, v in env.items() if k.startswith("FHIRSERVER_")}
    return load_settings(**os_env)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_two_instances_kill9_and_verify(tmp_path: Path, db: str, request: pytest.FixtureRequest) -> None:
    url = ""
    if db == "postgres":
        url = request.getfixturevalue("durable_postgres").create_database(f"inst_{os.getpid()}_{free_port()}")
    _shared, envs, key, client_id = _setup(tmp_path, url)
    a = Instance(tmp_path, "a", envs[0])
    b = Instance(tmp_path, "b", envs[1])
    try:
        token = _token(a.base, key, client_id)  # issued by A, honoured by B (one database)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
        acked_ids: list[str] = []
        acked_requests: list[str] = []
        killed = {"b": False}

        def one(i: int) -> None:
            inst = b if i % 2 and not killed["b"] else a
            kind = i % 10
            try:
                if kind < 3 or not acked_ids:
                    body = {"resourceType": "Patient", "name": [{"family": f"Inst{i}"}]}
                    r = requests.post(f"{inst.base}/fhir/Patient", json=body, headers=headers, timeout=30)
                    if r.status_code == 201:
                        acked_ids.append(r.json()["id"])
                elif kind < 8:
                    r = requests.get(f"{inst.base}/fhir/Patient/{acked_ids[i % len(acked_ids)]}", headers=headers,
                                     timeout=30)
                    assert r.status_code == 200, r.text
                else:
                    r = requests.get(f"{inst.base}/fhir/Patient?family=Inst{i % 7}", headers=headers, timeout=30)
                    assert r.status_code == 200, r.text
            except requests.ConnectionError:
                assert inst is b and killed["b"]  # only the killed instance may fail to answer
                return
            acked_requests.append(r.headers["X-Request-Id"])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(160)))
            killed["b"] = True
            futures = [pool.submit(one, i) for i in range(160, 320)]
            time.sleep(0.3)
            b.kill9()  # in the middle of writes
            for f in futures:
                f.result()
        assert len(acked_ids) > 50

        # a client disabled in the shared database is refused by every instance at its next request
        c = Instance(tmp_path, "c", envs[1])
        try:
            assert requests.get(f"{c.base}/fhir/Patient/{acked_ids[0]}", headers=headers, timeout=30).status_code == 200
            ok(run(envs[0], "client", "disable", client_id))
            for inst in (a, c):
                assert requests.get(f"{inst.base}/fhir/Patient/{acked_ids[0]}", headers=headers,
                                    timeout=30).status_code == 401
        finally:
            c.stop()
    finally:
        a.stop()
        b.stop()

    svc = build_services(_settings(envs[0]))
    from fhirserver.db.engine import read_connection

    with read_connection(svc.engine) as conn:
        for rid in acked_ids:  # every acknowledged write survived
            assert svc.repo.read(conn, "Patient", rid).body is not None
        from sqlalchemy import select

        from fhirserver.db.schema import access_record

        ids = conn.execute(select(access_record.c.id)).scalars().all()
        recorded = {json.loads(svc.audit.read_content(conn, i) or b"{}").get("request_id") for i in ids}
    missing = set(acked_requests) - recorded
    assert not missing, f"{len(missing)} acknowledged requests have no access record"
    proc = run(envs[0], "audit", "verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: ") and " 0 checkpoints in the database" not in proc.stdout, proc.stdout
