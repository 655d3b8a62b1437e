"""`fhirserver backup` / `restore` (issue "Production at scale", operations): a restore drill --
back up a loaded server while it runs, restore into a fresh directory, every resource reads back
the same and `audit verify` passes -- and the master key is never in the backup."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from fhirserver.app import create_app
from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from tests.conftest import make_settings
from tests.support.cli import cli, ok

SCOPE = "system/*.cruds"


def _client(app: Any, key: Any, client_id: str | None = None) -> tuple[Any, dict[str, str], str]:
    svc = app.extensions["fhirserver"]
    if client_id is None:
        client_id = register_backend_client(svc.engine, "drill", SCOPE, jwks=public_jwks(key)).client_id
    http = app.test_client()
    resp = http.post("/auth/token", data=token_request_form(key, client_id, svc.settings.token_url, SCOPE))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return http, {"Authorization": f"Bearer {resp.get_json()['access_token']}"}, client_id


def test_restore_drill(tmp_path: Path) -> None:
    keys = tmp_path / "key-backup" / "ring.json"
    keys.parent.mkdir()
    signing = keys.parent / "audit-signing-key.pem"  # kept like the master key, outside the data
    env = {"FHIRSERVER_MASTER_KEY_FILE": str(keys), "FHIRSERVER_AUDIT_SIGNING_KEY_FILE": str(signing)}
    settings = make_settings(tmp_path / "live", master_key_file=str(keys), audit_signing_key_file=str(signing))
    app = create_app(settings)
    key = generate_key("ES384")
    http, h, client_id = _client(app, key)
    ids = []
    for i in range(5):
        pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": f"Drill{i}"}]},
                        headers=h).get_json()["id"]
        oid = http.post("/fhir/Observation", json={"resourceType": "Observation", "status": "final",
                                                   "code": {"text": "weight"}, "subject": {"reference": f"Patient/{pid}"},
                                                   "valueQuantity": {"value": 70.0 + i, "unit": "kg"}},
                        headers=h).get_json()["id"]
        ids += [("Patient", pid), ("Observation", oid)]
    before = {ref: http.get(f"/fhir/{ref[0]}/{ref[1]}", headers=h).get_data() for ref in ids}

    ok(cli("audit", "checkpoint", data_dir=settings.data_dir, real=True, **env))  # as the server does each minute
    out = tmp_path / "backup"
    ok(cli("backup", "--out", str(out), data_dir=settings.data_dir, real=True, **env))  # while the app is open
    app.extensions["fhirserver"].engine.dispose()
    assert not any("master" in p.name or p.read_bytes() in (keys.read_bytes(), signing.read_bytes())
                   for p in out.iterdir())
    manifest = json.loads((out / "backup-manifest.json").read_text())
    assert manifest["master_key_ids"] and "not in this backup" in manifest["note"]

    restored = make_settings(tmp_path / "restored", master_key_file=str(keys), audit_signing_key_file=str(signing))
    ok(cli("restore", "--from", str(out), data_dir=restored.data_dir, real=True, **env))
    verified = ok(cli("audit", "verify", data_dir=restored.data_dir, real=True, **env))
    assert verified.startswith("OK:") and "1 checkpoints in the database" in verified, verified
    app2 = create_app(restored)
    try:
        http2, h2, _ = _client(app2, key, client_id)  # the client registry came back too
        after = {ref: http2.get(f"/fhir/{ref[0]}/{ref[1]}", headers=h2).get_data() for ref in ids}
        assert after == before
    finally:
        app2.extensions["fhirserver"].engine.dispose()

    # refusals: a target that holds a database, a changed backup, a restore without the key
    proc = cli("restore", "--from", str(out), data_dir=restored.data_dir, real=True, **env)
    assert proc.returncode != 0 and "already exists" in proc.stderr
    with sqlite3.connect(out / "fhirserver.sqlite3") as db:
        db.execute("UPDATE resource SET id = id")
        db.execute("PRAGMA user_version = 7")
    proc = cli("restore", "--from", str(out), data_dir=tmp_path / "r2" / "data", real=True, **env)
    assert proc.returncode != 0 and "does not match the backup manifest" in proc.stderr


def test_restore_without_the_master_key_fails_in_one_line(tmp_path: Path) -> None:
    data, keys = tmp_path / "data", tmp_path / "ring.json"
    env = {"FHIRSERVER_MASTER_KEY_FILE": str(keys)}
    ok(cli("client", "list", data_dir=data, real=True, **env))
    ok(cli("backup", "--out", str(tmp_path / "b"), data_dir=data, real=True, **env))
    proc = cli("restore", "--from", str(tmp_path / "b"), data_dir=tmp_path / "fresh", real=True,
               FHIRSERVER_MASTER_KEY_FILE=str(tmp_path / "missing.json"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "master key" in proc.stderr
