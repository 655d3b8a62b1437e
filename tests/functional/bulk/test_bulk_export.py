"""FHIR Bulk Data export ($export): kick-off, polling, manifest, NDJSON files, cancel, restart,
expiry, consent filtering and access rules, through HTTP against a server whose background
worker runs the jobs. Expected contents are derived from what the same client can search."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exists

from fhirserver.app import create_app
from fhirserver.consent.hooks import NoConsentFiltering
from fhirserver.db.schema import idx_token
from tests.conftest import AUDITOR_SETTINGS, BASE, db_path
from tests.support.bulk import ASYNC, Server, _app, _local


@pytest.fixture
def server(tmp_path: Path) -> Any:
    app = _app(tmp_path)
    yield Server(app)
    app.extensions["fhirserver"].engine.dispose()


def seed(srv: Server, token: str, n: int = 3) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {"Patient": [], "Observation": []}
    for i in range(n):
        pid = srv.create(token, {"resourceType": "Patient", "name": [{"family": f"Bulkfam{i}"}]})
        ids["Patient"].append(pid)
        for code in ("8867-4", "718-7"):
            ids["Observation"].append(srv.create(token, {
                "resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 70 + i}}))
    return ids


def test_system_export_happy_path(server: Server) -> None:
    token = server.token()
    seed(server, token)
    resp = server.kickoff(token)
    assert resp.status_code == 202 and resp.headers["Content-Location"].startswith(f"{BASE}/$export-poll-status?")
    done = server.wait(token, resp.headers["Content-Location"])
    assert done.status_code == 200, done.get_data(as_text=True)
    manifest = done.get_json()
    assert manifest["requiresAccessToken"] is True and manifest["request"] == f"{BASE}/$export"
    assert manifest["transactionTime"].endswith("Z") and "Expires" in done.headers
    files = server.files(token, manifest)
    for rtype in ("Patient", "Observation", "QuestionnaireResponse", "Consent"):
        assert {r["id"] for r in files.get(rtype, [])} == server.searchable(token, rtype), rtype
    assert "AuditEvent" not in files  # only when asked for with _type


def test_type_since_and_type_filter(server: Server) -> None:
    token = server.token()
    ids = seed(server, token)
    time.sleep(0.01)
    now = time.time()  # one reading: seconds and milliseconds from two clocks could straddle a second
    cut = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    time.sleep(0.01)
    late = server.create(token, {"resourceType": "Patient", "name": [{"family": "Latecomer"}]})
    resp = server.kickoff(token, _type="Patient", _since=cut)
    files = server.files(token, server.wait(token, resp.headers["Content-Location"]).get_json())
    assert [r["id"] for r in files["Patient"]] == [late] and set(files) == {"Patient"}
    resp = server.kickoff(token, _type="Observation", _typeFilter="Observation?code=http://loinc.org|718-7")
    files = server.files(token, server.wait(token, resp.headers["Content-Location"]).get_json())
    expected = server.searchable(token, "Observation", code="http://loinc.org|718-7")
    assert {r["id"] for r in files["Observation"]} == expected and len(expected) == len(ids["Patient"])


def test_kickoff_errors(server: Server) -> None:
    token = server.token()
    assert server.http.get("/fhir/$export", headers=server.h(token)).status_code == 400  # no Prefer
    assert server.kickoff(token, _outputFormat="text/csv").status_code == 400
    assert server.kickoff(token, _type="Basic").status_code == 400  # not served
    assert server.kickoff(token, _since="yesterday").status_code == 400
    assert server.kickoff(token, _typeFilter="Observation?bogus-param=1", _type="Observation").status_code == 400
    assert server.http.get("/fhir/$export", headers=ASYNC).status_code == 401
    narrow = server.token("system/Patient.rs", name="narrow")
    denied = server.kickoff(narrow, _type="Observation")
    assert denied.status_code == 403 and denied.get_json()["resourceType"] == "OperationOutcome"
    assert server.http.put("/fhir/$export", headers=server.h(token)).status_code == 405


def test_only_the_starting_client_sees_status_and_files(server: Server) -> None:
    token = server.token()
    seed(server, token, 1)
    status_url = server.kickoff(token).headers["Content-Location"]
    manifest = server.wait(token, status_url).get_json()
    other = server.token("system/*.rs", name="other")
    assert server.http.get(_local(status_url), headers=server.h(other)).status_code == 404
    file_url = _local(manifest["output"][0]["url"])
    assert server.http.get(file_url, headers=server.h(other)).status_code == 404
    assert server.http.get(file_url).status_code == 401


def test_patient_instance_export_is_one_compartment(server: Server) -> None:
    token = server.token()
    ids = seed(server, token)
    pid = ids["Patient"][1]
    resp = server.kickoff(token, path=f"Patient/{pid}/$export")
    files = server.files(token, server.wait(token, resp.headers["Content-Location"]).get_json())
    assert [r["id"] for r in files["Patient"]] == [pid]
    assert {r["subject"]["reference"] for r in files["Observation"]} == {f"Patient/{pid}"}
    assert server.kickoff(token, path="Patient/nobody/$export").status_code == 404


def test_consent_hook_filters_exports(server: Server) -> None:
    token = server.token()
    seed(server, token)

    class HideCode(NoConsentFiltering):
        def predicates(self, principal: Any, rtype: str, interaction: str, res: Any) -> list[Any]:
            if rtype != "Observation":
                return []
            t = idx_token.alias()
            return [~exists().where(t.c.resource_pk == res.c.pk, t.c.param == "code", t.c.code == "718-7")]

    server.svc.consent = HideCode()
    try:
        resp = server.kickoff(token, _type="Observation")
        files = server.files(token, server.wait(token, resp.headers["Content-Location"]).get_json())
        codes = {c["code"] for r in files["Observation"] for c in r["code"]["coding"]}
        assert codes == {"8867-4"}
        assert {r["id"] for r in files["Observation"]} == server.searchable(token, "Observation")
    finally:
        server.svc.consent = NoConsentFiltering()


def _raw(settings: Any, sql: str) -> list[Any]:
    import sqlite3

    cx = sqlite3.connect(db_path(settings))
    try:
        return cx.execute(sql).fetchall()
    finally:
        cx.close()


def test_cancel_deletes_output_and_restart_resumes(tmp_path: Path) -> None:
    app = _app(tmp_path, bulk_worker=False)  # nothing runs jobs: they stay queued
    srv = Server(app)
    token = srv.token()
    seed(srv, token)
    cancelled = srv.kickoff(token).headers["Content-Location"]
    pending = srv.kickoff(token).headers["Content-Location"]
    assert srv.http.get(_local(pending), headers=srv.h(token)).status_code == 202
    assert srv.http.delete(_local(cancelled), headers=srv.h(token)).status_code == 202
    assert srv.http.get(_local(cancelled), headers=srv.h(token)).status_code == 404
    # a worker died mid-job: status running, stale heartbeat, a partial file left behind
    settings = srv.svc.settings
    with srv.svc.engine.begin() as conn:
        conn.execute(sa.text("UPDATE export_job SET status='running', heartbeat_us=1 WHERE status='queued'"))
        conn.execute(sa.text("INSERT INTO export_file (job_id, name, type, count, key_id, body) SELECT id, "
                             "'Patient-9.ndjson', 'Patient', 1, (SELECT min(id) FROM data_key), x'00' "
                             "FROM export_job WHERE status='running'"))
    app.extensions["fhirserver"].engine.dispose()
    restarted = create_app(replace(settings, bulk_worker=True))
    srv2 = Server(restarted)
    srv2._keys = srv._keys
    token2 = srv2.token()
    done = srv2.wait(token2, pending)
    assert done.status_code == 200
    manifest = done.get_json()
    assert "Patient-9.ndjson" not in json.dumps(manifest)  # the dead worker's partial output is gone
    files = srv2.files(token2, manifest)
    assert {r["id"] for r in files["Patient"]} == srv2.searchable(token2, "Patient")
    restarted.extensions["fhirserver"].engine.dispose()
    statuses = sorted(r[0] for r in _raw(settings, "SELECT status FROM export_job"))
    assert statuses == ["complete"]  # the cancelled job was shredded


def test_expired_exports_are_deleted_with_their_key(tmp_path: Path) -> None:
    app = _app(tmp_path, export_expiry_seconds=0)
    srv = Server(app)
    token = srv.token()
    seed(srv, token, 1)
    status_url = srv.kickoff(token).headers["Content-Location"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not _raw(srv.svc.settings, "SELECT id FROM export_job"):
            break
        time.sleep(0.2)
    assert srv.http.get(_local(status_url), headers=srv.h(token)).status_code == 404
    assert _raw(srv.svc.settings, "SELECT count(*) FROM export_file") == [(0,)]
    assert _raw(srv.svc.settings, "SELECT count(*) FROM data_key WHERE scope LIKE 'export:%'") == [(0,)]
    app.extensions["fhirserver"].engine.dispose()


def test_output_is_encrypted_at_rest_and_every_step_audited(server: Server) -> None:
    token = server.token()
    ids = seed(server, token)
    status_url = server.kickoff(token, _type="Patient").headers["Content-Location"]
    manifest = server.wait(token, status_url).get_json()
    server.files(token, manifest)
    blob = db_path(server.svc.settings).read_bytes()
    wal = Path(str(db_path(server.svc.settings)) + "-wal")
    if wal.exists():
        blob += wal.read_bytes()
    assert b"Bulkfam" not in blob
    auditor = server.token("system/AuditEvent.rs", name="auditor", settings=AUDITOR_SETTINGS)
    audit = server.http.get("/fhir/AuditEvent", query_string={"_count": "1000"}, headers=server.h(auditor)).get_json()
    descs = [e["resource"].get("outcomeDesc", "") for e in audit["entry"]]
    assert any(d.startswith("export job") and "accepted" in d for d in descs)
    assert any(d.startswith("export complete: Patient 3") for d in descs)
    assert any(d.startswith("export file Patient-1.ndjson") for d in descs)
    run = next(e["resource"] for e in audit["entry"] if e["resource"].get("outcomeDesc", "").startswith("export complete"))
    patients = {ent["what"]["reference"] for ent in run.get("entity", []) if "what" in ent and
                ent["what"].get("reference", "").startswith("Patient/")}
    assert patients == {f"Patient/{p}" for p in ids["Patient"]}


def test_deidentify_accepts_only_safe_harbor(server: Server) -> None:
    token = server.token()
    assert server.kickoff(token, _deidentify="safe-harbor").status_code == 202
    resp = server.kickoff(token, _deidentify="k-anonymity")
    assert resp.status_code == 400 and "_deidentify" in resp.get_data(as_text=True)


