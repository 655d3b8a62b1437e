"""Start a real fhirserver (gunicorn, SQLite, encryption + audit on) in a temp dir for benchmarks,
register a backend client and hand out tokens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    def __init__(self, data_dir: str | None = None, workers: int = 2, threads: int = 8,
                 database_url: str = "") -> None:
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="fhirbench-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.env = {**os.environ, "FHIRSERVER_DATA_DIR": str(self.data_dir),
                    "FHIRSERVER_BASE_URL": self.base, "FHIRSERVER_LOG_LEVEL": "WARNING"}
        if database_url:
            self.env["FHIRSERVER_DATABASE_URL"] = database_url
        self.workers, self.threads = workers, threads
        self.proc: subprocess.Popen[bytes] | None = None
        self.code: Path | None = None  # another checkout to run (`python -m` puts the cwd first on sys.path)

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "fhirserver", *args], env=self.env, check=True,
                              capture_output=True, text=True, cwd=self.code).stdout.strip()

    def start(self) -> BenchServer:
        self.cli("db", "upgrade")
        self.start_only()
        self.key = generate_key("ES384")
        jwks = self.data_dir / "bench-jwks.json"
        import json

        jwks.write_text(json.dumps(public_jwks(self.key)))
        self.client_id = self.cli("client", "register", "--name", "bench", "--jwks-file", str(jwks),
                                  "--scopes", "system/*.cruds")
        time.sleep(6)  # let the workers finish compiling the JSON schema validators (off the clock)
        return self

    def start_only(self) -> BenchServer:
        """Serve an already migrated database (another instance on it registered the client)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fhirserver", "serve", "--port", str(self.port), "--workers", str(self.workers),
             "--threads", str(self.threads)], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.code)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        return self

    def token(self, scope: str = "system/*.cruds") -> str:
        url = f"http://127.0.0.1:{self.port}/auth/token"
        resp = requests.post(url, data=token_request_form(self.key, self.client_id, url, scope), timeout=30)
        resp.raise_for_status()
        return resp.json()["access_token"]

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
