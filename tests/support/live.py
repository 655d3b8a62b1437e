"""A real fhirserver serve (gunicorn) on 127.0.0.1 for tests: start, wait for /healthz, stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from tests.support.cli import CLI, cli, ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(root: Path, data_dir: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRSERVER_")}
    if data_dir is not None:
        env["FHIRSERVER_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"  # the demo instructions must reach the log before gunicorn runs
    env["XDG_RUNTIME_DIR"] = str(root)  # gunicorn's control socket goes here, not into $HOME
    env.update(extra)
    return env


def start_server(args: list[str], env: dict[str, str], cwd: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    with log.open("w") as fh:
        proc = subprocess.Popen([*CLI, *args], env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + 90  # a loaded 2-core CI machine booting several servers at once
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json() == {"status": "ok"}:
                    return proc
            except (requests.RequestException, ValueError):
                pass
            if time.time() > deadline:
                raise AssertionError(f"server did not come up:\n{log.read_text()}")
            time.sleep(0.1)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def served_with_client(root: Path, scopes: str, *serve_args: str) -> Iterator[tuple[str, dict[str, str], Path]]:
    """A backend client registered through the CLI, then `fhirserver serve` on a free port:
    yields (base URL, bearer headers for `scopes`, the server log); stops the server after."""
    data, key = root / "data", generate_key("ES384")
    (root / "jwks.json").write_text(json.dumps(public_jwks(key)))
    client_id = ok(cli("client", "register", "--name", "live test", "--jwks-file", str(root / "jwks.json"),
                       "--scopes", scopes, data_dir=data, real=True)).strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = root / "serve.log"
    proc = start_server(["serve", "--port", str(port), *serve_args],
                        server_env(root, data, FHIRSERVER_BASE_URL=f"{base}/fhir"), root, log, port)
    try:
        form = token_request_form(key, client_id, f"{base}/auth/token", scopes)
        token = requests.post(f"{base}/auth/token", data=form, timeout=10).json()["access_token"]
        yield base, {"Authorization": f"Bearer {token}"}, log
    finally:
        stop_server(proc)
