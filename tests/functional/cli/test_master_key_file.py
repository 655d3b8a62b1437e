"""The master key ring may live outside the data directory (FHIRSERVER_MASTER_KEY_FILE); `serve`
warns when it sits beside the database."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import cli, ok
from tests.support.live import free_port, server_env, start_server, stop_server


def test_key_ring_outside_the_data_directory(tmp_path: Path) -> None:
    data, keys = tmp_path / "data", tmp_path / "secrets" / "ring.json"
    keys.parent.mkdir()
    ok(cli("client", "list", data_dir=data, real=True, FHIRSERVER_MASTER_KEY_FILE=str(keys)))
    assert keys.is_file() and oct(keys.stat().st_mode & 0o777) == "0o600"
    assert not (data / "master-keys.json").exists()
    ok(cli("client", "list", data_dir=data, real=True, FHIRSERVER_MASTER_KEY_FILE=str(keys)))
    # without it, the database's data keys cannot be opened: one line naming the configured file
    keys.rename(tmp_path / "elsewhere.json")
    proc = cli("client", "list", data_dir=data, real=True, FHIRSERVER_MASTER_KEY_FILE=str(keys))
    assert proc.returncode != 0 and str(keys) in proc.stderr and "Traceback" not in proc.stderr


def _serve_log(root: Path, **env: str) -> str:
    port = free_port()
    log = root / "serve.log"
    proc = start_server(["serve", "--port", str(port), "--workers", "1"], server_env(root, root / "data", **env),
                        root, log, port)
    stop_server(proc)
    return log.read_text()


def test_serve_warns_when_the_key_ring_is_beside_the_database(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert "warning: the master key ring" in _serve_log(tmp_path / "a")
    (tmp_path / "b").mkdir()
    outside = tmp_path / "b-keys.json"
    assert "warning: the master key ring" not in _serve_log(tmp_path / "b", FHIRSERVER_MASTER_KEY_FILE=str(outside))
    assert outside.is_file()
