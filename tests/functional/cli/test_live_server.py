"""A real `fhirserver serve --demo` (gunicorn) on 127.0.0.1, driven over HTTP with `requests` and
through the CLI as subprocesses, the way the README tells a user to do it."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.live import free_port, server_env, start_server, stop_server

CLI = [sys.executable, "-m", "fhirserver"]
DEMO_PATIENTS = {"demo-alice", "demo-bob", "demo-chloe", "demo-dev"}
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"










class LiveServer:
    """`fhirserver serve --demo` on a fixed data dir and port; counts the audited requests it sends
    (every /fhir request and every token request, per the README)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.root_url}/fhir"
        self.token_url = f"{self.root_url}/auth/token"
        self.proc: subprocess.Popen[bytes] | None = None
        self.outputs: list[str] = []
        self.audited_requests = 0
        self.http = requests.Session()

    def start(self) -> str:
        assert self.proc is None
        log = self.root / f"serve-{len(self.outputs)}.log"
        self.proc = start_server(["serve", "--demo", "--port", str(self.port), "--workers", "1", "--threads", "4"],
                                 server_env(self.root, self.data_dir), self.root, log, self.port)
        self.outputs.append(log.read_text())
        return self.outputs[-1]

    def ensure_running(self) -> None:
        if self.proc is None:
            self.start()

    def stop(self) -> None:
        self.http.close()  # idle keep-alive connections would hold up gunicorn's graceful stop
        if self.proc is not None:
            stop_server(self.proc)
            assert self.proc.returncode is not None
            self.proc = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        if args[:2] == ("client", "token"):
            self.audited_requests += 1
        return subprocess.run([*CLI, *args], env=server_env(self.root, self.data_dir), cwd=self.root,
                              capture_output=True, text=True, timeout=60)

    def token(self, scope: str = "system/*.rs", client_id: str = "demo-backend", key_file: Path | None = None) -> str:
        key_file = key_file or self.key_file
        proc = self.cli("client", "token", "--client-id", client_id, "--key-file", str(key_file), "--scope", scope,
                        "--token-url", self.token_url)
        assert proc.returncode == 0, proc.stderr
        token = proc.stdout.strip()
        assert token and "\n" not in token and " " not in token
        return token

    @property
    def key_file(self) -> Path:
        m = re.search(r"private key in (\S+)\)", self.outputs[0])
        assert m, self.outputs[0]
        return Path(m.group(1))

    def request(self, method: str, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if path.startswith("/fhir") or path.startswith("/auth"):
            self.audited_requests += 1
        # a fresh connection per request: a kept-alive one the server closes as idle just as the
        # next request goes out is reset under load (a CI run lost a request that way), and these
        # tests count every request
        headers.setdefault("Connection", "close")
        return self.http.request(method, f"{self.root_url}{path}", headers=headers, timeout=30, **kw)

    def get(self, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        return self.request("GET", path, token, **kw)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("live"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live(live_server: LiveServer) -> LiveServer:
    """The module's server, (re)started if an earlier test stopped it."""
    live_server.ensure_running()
    return live_server


@pytest.fixture(scope="module")
def read_token(live_server: LiveServer) -> str:
    live_server.ensure_running()
    return live_server.token("system/*.rs")


def searchset(resp: requests.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    bundle = resp.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


# ------------------------------------------------------------------ start-up
def test_demo_start_prints_instructions(live: LiveServer) -> None:
    out = live.outputs[0]
    assert f"FHIR base URL : {live.base}\n" in out
    assert f"curl {live.base}/metadata" in out
    assert f"curl {live.base}/.well-known/smart-configuration" in out
    assert "loaded 92 demo resources" in out
    assert "Demo client   : demo-backend " in out
    assert f"--client-id demo-backend --key-file {live.key_file} " in out
    assert f"--token-url {live.token_url}" in out
    assert f"FHIRSERVER_DATA_DIR={live.data_dir} " in out
    # the printed key file is the demo client's private key, in the data dir, readable by the owner only
    assert live.key_file == live.data_dir / "demo-client-key.json"
    assert stat.S_IMODE(live.key_file.stat().st_mode) == 0o600
    assert "d" in json.loads(live.key_file.read_text())
    assert stat.S_IMODE((live.data_dir / "master-keys.json").stat().st_mode) == 0o600


# ------------------------------------------------------------------ reading demo data with a token
def test_patient_search_returns_demo_patients(live: LiveServer, read_token: str) -> None:
    bundle = searchset(live.get("/fhir/Patient", read_token))
    assert bundle["total"] >= 4
    ids = {e["resource"]["id"] for e in bundle["entry"]}
    assert ids >= DEMO_PATIENTS
    for entry in bundle["entry"]:
        assert entry["resource"]["resourceType"] == "Patient"
        assert entry["fullUrl"] == f"{live.base}/Patient/{entry['resource']['id']}"


def test_read_demo_alice(live: LiveServer, read_token: str) -> None:
    resp = live.get("/fhir/Patient/demo-alice", read_token)
    assert resp.status_code == 200, resp.text
    alice = resp.json()
    assert alice["resourceType"] == "Patient" and alice["id"] == "demo-alice"
    assert alice["name"][0]["family"] == "Anders" and alice["name"][0]["given"] == ["Alice"]
    assert alice["birthDate"] == "1980-04-12"
    assert resp.headers["ETag"] == f'W/"{alice["meta"]["versionId"]}"'
    assert live.get("/fhir/Patient/no-such-patient", read_token).status_code == 404


def test_observations_by_subject_only_that_patient(live: LiveServer, read_token: str) -> None:
    bundle = searchset(live.get("/fhir/Observation", read_token,
                                params={"subject": "Patient/demo-alice", "_count": "100"}))
    entries = bundle["entry"]
    assert bundle["total"] == len(entries) == 20  # 5 days x 4 vital signs
    for entry in entries:
        assert entry["resource"]["resourceType"] == "Observation"
        assert entry["resource"]["subject"] == {"reference": "Patient/demo-alice"}
    # ...while the server holds observations of the other demo patients too
    assert searchset(live.get("/fhir/Observation", read_token, params={"_count": "1"}))["total"] == 80

    heart = searchset(live.get("/fhir/Observation", read_token,
                               params={"subject": "Patient/demo-alice", "code": "http://loinc.org|8867-4"}))
    assert heart["total"] == 5
    assert all(e["resource"]["code"]["coding"][0]["code"] == "8867-4" for e in heart["entry"])


# ------------------------------------------------------------------ public endpoints
def test_metadata_is_public_and_advertises_the_token_endpoint(live: LiveServer) -> None:
    resp = live.get("/fhir/metadata")
    assert resp.status_code == 200, resp.text
    cap = resp.json()
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"
    assert cap["implementation"]["url"] == live.base
    security = cap["rest"][0]["security"]
    oauth = [e for e in security["extension"] if e["url"] == OAUTH_URIS]
    assert len(oauth) == 1
    assert {"url": "token", "valueUri": live.token_url} in oauth[0]["extension"]
    types = {r["type"] for r in cap["rest"][0]["resource"]}
    assert {"Patient", "Observation", "QuestionnaireResponse", "Consent", "AuditEvent"} <= types


def test_smart_configuration_is_public(live: LiveServer) -> None:
    resp = live.get("/fhir/.well-known/smart-configuration")
    assert resp.status_code == 200, resp.text
    conf = resp.json()
    assert conf["token_endpoint"] == live.token_url
    assert "private_key_jwt" in conf["token_endpoint_auth_methods_supported"]
    assert "client_credentials" in conf["grant_types_supported"]


# ------------------------------------------------------------------ refusals
def test_read_only_token_cannot_create(live: LiveServer, read_token: str) -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "Intruder"}]}
    resp = live.request("POST", "/fhir/Patient", read_token, data=json.dumps(patient),
                        headers={"Content-Type": "application/fhir+json"})
    assert resp.status_code == 403, resp.text
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "forbidden"
    assert "Location" not in resp.headers
    # nothing was created
    assert searchset(live.get("/fhir/Patient", read_token, params={"family": "Intruder"}))["total"] == 0


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/Patient/demo-alice", "/fhir/AuditEvent"])
def test_no_token_is_401_with_www_authenticate(live: LiveServer, path: str) -> None:
    resp = live.get(path)
    assert resp.status_code == 401, resp.text
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "Anders" not in resp.text


def test_unknown_token_is_401_invalid_token(live: LiveServer) -> None:
    resp = live.get("/fhir/Patient", "not-a-real-token")
    assert resp.status_code == 401, resp.text
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_token_request_for_unregistered_client_is_refused(live: LiveServer) -> None:
    proc = live.cli("client", "token", "--client-id", "nobody", "--key-file", str(live.key_file),
                    "--scope", "system/*.rs", "--token-url", live.token_url)
    assert proc.returncode != 0
    assert "token request failed (4" in proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------------ CLI against the running server
def test_client_registered_and_disabled_by_cli_while_server_runs(live: LiveServer, tmp_path: Path) -> None:
    key, jwks = tmp_path / "key.json", tmp_path / "jwks.json"
    assert live.cli("client", "keygen", "--private-key-out", str(key), "--jwks-out", str(jwks)).returncode == 0
    reg = live.cli("client", "register", "--name", "Live lab", "--jwks-file", str(jwks),
                   "--scopes", "system/Patient.rs", "--organization", "Organization/lab-1")
    assert reg.returncode == 0, reg.stderr
    cid = reg.stdout.strip()

    token = live.token("system/Patient.rs", client_id=cid, key_file=key)
    assert searchset(live.get("/fhir/Patient", token))["total"] >= 4
    # registered for Patient only: Observation is out of reach
    assert live.get("/fhir/Observation", token).status_code == 403

    dis = live.cli("client", "disable", cid)
    assert dis.returncode == 0, dis.stderr
    resp = live.get("/fhir/Patient", token)
    assert resp.status_code == 401, resp.text
    refused = live.cli("client", "token", "--client-id", cid, "--key-file", str(key), "--scope",
                       "system/Patient.rs", "--token-url", live.token_url)
    assert refused.returncode != 0
    assert live.cli("client", "enable", cid).returncode == 0


# ------------------------------------------------------------------ restart and audit (keep these last)
def test_restart_keeps_data_and_issued_tokens(live: LiveServer, read_token: str) -> None:
    patients_before = searchset(live.get("/fhir/Patient", read_token))["total"]
    observations_before = searchset(live.get("/fhir/Observation", read_token, params={"_count": "1"}))["total"]
    key_before = live.key_file.read_text()

    live.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{live.root_url}/healthz", timeout=2)
    out = live.start()

    assert "(demo data already present)" in out
    assert "loaded" not in out
    assert f"private key in {live.key_file})" in out
    assert live.key_file.read_text() == key_before  # same demo client key

    # the token issued by the first server process still works (tokens are stored server-side)
    assert searchset(live.get("/fhir/Patient", read_token))["total"] == patients_before
    assert searchset(live.get("/fhir/Observation", read_token, params={"_count": "1"}))["total"] == observations_before
    ids = [e["resource"]["id"] for e in searchset(live.get("/fhir/Patient", read_token))["entry"]]
    assert sorted(ids) == sorted(set(ids))
    # and the demo key still gets new tokens
    assert live.get("/fhir/Patient/demo-bob", live.token()).status_code == 200


def test_audit_verify_after_stop_covers_every_request(live: LiveServer, read_token: str) -> None:
    # make sure this test has something to count even when run alone
    assert live.get("/fhir/Patient/demo-alice", read_token).status_code == 200
    made = live.audited_requests
    live.stop()  # verify a quiescent database; a later test gets the server restarted by `live`
    proc = live.cli("audit", "verify")
    assert proc.returncode == 0, proc.stderr
    m = re.fullmatch(r"OK: (\d+) audit records verified; tree root ([0-9a-f]{64}); .*\n", proc.stdout)
    assert m, proc.stdout
    # README: every /fhir request and every token request writes exactly one AuditEvent;
    # plus the one recording the demo import
    assert int(m.group(1)) >= made + 1
    assert int(m.group(1)) == made + 1


# ------------------------------------------------------------------ serve with --config
def test_serve_demo_honours_data_dir_from_config_file(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "configured-data"
    cfg = tmp_path / "fhirserver.toml"
    cfg.write_text(f'[fhirserver]\ndata_dir = "{data}"\nbase_url = "http://127.0.0.1:{port}/fhir"\n')
    log = tmp_path / "serve.log"
    proc = start_server(["--config", str(cfg), "serve", "--demo", "--port", str(port), "--workers", "1"],
                        server_env(tmp_path, None), tmp_path, log, port)
    try:
        out = log.read_text()
    finally:
        stop_server(proc)
    assert f"private key in {data / 'demo-client-key.json'})" in out, out
    assert (data / "fhirserver.sqlite3").is_file()
    assert not (tmp_path / "fhirserver-demo").exists()


def test_serve_with_config_without_base_url_advertises_its_own_port(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "fhirserver.toml"
    cfg.write_text(f'[fhirserver]\ndata_dir = "{data}"\n')
    log = tmp_path / "serve.log"
    proc = start_server(["--config", str(cfg), "serve", "--port", str(port), "--workers", "1"],
                        server_env(tmp_path, None), tmp_path, log, port)
    try:
        cap = requests.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=30).json()
        smart = requests.get(f"http://127.0.0.1:{port}/fhir/.well-known/smart-configuration", timeout=30).json()
    finally:
        stop_server(proc)
    assert smart["token_endpoint"] == f"http://127.0.0.1:{port}/auth/token"
    assert cap["implementation"]["url"] == f"http://127.0.0.1:{port}/fhir"


def test_a_first_demo_start_with_several_workers_comes_up(tmp_path: Path) -> None:
    """Issue 29, item 10: every worker used to register the portal's client on a fresh data dir, and
    a loser of that race took the server down (UNIQUE constraint failed). Three fresh demo servers
    with four workers each, started at once: each comes up, and each of its workers serves."""
    from concurrent.futures import ThreadPoolExecutor

    def one(n: int) -> tuple[str, set[int]]:
        root = tmp_path / f"s{n}"
        root.mkdir()
        port = free_port()
        log = root / "serve.log"
        proc = start_server(["serve", "--demo", "--port", str(port), "--workers", "4", "--threads", "1"],
                            server_env(root, root / "data"), root, log, port)
        try:
            # every worker boots and stays: gunicorn restarts none of them, so the log has exactly 4 boots
            pids: set[int] = set()
            for _ in range(40):
                requests.get(f"http://127.0.0.1:{port}/portal/", timeout=30).raise_for_status()
            pids = {int(p) for p in re.findall(r"Booting worker with pid: (\d+)", log.read_text())}
            return log.read_text(), pids
        finally:
            stop_server(proc)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    for text, pids in results:
        assert "IntegrityError" not in text and "Worker failed to boot" not in text, text[-2000:]
        assert len(pids) == 4, text[-2000:]
