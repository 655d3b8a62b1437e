"""Operator mistakes fail closed with one clear line, a non-zero exit and nothing written
(issue "Security fixes" item 10): run as a user runs it, `python -m fhirserver` in a subprocess."""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.cli import CLI, cli, ok

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()


def one_line_error(proc: object, *words: str) -> str:
    returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr  # type: ignore[attr-defined]
    assert returncode != 0, (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Fix:" in lines[0]
    return lines[0]


def initialized(tmp_path: Path, **env: str) -> Path:
    data = tmp_path / "data"
    ok(cli("client", "list", data_dir=data, real=True, **env))  # migrates, creates the keys
    return data


def files(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in data.iterdir() if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def test_missing_key_file_is_one_line_and_no_new_key_ring(tmp_path: Path) -> None:
    data = initialized(tmp_path)
    (data / "master-keys.json").unlink()
    before = files(data)
    line = one_line_error(cli("client", "list", data_dir=data, real=True), "master-keys.json", "missing")
    assert "no new key was generated" in line
    assert not (data / "master-keys.json").exists()
    assert files(data) == before
    one_line_error(cli("audit", "verify", data_dir=data, real=True), "master-keys.json")


def test_wrong_master_key_is_one_line(tmp_path: Path) -> None:
    data = initialized(tmp_path, FHIRSERVER_MASTER_KEY=KEY_A)
    one_line_error(cli("client", "list", data_dir=data, real=True, FHIRSERVER_MASTER_KEY=KEY_B),
                   "FHIRSERVER_MASTER_KEY", "master key")
    one_line_error(cli("client", "list", data_dir=data, real=True, FHIRSERVER_MASTER_KEY="not base64!"),
                   "base64")
    ok(cli("client", "list", data_dir=data, real=True, FHIRSERVER_MASTER_KEY=KEY_A))  # the right key still opens it


def test_database_from_a_newer_migration_is_one_line(tmp_path: Path) -> None:
    data = initialized(tmp_path)
    with sqlite3.connect(data / "fhirserver.sqlite3") as db:
        db.execute("UPDATE alembic_version SET version_num = 'ffffffff9999'")
    one_line_error(cli("client", "list", data_dir=data, real=True), "newer fhirserver")


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """Read-only even for root (CI runs as root, which ignores permission bits)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    done: list[Path] = []
    try:
        for p in paths:
            if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode != 0:
                pytest.skip("this filesystem does not support immutable files")
            done.append(p)
        yield
    finally:
        for p in done:
            subprocess.run(["chattr", "-i", str(p)], check=True)


def test_read_only_database_directory_is_one_line(tmp_path: Path) -> None:
    data = initialized(tmp_path)
    for name in ("fhirserver.sqlite3-wal", "fhirserver.sqlite3-shm"):
        if (data / name).exists():
            (data / name).unlink()
    before = files(data)
    paths = [data / "fhirserver.sqlite3", *[p for p in data.iterdir() if p.is_file() and p.name != "fhirserver.sqlite3"],
             data]
    with immutable(*paths):
        one_line_error(cli("client", "register", "--name", "x", "--scopes", "system/*.rs", "--jwks-url",
                           "https://example.org/jwks.json", data_dir=data, real=True), "writable")
    assert files(data) == before


def test_serve_fails_the_same_way_before_starting(tmp_path: Path) -> None:
    data = initialized(tmp_path)
    (data / "master-keys.json").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRSERVER_")}
    proc = subprocess.run([*CLI, "serve", "--port", "1"],
                          env={**env, "FHIRSERVER_DATA_DIR": str(data)}, capture_output=True, text=True, timeout=60)
    one_line_error(proc, "master-keys.json")
