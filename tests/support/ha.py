"""A real high-availability PostgreSQL cluster on loopback for tests and benchmarks: one etcd and
three PostgreSQL nodes under Patroni (Debian packages; scripts/ensure_ha.sh), synchronous
replication in Patroni's strict synchronous mode (a commit is acknowledged only once a standby
has it), durable settings. `kill_leader` is a machine dying: kill -9 of the leader's Patroni and
PostgreSQL processes; `restart` brings that node back as a standby (pg_rewind)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.pg import _find


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> str | None:
    """Why the cluster cannot run here, or None."""
    for binary in ("etcd", "patroni"):
        if shutil.which(binary) is None:
            return f"{binary} not found (scripts/ensure_ha.sh)"
    if _find("initdb") is None:
        return "PostgreSQL not found (scripts/ensure_postgres.sh)"
    return None


@dataclass
class Node:
    name: str
    pg_port: int
    rest_port: int
    config: Path
    data: Path
    proc: subprocess.Popen[bytes] | None = None


class Cluster:
    def __init__(self, nodes: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fhirserver-ha-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.etcd_port, self.etcd_peer = _free_port(), _free_port()
        self.etcd: subprocess.Popen[bytes] | None = None
        # the server binaries' own directory (initdb may be a link elsewhere; Patroni needs them all)
        bin_dir = next((str(d) for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
                        if (d / "pg_controldata").exists()), str(Path(_find("initdb") or "").resolve().parent))
        self.nodes = [Node(f"n{i}", _free_port(), _free_port(), self.dir / f"n{i}.yml", self.dir / f"data{i}")
                      for i in range(1, nodes + 1)]
        for node in self.nodes:
            node.config.write_text(json.dumps(self._config(node, bin_dir), indent=1))  # YAML is a superset of JSON

    def _config(self, node: Node, bin_dir: str) -> dict[str, object]:
        return {
            "scope": f"fhir-{self.etcd_port}", "name": node.name,
            "restapi": {"listen": f"127.0.0.1:{node.rest_port}", "connect_address": f"127.0.0.1:{node.rest_port}"},
            "etcd3": {"hosts": f"127.0.0.1:{self.etcd_port}"},
            "bootstrap": {
                "dcs": {"ttl": 10, "loop_wait": 1, "retry_timeout": 4, "maximum_lag_on_failover": 0,
                        "synchronous_mode": True, "synchronous_mode_strict": True,
                        "postgresql": {"use_pg_rewind": True, "parameters": {
                            "wal_level": "replica", "hot_standby": "on", "max_wal_senders": 10,
                            "max_replication_slots": 10, "wal_log_hints": "on", "synchronous_commit": "on",
                            "fsync": "on", "full_page_writes": "on", "max_connections": 200}}},
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
                "pg_hba": ["host replication replicator 127.0.0.1/32 trust", "host all all 127.0.0.1/32 trust"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.pg_port}", "connect_address": f"127.0.0.1:{node.pg_port}",
                "data_dir": str(node.data), "bin_dir": bin_dir, "pgpass": str(self.dir / f"pgpass-{node.name}"),
                "authentication": {"superuser": {"username": "postgres", "password": "unused"},
                                   "replication": {"username": "replicator", "password": "unused"}},
                "parameters": {"unix_socket_directories": str(self.dir)},
            },
        }

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 90) -> None:
        with open(self.dir / "etcd.log", "ab") as log:  # the child keeps its own descriptor
            self.etcd = subprocess.Popen(self._etcd_args(), stdout=log, stderr=subprocess.STDOUT)
        self._start_node(self.nodes[0])
        self.wait(lambda members: any(m["role"] == "leader" and m["state"] == "running" for m in members), timeout)
        for node in self.nodes[1:]:
            self._start_node(node)
        self.wait_healthy(timeout)

    def _etcd_args(self) -> list[str]:
        return ["etcd", "--name", "e1", "--data-dir", str(self.dir / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-cluster", f"e1=http://127.0.0.1:{self.etcd_peer}"]

    def _start_node(self, node: Node) -> None:
        # cwd and HOME the postgres user can enter (a test's working directory may be root's)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir), "LANG": "C.UTF-8"}
        with open(self.dir / f"{node.name}.log", "ab") as log:
            node.proc = subprocess.Popen([*self.as_user, "patroni", str(node.config)], cwd=self.dir, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 90) -> None:
        """Every node running, one leader, a synchronous standby."""
        self.wait(lambda ms: len(ms) == len(self.nodes) and all(m["state"] in ("running", "streaming") for m in ms)
                  and any(m["role"] == "leader" for m in ms) and any(m["role"] == "sync_standby" for m in ms),
                  timeout)

    def stop(self) -> None:
        for node in self.nodes:
            self._kill(node)
        if self.etcd is not None:
            self.etcd.kill()
            self.etcd.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ state
    def members(self) -> list[dict[str, object]]:
        for node in self.nodes:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{node.rest_port}/cluster", timeout=1) as resp:
                    return list(json.loads(resp.read())["members"])
            except OSError:
                continue
        return []

    def wait(self, ready: object, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            members = self.members()
            if members and ready(members):  # type: ignore[operator]
                return
            time.sleep(0.3)
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(self.dir.glob("*.log")))
        raise TimeoutError(f"cluster not ready after {timeout} s: {self.members()}\n{logs}")

    def leader(self) -> Node:
        name = next(m["name"] for m in self.members() if m["role"] == "leader")
        return next(n for n in self.nodes if n.name == name)

    def url(self, database: str = "postgres") -> str:
        """The server's database URL: every node, the read-write one chosen at connect time."""
        hosts = "&".join(f"host=127.0.0.1:{n.pg_port}" for n in self.nodes)
        return (f"postgresql+psycopg://postgres@/{database}?{hosts}"
                "&target_session_attrs=read-write&connect_timeout=2")

    def create_database(self, name: str) -> str:
        import psycopg

        node = self.leader()
        with psycopg.connect(f"host=127.0.0.1 port={node.pg_port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    # ------------------------------------------------------------ failures
    def kill_leader(self) -> Node:
        """kill -9 of the leader's Patroni and PostgreSQL (and its backends): the machine is gone."""
        node = self.leader()
        self._kill(node)
        return node

    def _kill(self, node: Node) -> None:
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)  # patroni, and PostgreSQL (same session)
            node.proc.wait()
        pid_file = node.data / "postmaster.pid"
        if pid_file.exists():
            try:
                pid = int(pid_file.read_text().split()[0])
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError, IndexError):
                pass

    def restart(self, node: Node) -> None:
        self._start_node(node)


@contextmanager
def running_cluster(nodes: int = 3) -> Iterator[Cluster]:
    """A started cluster, stopped (and its files removed) on the way out."""
    reason = available()
    if reason:
        raise RuntimeError(f"{reason}; run scripts/ensure_ha.sh")
    cluster = Cluster(nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
