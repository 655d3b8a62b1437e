"""Data-subject rights of a signed-in patient (SMART App Launch, user scopes): see everything about
them, take it away, correct demographics (a new version) and request corrections of clinical data
(a flagged amendment beside the clinician's version, never a silent overwrite)."""

from __future__ import annotations

from typing import Any

from fhirserver.pipeline.crud import AMENDMENT_TAG
from tests.functional.smart.conftest import PASSWORD

SCOPE = "openid fhirUser user/Patient.rus user/Observation.rus user/QuestionnaireResponse.rus"


def patient_token(smart: Any) -> tuple[str, str, str]:
    pid = smart.patient("Rightsholder")
    obs = smart.observation(pid)
    username, _ = smart.user(f"Patient/{pid}")
    client_id, _ = smart.app_client(SCOPE)
    token = smart.tokens(client_id, SCOPE, username)["access_token"]
    return pid, obs, token


def test_patient_sees_and_takes_everything_about_them(smart: Any) -> None:
    pid, obs, token = patient_token(smart)
    other = smart.patient("Stranger")
    smart.observation(other)
    h = {"Authorization": f"Bearer {token}"}
    everything = smart.http.get(f"/fhir/Patient/{pid}/$everything", headers=h)
    assert everything.status_code == 200
    assert {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in everything.get_json()["entry"]} == {
        f"Patient/{pid}", f"Observation/{obs}"}
    assert smart.http.get(f"/fhir/Patient/{other}/$everything", headers=h).status_code in (403, 404)


def test_patient_corrects_demographics_as_a_new_version(smart: Any) -> None:
    pid, _obs, token = patient_token(smart)
    h = {"Authorization": f"Bearer {token}"}
    current = smart.http.get(f"/fhir/Patient/{pid}", headers=h).get_json()
    current["name"] = [{"family": "Rightsholder-Corrected", "given": ["Pat"]}]
    resp = smart.http.put(f"/fhir/Patient/{pid}", json=current, headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["meta"]["versionId"] == "2" and "tag" not in body["meta"]
    history = smart.http.get(f"/fhir/Patient/{pid}/_history", headers=h).get_json()
    assert [e["resource"]["name"][0]["family"] for e in history["entry"]] == ["Rightsholder-Corrected", "Rightsholder"]


def test_patient_correction_of_clinical_data_is_a_flagged_amendment(smart: Any) -> None:
    pid, obs, token = patient_token(smart)
    h = {"Authorization": f"Bearer {token}"}
    original = smart.http.get(f"/fhir/Observation/{obs}", headers=h).get_json()
    corrected = dict(original, valueQuantity={"value": 64, "unit": "/min"})
    resp = smart.http.put(f"/fhir/Observation/{obs}", json=corrected, headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["meta"]["tag"] == [AMENDMENT_TAG]
    # the clinician's version stays, and clinicians find amendments by tag
    v1 = smart.http.get(f"/fhir/Observation/{obs}/_history/1", headers=smart.admin.headers()).get_json()
    assert v1["valueQuantity"]["value"] == 70 and "tag" not in v1["meta"]
    found = smart.http.get("/fhir/Observation", query_string={"_tag": f"{AMENDMENT_TAG['system']}|patient-amended"},
                           headers=smart.admin.headers()).get_json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [obs]
    # ... and by its Provenance: the patient as author, the clinician's version as the revised entity
    provs = smart.http.get("/fhir/Provenance", query_string={"target": f"Observation/{obs}"},
                           headers=smart.admin.headers()).get_json().get("entry", [])
    assert len(provs) == 1
    prov = provs[0]["resource"]
    assert prov["target"] == [{"reference": f"Observation/{obs}/_history/2"}]
    assert prov["entity"] == [{"role": "revision", "what": {"reference": f"Observation/{obs}/_history/1"}}]
    assert prov["agent"][0]["who"] == {"reference": f"Patient/{pid}"}
    assert prov["activity"]["coding"][0]["code"] == "UPDATE"
    # it is part of the patient's record (their compartment): $everything, erasure and consents cover it
    everything = smart.http.get(f"/fhir/Patient/{pid}/$everything", headers=smart.admin.headers()).get_json()
    assert f"Provenance/{prov['id']}" in {f"{e['resource']['resourceType']}/{e['resource']['id']}"
                                          for e in everything["entry"]}
    # a backend (clinical) update is not flagged
    clinician = dict(original, status="amended")
    again = smart.http.put(f"/fhir/Observation/{obs}", json=clinician, headers=smart.admin.headers())
    assert again.status_code == 200 and "tag" not in again.get_json()["meta"]
    assert len(smart.http.get("/fhir/Provenance", query_string={"target": f"Observation/{obs}"},
                              headers=smart.admin.headers()).get_json().get("entry", [])) == 1


def test_erasure_closes_the_patients_account_and_revokes_their_tokens(smart: Any, make_client: Any) -> None:
    pid, _obs, token = patient_token(smart)
    h = {"Authorization": f"Bearer {token}"}
    assert smart.http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    with smart.svc.engine.connect() as conn:
        username = conn.exec_driver_sql("SELECT username FROM app_user WHERE fhir_user = ?", (f"Patient/{pid}",)).scalar()
    assert username
    eraser = make_client("system/*.cruds", settings={"admin": True})
    resp = smart.http.post(f"/fhir/Patient/{pid}/$erase", headers=eraser.headers())
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert "1 patient accounts closed" in resp.get_json()["issue"][0]["diagnostics"]
    # the patient's token is dead at once, and the account can no longer sign in
    denied = smart.http.get(f"/fhir/Patient/{pid}", headers=h)
    assert denied.status_code == 401 and "WWW-Authenticate" in denied.headers
    with smart.svc.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT username, fhir_user, disabled, totp_secret FROM app_user").all()
        contexts = [r[0] for r in conn.exec_driver_sql("SELECT context FROM access_token WHERE context IS NOT NULL")]
    assert all(username != r[0] and f"Patient/{pid}" != r[1] for r in rows)
    assert any(r[1].startswith("Patient/erased-") and r[2] for r in rows)
    assert not any(pid in c for c in contexts)
    client_id, _ = smart.app_client(SCOPE)
    browser, flow = smart.start(client_id, SCOPE)
    page = browser.login(username, PASSWORD)  # the right password: the account itself is gone
    assert "approve" not in page.names()
