"""Patient/[id]/$erase through HTTP: crypto-shredding (the data key is gone, nothing under it can
be decrypted, the raw database holds neither the key nor any index entry), 410 afterwards,
searches never return the patient, other patients untouched, exports holding the patient
cancelled, AuditEvents kept but pseudonymized with the hash chain still verifying (and still
detecting tampering), and every denial path audited."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fhirserver.crypto.cipher import DecryptionError, open_sealed
from tests.conftest import AUDITOR_SETTINGS, db_path
from tests.support.audit import verify_audit
from tests.support.bulk import Server, _app, _local, client_token

SECRET_NAME = "Zyxwerasable"
MRN = "MRN-ERASE-99817"


@pytest.fixture
def server(tmp_path: Path) -> Any:
    app = _app(tmp_path)
    yield Server(app)
    app.extensions["fhirserver"].engine.dispose()


def raw(srv: Server) -> sqlite3.Connection:
    return sqlite3.connect(db_path(srv.svc.settings), isolation_level=None)


def seed(srv: Server, token: str) -> dict[str, Any]:
    pid = srv.create(token, {"resourceType": "Patient", "name": [{"family": SECRET_NAME, "given": ["Eleanor"]}],
                             "identifier": [{"system": "urn:mrn", "value": MRN}], "birthDate": "1981-02-03"})
    other = srv.create(token, {"resourceType": "Patient", "name": [{"family": "Keepmeonly"}]})
    obs = [srv.create(token, {
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{p}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 60 + i}}) for i, p in enumerate([pid, pid, other])]
    qr = srv.create(token, {"resourceType": "QuestionnaireResponse", "status": "completed",
                            "subject": {"reference": f"Patient/{pid}"},
                            "item": [{"linkId": "1", "answer": [{"valueString": f"{SECRET_NAME} feels fine"}]}]})
    # a second version, so more than the current version must go
    upd = srv.http.put(f"/fhir/Observation/{obs[0]}", headers=srv.h(token), json={
        "resourceType": "Observation", "id": obs[0], "status": "amended", "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}, "valueQuantity": {"value": 61}})
    assert upd.status_code == 200
    return {"pid": pid, "other": other, "obs": obs, "qr": qr}


def erase(srv: Server, token: str, pid: str) -> Any:
    return srv.http.post(f"/fhir/Patient/{pid}/$erase", headers=srv.h(token))


def test_erasure_shreds_the_patient_and_keeps_a_pseudonymized_audit_trail(server: Server) -> None:
    admin = client_token(server, "admin", "system/*.cruds", admin=True, consent_exempt=True)
    ids = seed(server, admin)
    pid = ids["pid"]
    # accesses that leave AuditEvents naming the patient
    assert server.http.get(f"/fhir/Patient/{pid}", headers=server.h(admin)).status_code == 200
    assert server.http.get("/fhir/Observation", query_string={"patient": pid}, headers=server.h(admin)).status_code == 200
    kick = server.kickoff(admin, _type="Patient")
    manifest = server.wait(admin, kick.headers["Content-Location"]).get_json()
    file_url = _local(manifest["output"][0]["url"])
    with raw(server) as cx:
        key_id, wrapped = cx.execute("SELECT id, wrapped FROM data_key WHERE scope=?", (f"patient:{pid}",)).fetchone()
        blobs = cx.execute("SELECT r.type, r.id, v.version, v.body FROM resource_version v JOIN resource r "
                           "ON r.pk = v.resource_pk WHERE v.key_id=?", (key_id,)).fetchall()
    data_key = server.svc.keys.by_id(key_id)
    assert len(blobs) == 5  # Patient, 2 Observations (one with 2 versions), QuestionnaireResponse

    resp = erase(server, admin, pid)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome" and "4 resources (5 versions)" in outcome["issue"][0]["diagnostics"]
    pseudonym = outcome["issue"][0]["details"]["text"].split("Patient/")[1]

    # the raw database: no key, no ciphertext under it, nothing decryptable, no index rows
    with raw(server) as cx:
        # the whole WAL into the file: a background reader's snapshot (the subscription
        # dispatcher's idle poll) makes one attempt come back busy, so try until one completes
        deadline = time.monotonic() + 30
        while cx.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] != 0:
            assert time.monotonic() < deadline, "the checkpoint never completed"
            time.sleep(0.05)
        assert cx.execute("SELECT count(*) FROM data_key WHERE id=? OR scope=?", (key_id, f"patient:{pid}")).fetchone()[0] == 0
        assert cx.execute("SELECT count(*) FROM resource_version WHERE key_id=?", (key_id,)).fetchone()[0] == 0
        assert cx.execute("SELECT count(*) FROM compartment WHERE patient_id=?", (pid,)).fetchone()[0] == 0
        pks = [r[0] for r in cx.execute("SELECT pk FROM resource WHERE id IN (?,?,?,?)",
                                        (pid, ids["obs"][0], ids["obs"][1], ids["qr"]))]
        for table in ("idx_token", "idx_string", "idx_date", "idx_reference", "idx_quantity", "idx_uri"):
            assert cx.execute(f"SELECT count(*) FROM {table} WHERE resource_pk IN ({','.join('?' * len(pks))})",
                              pks).fetchone()[0] == 0, table
        alerts = [r[0] for r in cx.execute("SELECT detail FROM consent_alert")]  # the exempt client's accesses
        assert alerts and not any(pid in a for a in alerts) and any(pseudonym in a for a in alerts)
        everything = cx.execute("SELECT r.type, r.id, v.version, v.body FROM resource_version v JOIN resource r "
                                "ON r.pk = v.resource_pk WHERE v.body IS NOT NULL").fetchall()
    aes = AESGCM(data_key)
    for rtype, rid, version, body in everything:
        with pytest.raises(DecryptionError):
            open_sealed(aes, body, f"{rtype}/{rid}/{version}".encode())
    image = db_path(server.svc.settings).read_bytes()
    assert wrapped not in image and SECRET_NAME.encode() not in image and MRN.encode() not in image
    for _rtype, _rid, _version, body in blobs:
        assert body not in image

    # the audit trail: kept, chain verifies, the patient only under the pseudonym (later
    # requests naming the erased id are new events and may name it)
    result = verify_audit(server.svc)
    assert result.ok, result.reason
    auditor = client_token(server, "auditor", "system/AuditEvent.rs", **AUDITOR_SETTINGS)
    events = server.http.get("/fhir/AuditEvent", query_string={"_count": "1000"}, headers=server.h(auditor)).get_json()
    text = str(events)
    assert pid not in text and f"Patient/{pseudonym}" in text
    mine = server.http.get("/fhir/AuditEvent", query_string={"patient": pseudonym, "_count": "1000"},
                           headers=server.h(auditor)).get_json()
    descs = [e["resource"].get("outcomeDesc", "") for e in mine["entry"]]
    assert len(mine["entry"]) >= 8 and any(d.startswith("patient erased: 4 resources") for d in descs)

    # every read is gone (410), every search misses, $everything and old versions too
    for path in (f"Patient/{pid}", f"Observation/{ids['obs'][0]}", f"Observation/{ids['obs'][1]}",
                 f"QuestionnaireResponse/{ids['qr']}"):
        got = server.http.get(f"/fhir/{path}", headers=server.h(admin))
        assert got.status_code == 410 and got.get_json()["resourceType"] == "OperationOutcome", path
    assert server.http.get(f"/fhir/Observation/{ids['obs'][0]}/_history/1", headers=server.h(admin)).status_code in (404, 410)
    assert server.http.get(f"/fhir/Patient/{pid}/$everything", headers=server.h(admin)).status_code in (404, 410)
    for query in ({"family": SECRET_NAME}, {"identifier": MRN}, {"_id": pid}, {"birthdate": "1981-02-03"}):
        found = server.http.get("/fhir/Patient", query_string=query, headers=server.h(admin)).get_json()
        assert found["total"] == 0 and not found.get("entry"), query
    obs = server.http.get("/fhir/Observation", query_string={"patient": pid}, headers=server.h(admin)).get_json()
    assert obs["total"] == 0
    # the other patient is untouched
    assert server.http.get(f"/fhir/Patient/{ids['other']}", headers=server.h(admin)).status_code == 200
    kept = server.http.get("/fhir/Observation", query_string={"patient": ids["other"]}, headers=server.h(admin))
    assert [e["resource"]["id"] for e in kept.get_json()["entry"]] == [ids["obs"][2]]
    # the export made before the erasure is cancelled, its file gone
    assert server.http.get(file_url, headers=server.h(admin)).status_code in (404, 410)

    # a second erasure: 410; the chain still detects tampering with a redacted event
    assert erase(server, admin, pid).status_code == 410
    with raw(server) as cx:
        rid, redaction = cx.execute("SELECT id, redaction FROM access_record WHERE redaction IS NOT NULL "
                                    "ORDER BY pk LIMIT 1").fetchone()
        digest, _, mac = redaction.partition(":")
        cx.execute("UPDATE access_record SET redaction=? WHERE id=?", (f"{'0' * 64}:{mac}", rid))
    bad = verify_audit(server.svc)
    assert not bad.ok and bad.first_bad_event == rid and "redaction" in bad.reason
    with raw(server) as cx:
        cx.execute("UPDATE access_record SET redaction=NULL WHERE id=?", (rid,))
    bad = verify_audit(server.svc)
    assert not bad.ok and bad.first_bad_event == rid  # the redacted body no longer matches the original hash


def test_erasure_is_refused_to_anyone_but_an_admin_with_patient_delete(server: Server) -> None:
    admin = client_token(server, "admin", "system/*.cruds", admin=True, consent_exempt=True)
    pid = seed(server, admin)["pid"]
    plain = client_token(server, "plain", "system/*.cruds", consent_exempt=True)
    no_delete = client_token(server, "admin-ro", "system/*.rs", admin=True, consent_exempt=True)
    auditor = client_token(server, "auditor", "system/AuditEvent.rs", **AUDITOR_SETTINGS)

    def erase_events() -> list[dict[str, Any]]:
        bundle = server.http.get("/fhir/AuditEvent", query_string={"_count": "1000"}, headers=server.h(auditor)).get_json()
        return [e["resource"] for e in bundle.get("entry", []) if any(
            "$erase" in str(c.get("display", "")) or c.get("code") == "operation" for c in e["resource"].get("subtype", []))
            and e["resource"]["outcome"] != "0"]

    before = len(erase_events())
    for token, expected in ((plain, 403), (no_delete, 403)):
        resp = erase(server, token, pid)
        assert resp.status_code == expected and resp.get_json()["resourceType"] == "OperationOutcome"
    get = server.http.get(f"/fhir/Patient/{pid}/$erase", headers=server.h(admin))
    assert get.status_code == 405 and get.headers["Allow"] == "POST"
    assert erase(server, admin, "no-such-patient").status_code == 404
    assert server.http.post(f"/fhir/Patient/{pid}/$erase").status_code == 401
    assert len(erase_events()) - before == 5  # each refusal (403, 403, 405, 404, 401) left its AuditEvent
    assert server.http.get(f"/fhir/Patient/{pid}", headers=server.h(admin)).status_code == 200  # nothing erased
    assert verify_audit(server.svc).ok


def test_capability_statement_lists_erase(server: Server) -> None:
    cap = server.http.get("/fhir/metadata").get_json()
    patient = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Patient")
    assert {"name": "erase", "definition": "http://fhirserver.dev/OperationDefinition/Patient-erase"} in patient["operation"]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_erasure_on_postgres(settings: Any) -> None:
    from fhirserver.app import create_app

    app = create_app(settings)
    srv = Server(app)
    try:
        admin = client_token(srv, "admin", "system/*.cruds", admin=True, consent_exempt=True)
        ids = seed(srv, admin)
        assert srv.http.get(f"/fhir/Patient/{ids['pid']}", headers=srv.h(admin)).status_code == 200
        resp = erase(srv, admin, ids["pid"])
        assert resp.status_code == 200, resp.get_data(as_text=True)
        for path in (f"Patient/{ids['pid']}", f"Observation/{ids['obs'][0]}", f"QuestionnaireResponse/{ids['qr']}"):
            assert srv.http.get(f"/fhir/{path}", headers=srv.h(admin)).status_code == 410
        assert srv.http.get(f"/fhir/Patient/{ids['other']}", headers=srv.h(admin)).status_code == 200
        with app.extensions["fhirserver"].engine.connect() as conn:
            scopes = [r[0] for r in conn.exec_driver_sql("SELECT scope FROM data_key")]
            redacted = conn.exec_driver_sql("SELECT count(*) FROM access_record WHERE redaction IS NOT NULL").scalar()
        assert f"patient:{ids['pid']}" not in scopes and f"patient:{ids['other']}" in scopes and redacted >= 1
        assert verify_audit(srv.svc).ok
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_erasure_removes_the_patients_resources_of_every_type(server: Server) -> None:
    """Every type in the patient compartment (the R4 CompartmentDefinition, issue 14) goes, each
    under the patient's shredded key; directory data (Practitioner, Organization, ...) and another
    patient's resources of the same types stay."""
    from tests.functional.pipeline.test_record_types import bodies

    admin = client_token(server, "admin", "system/*.cruds", admin=True, consent_exempt=True)
    types = server.svc.types
    pid = server.create(admin, {"resourceType": "Patient", "name": [{"family": SECRET_NAME}]})
    other = server.create(admin, {"resourceType": "Patient", "name": [{"family": "Keepmeonly"}]})
    mine: dict[str, str] = {}
    theirs: dict[str, str] = {}
    for owner, made in ((pid, mine), (other, theirs)):
        for rtype, body in bodies(owner).items():
            made[rtype] = server.create(admin, {"resourceType": rtype, **body})
    in_compartment = {t.name for t in types if t.compartment_params} - {"Patient", "AuditEvent"}
    # all but the first four (the test above) and MolecularSequence (its HL7 examples: test_examples.py)
    assert in_compartment - set(mine) == {"Observation", "QuestionnaireResponse", "Consent", "MolecularSequence"}
    # a Provenance the server writes about one of them joins the compartment too
    cond = mine["Condition"]
    prov = {"resourceType": "Provenance", "recorded": "2024-01-01T00:00:00Z",
            "agent": [{"who": {"reference": "Practitioner/x"}}]}
    resp = server.http.put(f"/fhir/Condition/{cond}", headers={**server.h(admin), "X-Provenance": json.dumps(prov)},
                           json={"resourceType": "Condition", "id": cond, **bodies(pid)["Condition"]})
    assert resp.status_code == 200, resp.get_data(as_text=True)

    erased = {t: i for t, i in mine.items() if t in in_compartment}
    resp = erase(server, admin, pid)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    # the patient, one resource per compartment type (bodies() has a Provenance too) and the X-Provenance
    n = 1 + len(erased) + 1
    assert f"{n} resources" in resp.get_json()["issue"][0]["diagnostics"], resp.get_json()
    for rtype, rid in erased.items():
        assert server.http.get(f"/fhir/{rtype}/{rid}", headers=server.h(admin)).status_code == 410, rtype
        assert server.http.get(f"/fhir/{rtype}/{theirs[rtype]}", headers=server.h(admin)).status_code == 200, rtype
        found = server.http.get(f"/fhir/{rtype}", query_string={"_id": rid}, headers=server.h(admin)).get_json()
        assert found["total"] == 0, rtype
    for rtype in set(mine) - in_compartment:  # directory data: no patient's, so not erased
        assert server.http.get(f"/fhir/{rtype}/{mine[rtype]}", headers=server.h(admin)).status_code == 200, rtype
    with raw(server) as cx:
        assert cx.execute("SELECT count(*) FROM compartment WHERE patient_id=?", (pid,)).fetchone()[0] == 0
        assert cx.execute("SELECT count(*) FROM data_key WHERE scope=?", (f"patient:{pid}",)).fetchone()[0] == 0
