"""A real fhirserver serve (gunicorn) on 127.0.0.1 for tests: start, wait for /healthz, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import requests

from tests.support.cli import CLI


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
    deadline = time.time() + 45
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
