"""A throwaway PostgreSQL server for tests (initdb + pg_ctl in a temp dir).

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
(created by the OS package). scripts/ensure_postgres.sh installs the binaries when missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _find(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / binary).exists():
            return str(root / binary)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    def __init__(self) -> None:
        initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("PostgreSQL binaries not found; run scripts/ensure_postgres.sh")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.dir = Path(tempfile.mkdtemp(prefix="fhirserver-pg-"))
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self, durable: bool = False) -> str:
        """`durable`: PostgreSQL's default fsync/synchronous_commit/full_page_writes (production
        tests and benchmarks); otherwise all three off, for speed."""
        data = self.dir / "data"
        self._run(self.initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._opts = opts
        self._start_server()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _start_server(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-o", self._opts, "-l", str(self.dir / "log"), "-w", "start")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)

    def crash(self) -> None:
        """An immediate shutdown (no checkpoint, clients cut off): the database machine is gone."""
        self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-m", "immediate", "stop")

    def restart(self) -> None:
        self._start_server()

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
