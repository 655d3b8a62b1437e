"""The `fhirserver` command line, run as a real subprocess (exit codes, printed output, files).

Every call gets its own data directory under pytest's tmp_path and an environment stripped of
any FHIRSERVER_* variable from the caller, so a developer's settings never leak in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import requests
import sqlalchemy as sa

from fhirserver.app import create_app
from fhirserver.auth.assertion import load_private_key, token_request_form
from fhirserver.config import load_settings
from tests.support.cli import CLI, clean_env, cli, ok

PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k"}
CORE_TABLES = {"resource", "resource_version", "data_key", "client", "access_token", "access_record",
               "audit_checkpoint", "idx_token", "idx_string", "alembic_version"}










def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(tmp_path: Path, name: str = "client", alg: str = "ES384") -> tuple[Path, Path]:
    key, jwks = tmp_path / f"{name}-key.json", tmp_path / f"{name}-jwks.json"
    ok(cli("client", "keygen", "--alg", alg, "--private-key-out", str(key), "--jwks-out", str(jwks), data_dir=None))
    return key, jwks


def list_json(data_dir: Path) -> list[dict]:
    return json.loads(ok(cli("client", "list", "--json", data_dir=data_dir)))


# ------------------------------------------------------------------ db upgrade
def test_db_upgrade_fresh_sqlite_creates_db_and_is_idempotent(tmp_path: Path) -> None:
    data = tmp_path / "not-yet-there" / "data"
    first = ok(cli("db", "upgrade", data_dir=data, real=True))
    m = re.fullmatch(r"database at revision (\S+)\n", first)
    assert m and m.group(1) != "None", first
    revision = m.group(1)
    db_file = data / "fhirserver.sqlite3"
    assert db_file.is_file()

    engine = sa.create_engine(f"sqlite:///{db_file}")
    try:
        tables = set(sa.inspect(engine).get_table_names())
        assert tables >= CORE_TABLES, CORE_TABLES - tables
        with engine.connect() as conn:
            assert conn.execute(sa.text("select version_num from alembic_version")).scalar_one() == revision
    finally:
        engine.dispose()

    # second run: same revision, nothing breaks, nothing lost
    assert ok(cli("db", "upgrade", data_dir=data)) == first
    engine = sa.create_engine(f"sqlite:///{db_file}")
    try:
        assert set(sa.inspect(engine).get_table_names()) >= CORE_TABLES
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_db_upgrade_postgres_via_env(postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = postgres.create_database(f"cli_{uuid.uuid4().hex[:12]}")
    data = tmp_path / "data"
    first = ok(cli("db", "upgrade", data_dir=data, real=True, FHIRSERVER_DATABASE_URL=url))
    m = re.fullmatch(r"database at revision (\S+)\n", first)
    assert m and m.group(1) != "None", first
    assert ok(cli("db", "upgrade", data_dir=data, FHIRSERVER_DATABASE_URL=url)) == first
    # the database really is PostgreSQL, not a SQLite file in the data dir
    assert not (data / "fhirserver.sqlite3").exists()

    engine = sa.create_engine(url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
        assert tables >= CORE_TABLES, CORE_TABLES - tables
        with engine.connect() as conn:
            assert conn.execute(sa.text("select version_num from alembic_version")).scalar_one() == m.group(1)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_client_register_and_list_on_postgres(postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = postgres.create_database(f"cli_{uuid.uuid4().hex[:12]}")
    _, jwks = keygen(tmp_path)
    data = tmp_path / "data"
    cid = ok(cli("client", "register", "--name", "PG client", "--jwks-file", str(jwks), "--scopes",
                 "system/Patient.rs", data_dir=data, FHIRSERVER_DATABASE_URL=url)).strip()
    rows = json.loads(ok(cli("client", "list", "--json", data_dir=data, FHIRSERVER_DATABASE_URL=url)))
    assert [r["client_id"] for r in rows] == [cid]
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select name from client where client_id = :c"), {"c": cid}).scalar_one() \
                == "PG client"
    finally:
        engine.dispose()


# ------------------------------------------------------------------ defaults and configuration
def test_no_configuration_at_all_uses_default_data_dir_with_private_key_ring(tmp_path: Path) -> None:
    # no FHIRSERVER_* variable, no --config: everything goes to ./fhirserver-data in the cwd
    out = ok(cli("keys", "status", data_dir=None, cwd=tmp_path, real=True))
    data = tmp_path / "fhirserver-data"
    ring = data / "master-keys.json"
    assert ring.is_file()
    assert mode(ring) == 0o600
    assert (data / "fhirserver.sqlite3").is_file()
    doc = json.loads(ring.read_text())
    assert list(doc["keys"]) == [doc["active"]]
    assert len(base64.b64decode(doc["keys"][doc["active"]])) == 32
    assert f"active master key: {doc['active']} (file)" in out

    # a second run reuses the ring; it is not regenerated
    assert f"active master key: {doc['active']} (file)" in ok(cli("keys", "status", data_dir=None, cwd=tmp_path))
    assert json.loads(ring.read_text()) == doc


def test_data_dir_from_env_gets_key_ring_0600_and_sqlite(tmp_path: Path) -> None:
    data = tmp_path / "env-data"
    ok(cli("audit", "verify", data_dir=data, cwd=tmp_path))
    assert mode(data / "master-keys.json") == 0o600
    assert (data / "fhirserver.sqlite3").is_file()
    assert not (tmp_path / "fhirserver-data").exists()


def test_config_file_data_dir_is_honoured_and_env_overrides_it(tmp_path: Path) -> None:
    from_file, from_env = tmp_path / "from-file", tmp_path / "from-env"
    cfg = tmp_path / "fhirserver.toml"
    cfg.write_text(f'[fhirserver]\ndata_dir = "{from_file}"\nlog_level = "WARNING"\n')

    ok(cli("--config", str(cfg), "db", "upgrade", data_dir=None, cwd=tmp_path))
    assert (from_file / "fhirserver.sqlite3").is_file()
    assert not (tmp_path / "fhirserver-data").exists()

    ok(cli("--config", str(cfg), "db", "upgrade", data_dir=from_env, cwd=tmp_path))
    assert (from_env / "fhirserver.sqlite3").is_file()

    # FHIRSERVER_CONFIG is the same as --config
    shutil.rmtree(from_file)
    ok(cli("db", "upgrade", data_dir=None, cwd=tmp_path, FHIRSERVER_CONFIG=str(cfg)))
    assert (from_file / "fhirserver.sqlite3").is_file()


def test_config_file_missing_is_an_error(tmp_path: Path) -> None:
    proc = cli("--config", str(tmp_path / "nope.toml"), "db", "upgrade", data_dir=tmp_path / "data", real=True)
    assert proc.returncode != 0
    assert "nope.toml" in proc.stderr
    assert not (tmp_path / "data").exists()


class _TokenStub:
    """A stand-in token endpoint that records what `client token` posts to it."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                stub.requests.append((self.path, parse_qs(body)))
                payload = json.dumps({"access_token": stub.token, "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _assertion_claims(form: dict[str, list[str]]) -> dict:
    payload = form["client_assertion"][0].split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_config_file_base_url_is_used_and_env_base_url_overrides_it(tmp_path: Path) -> None:
    key, _ = keygen(tmp_path)
    file_stub, env_stub = _TokenStub("token-from-file-url"), _TokenStub("token-from-env-url")
    try:
        cfg = tmp_path / "fhirserver.toml"
        cfg.write_text(f'[fhirserver]\nbase_url = "http://127.0.0.1:{file_stub.port}/fhir"\n')
        args = ("client", "token", "--client-id", "cid-1", "--key-file", str(key), "--scope", "system/Patient.rs")

        out = ok(cli("--config", str(cfg), *args, data_dir=tmp_path / "data"))
        assert out.strip() == "token-from-file-url"
        assert len(file_stub.requests) == 1 and not env_stub.requests
        path, form = file_stub.requests[0]
        assert path == "/auth/token"
        assert form["grant_type"] == ["client_credentials"]
        assert form["scope"] == ["system/Patient.rs"]
        claims = _assertion_claims(form)
        assert claims["aud"] == f"http://127.0.0.1:{file_stub.port}/auth/token"
        assert claims["iss"] == claims["sub"] == "cid-1"

        env_base = f"http://127.0.0.1:{env_stub.port}/fhir"
        out = ok(cli("--config", str(cfg), *args, data_dir=tmp_path / "data", FHIRSERVER_BASE_URL=env_base))
        assert out.strip() == "token-from-env-url"
        assert len(file_stub.requests) == 1 and len(env_stub.requests) == 1
        assert _assertion_claims(env_stub.requests[0][1])["aud"] == f"http://127.0.0.1:{env_stub.port}/auth/token"
    finally:
        file_stub.close()
        env_stub.close()


# ------------------------------------------------------------------ client keygen
@pytest.mark.parametrize("alg,kty", [("ES384", "EC"), ("RS384", "RSA")])
def test_client_keygen_writes_private_key_0600_and_public_jwks(tmp_path: Path, alg: str, kty: str) -> None:
    key, jwks = tmp_path / "k.json", tmp_path / "j.json"
    out = ok(cli("client", "keygen", "--alg", alg, "--private-key-out", str(key), "--jwks-out", str(jwks),
                 data_dir=tmp_path / "data"))
    assert str(key) in out and str(jwks) in out
    assert mode(key) == 0o600
    private = json.loads(key.read_text())
    assert private["kty"] == kty and "d" in private
    public = json.loads(jwks.read_text())
    assert len(public["keys"]) == 1
    pub = public["keys"][0]
    assert not PRIVATE_JWK_MEMBERS & set(pub), pub
    assert pub["kty"] == kty and pub["alg"] == alg and pub["kid"] == private["kid"]
    # the public half really belongs to the private key
    shared = {"x", "y", "crv"} if kty == "EC" else {"n", "e"}
    assert {k: pub[k] for k in shared} == {k: private[k] for k in shared}
    # keygen touches no data directory
    assert not (tmp_path / "data").exists()


def test_client_keygen_over_an_existing_file_still_leaves_it_0600(tmp_path: Path) -> None:
    key, jwks = tmp_path / "k.json", tmp_path / "j.json"
    key.write_text("{}")
    key.chmod(0o644)
    ok(cli("client", "keygen", "--private-key-out", str(key), "--jwks-out", str(jwks), data_dir=None))
    assert "d" in json.loads(key.read_text())
    assert mode(key) == 0o600, f"private key written with mode {oct(mode(key))}"


def test_client_keygen_rejects_unknown_alg(tmp_path: Path) -> None:
    proc = cli("client", "keygen", "--alg", "HS256", "--private-key-out", str(tmp_path / "k"),
               "--jwks-out", str(tmp_path / "j"), data_dir=None, real=True)
    assert proc.returncode == 2
    assert "HS256" in proc.stderr
    assert not (tmp_path / "k").exists()


# ------------------------------------------------------------------ client registry
def test_client_register_list_disable_enable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _, jwks = keygen(tmp_path)
    out = ok(cli("client", "register", "--name", "Lab interface", "--jwks-file", str(jwks),
                 "--scopes", "system/Patient.rs", "--organization", "Organization/1", data_dir=data))
    cid = out.strip()
    assert cid and "\n" not in cid and " " not in cid

    listing = ok(cli("client", "list", data_dir=data)).splitlines()
    assert listing == [f"{cid}\tLab interface\tbackend\tenabled\tsystem/Patient.rs"]
    assert list_json(data) == [{"client_id": cid, "name": "Lab interface", "kind": "backend",
                                "scopes": "system/Patient.rs", "organization": "Organization/1",
                                "disabled": False, "jurisdiction": None}]

    assert ok(cli("client", "disable", cid, data_dir=data)).strip() == f"disabled {cid}"
    assert ok(cli("client", "list", data_dir=data)).split("\t")[3] == "disabled"
    assert list_json(data)[0]["disabled"] is True

    assert ok(cli("client", "enable", cid, data_dir=data)).strip() == f"enabled {cid}"
    assert list_json(data)[0]["disabled"] is False

    # a second client with a chosen id and a JWKS URL
    ok(cli("client", "register", "--name", "Second", "--jwks-url", "https://lab.example.org/jwks.json",
           "--scopes", "system/Observation.cruds system/Patient.read", "--client-id", "lab-2", data_dir=data))
    rows = list_json(data)
    assert [r["client_id"] for r in rows] == [cid, "lab-2"]
    assert rows[1]["scopes"] == "system/Observation.cruds system/Patient.read"
    assert rows[1]["organization"] is None


@pytest.mark.parametrize("command,real", [("disable", True), ("enable", False)])
def test_disable_or_enable_unknown_client_fails(tmp_path: Path, command: str, real: bool) -> None:
    proc = cli("client", command, "no-such-client", data_dir=tmp_path / "data", real=real)
    assert proc.returncode == 1
    assert "no client no-such-client" in proc.stderr
    assert proc.stdout == ""


def _jwks_with_private_key(tmp_path: Path) -> Path:
    key, _ = keygen(tmp_path, "priv")
    path = tmp_path / "private-jwks.json"
    path.write_text(json.dumps({"keys": [json.loads(key.read_text())]}))
    return path


@pytest.mark.parametrize("case,message", [
    ("both", "exactly one"),
    ("neither", "exactly one"),
    ("private-jwks", "public keys only"),
    ("empty-jwks", "non-empty"),
    ("invalid-scope", "invalid scope(s): system/Patient.xyz"),
    ("ftp-jwks-url", "http(s)"),
    ("malformed-json", "JWKS"),
])
def test_client_register_rejects_bad_input(tmp_path: Path, case: str, message: str) -> None:
    data = tmp_path / "data"
    _, jwks = keygen(tmp_path)
    scopes = "system/Patient.rs"
    if case == "both":
        extra = ["--jwks-file", str(jwks), "--jwks-url", "https://example.org/jwks.json"]
    elif case == "neither":
        extra = []
    elif case == "private-jwks":
        extra = ["--jwks-file", str(_jwks_with_private_key(tmp_path))]
    elif case == "empty-jwks":
        empty = tmp_path / "empty.json"
        empty.write_text('{"keys": []}')
        extra = ["--jwks-file", str(empty)]
    elif case == "invalid-scope":
        extra, scopes = ["--jwks-file", str(jwks)], "system/Patient.rs system/Patient.xyz"
    elif case == "ftp-jwks-url":
        extra = ["--jwks-url", "ftp://example.org/jwks.json"]
    else:
        broken = tmp_path / "broken.json"
        broken.write_text('{"keys": [')
        extra = ["--jwks-file", str(broken)]
    proc = cli("client", "register", "--name", "X", *extra, "--scopes", scopes,
               "--organization", "Organization/1", data_dir=data)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Error: "), proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    assert list_json(data) == []  # nothing was registered


def test_client_register_duplicate_client_id_is_refused_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _, jwks = keygen(tmp_path)
    args = ("client", "register", "--name", "A", "--jwks-file", str(jwks), "--scopes", "system/Patient.rs",
            "--client-id", "fixed-id")
    assert ok(cli(*args, data_dir=data)).strip() == "fixed-id"
    proc = cli(*args, data_dir=data)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "fixed-id" in proc.stderr
    assert len(list_json(data)) == 1


# ------------------------------------------------------------------ keys
def test_keys_status_and_rotate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    status = ok(cli("keys", "status", data_dir=data))
    m = re.match(r"active master key: ([0-9a-f]{16}) \(file\)\n", status)
    assert m, status
    old = m.group(1)
    counts = dict(re.findall(r"^  ([0-9a-f]{16}): (\d+) data keys$", status, re.M))
    assert list(counts) == [old] and int(counts[old]) > 0
    ring = data / "master-keys.json"
    assert json.loads(ring.read_text())["active"] == old

    out = ok(cli("keys", "rotate", data_dir=data))
    m2 = re.fullmatch(r"active master key ([0-9a-f]{16}); re-wrapped (\d+) data keys; "
                      r"retired (\d+) old master key\(s\)\n", out)
    assert m2, out
    new = m2.group(1)
    assert new != old
    assert int(m2.group(2)) == int(counts[old])
    assert m2.group(3) == "1"

    assert mode(ring) == 0o600
    doc = json.loads(ring.read_text())
    assert doc["active"] == new and list(doc["keys"]) == [new]

    status2 = ok(cli("keys", "status", data_dir=data))
    assert status2.startswith(f"active master key: {new} (file)\n")
    assert dict(re.findall(r"^  ([0-9a-f]{16}): (\d+) data keys$", status2, re.M)) == {new: counts[old]}
    # everything is still readable under the new master key
    assert ok(cli("audit", "verify", data_dir=data)).startswith("OK: 0 audit records verified")


def test_keys_rotate_new_key_from_stdin(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(cli("keys", "status", data_dir=data))
    raw = os.urandom(32)
    proc = cli("keys", "rotate", "--new-key-stdin", data_dir=data, input=base64.b64encode(raw).decode() + "\n")
    ok(proc)
    doc = json.loads((data / "master-keys.json").read_text())
    assert doc["keys"] == {doc["active"]: base64.b64encode(raw).decode()}
    assert proc.stdout.startswith(f"active master key {doc['active']};")
    assert mode(data / "master-keys.json") == 0o600


def test_keys_rotate_refuses_bad_stdin_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(cli("keys", "status", data_dir=data))
    before = (data / "master-keys.json").read_text()
    proc = cli("keys", "rotate", "--new-key-stdin", data_dir=data, input=base64.b64encode(b"short").decode())
    assert proc.returncode != 0
    assert (data / "master-keys.json").read_text() == before


def test_keys_status_with_env_master_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = base64.b64encode(os.urandom(32)).decode()
    out = ok(cli("keys", "status", data_dir=data, FHIRSERVER_MASTER_KEY=key))
    assert re.match(r"active master key: [0-9a-f]{16} \(environment\)\n", out), out
    assert not (data / "master-keys.json").exists()
    # the key in the environment is required afterwards: without it nothing can be unwrapped
    proc = cli("audit", "verify", data_dir=data)
    assert proc.returncode != 0


# ------------------------------------------------------------------ audit
def test_audit_verify_fresh_database(tmp_path: Path) -> None:
    out = ok(cli("audit", "verify", data_dir=tmp_path / "data"))
    assert re.fullmatch(r"OK: 0 audit records verified; tree root " + hashlib.sha256(b"").hexdigest() + r"; .*\n",
                        out), out


# ------------------------------------------------------------------ with demo data (serve --demo)
@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A data dir filled by a real `serve --demo` run (stopped again); returns (dir, loaded count)."""
    root = tmp_path_factory.mktemp("demo")
    data, port = root / "data", free_port()
    log = root / "serve.out"
    with log.open("w") as fh:
        proc = subprocess.Popen([*CLI, "serve", "--demo", "--port", str(port), "--workers", "1", "--threads", "2"],
                                env=clean_env(data, XDG_RUNTIME_DIR=str(root)), cwd=root, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 45
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    m = re.search(r"loaded (\d+) demo resources", log.read_text())
    assert m, log.read_text()
    return data, int(m.group(1))


def _copy(demo: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(demo, target)
    return target


def _search_total(http, headers: dict[str, str], query: str) -> int:  # type: ignore[no-untyped-def]
    resp = http.get(f"/fhir/{query}", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["total"]


def test_db_reindex_reports_count_and_search_still_works(demo_data: tuple[Path, int], tmp_path: Path) -> None:
    data = _copy(demo_data[0], tmp_path)
    loaded = demo_data[1]
    assert loaded == 92
    out = ok(cli("db", "reindex", data_dir=data))
    m = re.fullmatch(r"re-indexed (\d+) resources\n", out)
    assert m, out
    # the demo resources (AuditEvents are access records, indexed when written: docs/audit.md)
    assert int(m.group(1)) == loaded
    # twice: same count, indexes not duplicated
    assert ok(cli("db", "reindex", data_dir=data)) == out

    # searches over re-indexed data (including blind-indexed names) give the right answers
    settings = load_settings(data_dir=str(data), base_url="http://testserver/fhir", audit_sequencer=False)
    app = create_app(settings, migrate=False)
    try:
        http = app.test_client()
        form = token_request_form(load_private_key(data / "demo-client-key.json"), "demo-backend",
                                  settings.token_url, "system/*.rs")
        resp = http.post("/auth/token", data=form)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        headers = {"Authorization": f"Bearer {resp.get_json()['access_token']}"}
        assert _search_total(http, headers, "Patient") == 4
        assert _search_total(http, headers, "Patient?name=alice") == 1
        assert _search_total(http, headers, "Patient?family:exact=Baker") == 1
        assert _search_total(http, headers, "Observation?subject=Patient/demo-alice") == 20
        assert _search_total(http, headers, "Observation?subject=Patient/demo-alice&code=http://loinc.org|8867-4") == 5
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_db_reindex_on_empty_database(tmp_path: Path) -> None:
    assert ok(cli("db", "reindex", data_dir=tmp_path / "data")) == "re-indexed 0 resources\n"


def test_keys_rotate_with_data_keeps_everything_readable(demo_data: tuple[Path, int], tmp_path: Path) -> None:
    data = _copy(demo_data[0], tmp_path)
    before = ok(cli("keys", "status", data_dir=data))
    total = sum(int(n) for n in re.findall(r": (\d+) data keys", before))
    assert total >= 4 + 3  # one per demo patient + shared/audit/blind-index
    out = ok(cli("keys", "rotate", data_dir=data))
    assert f"re-wrapped {total} data keys; retired 1 old master key(s)" in out
    assert mode(data / "master-keys.json") == 0o600
    assert ok(cli("audit", "verify", data_dir=data)).startswith("OK: 1 audit records verified")


def test_audit_verify_on_demo_data_and_detects_tampering(demo_data: tuple[Path, int], tmp_path: Path) -> None:
    data = _copy(demo_data[0], tmp_path)
    out = ok(cli("audit", "verify", data_dir=data))
    m = re.fullmatch(r"OK: 1 audit records verified; tree root ([0-9a-f]{64}); \d+ checkpoints .*\n", out)
    assert m and m.group(1) != hashlib.sha256(b"").hexdigest(), out

    conn = sqlite3.connect(data / "fhirserver.sqlite3")
    try:
        with conn:
            conn.execute("update access_record set recorded_us = recorded_us + 1 where seq = 0")
    finally:
        conn.close()
    proc = cli("audit", "verify", data_dir=data, real=True)
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "seq=0" in proc.stderr
    assert proc.stdout == ""
