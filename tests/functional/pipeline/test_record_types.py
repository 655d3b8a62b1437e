"""The rest of the US Core record (issue "The whole patient record", first part): every type in
the registry is stored, read, searched, versioned and deleted through the same code as the first
four -- no per-type code -- and the ones in the Patient compartment (from the R4
CompartmentDefinition) are found by `patient=` and by Patient/$everything, and reached by a
patient-scoped token for its own patient only."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import BackendClient

CC = {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}], "text": "hypertension"}


def bodies(pid: str) -> dict[str, dict[str, Any]]:
    me = {"reference": f"Patient/{pid}"}
    return {
        "Practitioner": {"name": [{"family": "Curie"}]},
        "PractitionerRole": {"active": True},
        "Organization": {"name": "General Hospital"},
        "Location": {"name": "Ward 3"},
        "Encounter": {"status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                     "code": "AMB"}, "subject": me},
        "Condition": {"code": CC, "subject": me},
        "DiagnosticReport": {"status": "final", "code": CC, "subject": me},
        "MedicationRequest": {"status": "active", "intent": "order", "medicationCodeableConcept": CC, "subject": me},
        "Medication": {"code": CC},
        "MedicationDispense": {"status": "completed", "medicationCodeableConcept": CC, "subject": me},
        "Coverage": {"status": "active", "beneficiary": me, "payor": [{"display": "Acme Insurance"}]},
        "Group": {"type": "person", "actual": True, "member": [{"entity": me}]},  # outside the compartment
        "AllergyIntolerance": {"code": CC, "patient": me},
        "Immunization": {"status": "completed", "vaccineCode": CC, "patient": me, "occurrenceDateTime": "2024-01-02"},
        "Procedure": {"status": "completed", "code": CC, "subject": me},
        "CarePlan": {"status": "active", "intent": "plan", "subject": me},
        "CareTeam": {"status": "active", "subject": me},
        "Goal": {"lifecycleStatus": "active", "description": CC, "subject": me},
        "DocumentReference": {"status": "current", "subject": me,
                              "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}]},
        "Provenance": {"target": [me], "recorded": "2024-01-02T10:00:00Z", "agent": [{"who": {"display": "Dr X"}}]},
        "Questionnaire": {"status": "active", "item": [{"linkId": "1", "text": "How are you?", "type": "string"}]},
        "RelatedPerson": {"patient": me, "name": [{"family": "Doe"}]},
        "Device": {"status": "active"},
        "ServiceRequest": {"status": "active", "intent": "order", "code": CC, "subject": me},
        "Specimen": {"subject": me},
        "RiskAssessment": {"status": "final", "subject": me},
    }


def test_every_record_type_round_trips(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Whole"}]},
                    headers=h).get_json()["id"]
    other = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).get_json()["id"]
    served = set(http.application.extensions["fhirserver"].types.names())
    compartment = {t.name for t in http.application.extensions["fhirserver"].types if t.compartment_params}
    created: dict[str, str] = {}
    for rtype, body in bodies(pid).items():
        assert rtype in served, rtype
        r = http.post(f"/fhir/{rtype}", json={"resourceType": rtype, **body}, headers=h)
        assert r.status_code == 201, (rtype, r.get_data(as_text=True)[:300])
        rid = created[rtype] = r.get_json()["id"]
        read = http.get(f"/fhir/{rtype}/{rid}", headers=h)
        assert read.status_code == 200 and {k: read.get_json()[k] for k in body} == body, rtype
        found = http.get(f"/fhir/{rtype}?_id={rid}", headers=h).get_json()
        assert [e["resource"]["id"] for e in found["entry"]] == [rid], rtype
        if rtype in compartment and rtype not in ("Provenance",):
            mine = http.get(f"/fhir/{rtype}?patient={pid}", headers=h).get_json()
            assert rid in {e["resource"]["id"] for e in mine.get("entry", [])}, rtype
            assert not http.get(f"/fhir/{rtype}?patient={other}", headers=h).get_json().get("entry"), rtype
    everything = http.get(f"/fhir/Patient/{pid}/$everything?_count=100", headers=h).get_json()
    in_record = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in everything["entry"]}
    for rtype, rid in created.items():
        assert ((rtype, rid) in in_record) == (rtype in compartment), rtype
    # versions and deletion, like every other type
    rid = created["Condition"]
    upd = http.put(f"/fhir/Condition/{rid}", json={"resourceType": "Condition", "id": rid, "code": CC,
                                                  "subject": {"reference": f"Patient/{pid}"}, "note": [{"text": "x"}]},
                   headers=h)
    assert upd.status_code == 200 and upd.get_json()["meta"]["versionId"] == "2"
    assert len(http.get(f"/fhir/Condition/{rid}/_history", headers=h).get_json()["entry"]) == 2
    assert http.delete(f"/fhir/Condition/{rid}", headers=h).status_code == 204
    assert http.get(f"/fhir/Condition/{rid}", headers=h).status_code == 410


@pytest.mark.parametrize("rtype", ["Condition", "MedicationRequest", "AllergyIntolerance", "Encounter"])
def test_patient_scope_reaches_only_its_own_patient(http: Any, admin: BackendClient, make_client: Any,
                                                    rtype: str) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).get_json()["id"]
    other = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).get_json()["id"]
    mine = http.post(f"/fhir/{rtype}", json={"resourceType": rtype, **bodies(pid)[rtype]}, headers=h).get_json()["id"]
    theirs = http.post(f"/fhir/{rtype}", json={"resourceType": rtype, **bodies(other)[rtype]},
                       headers=h).get_json()["id"]
    reader = make_client("system/*.rs")
    assert http.get(f"/fhir/{rtype}/{mine}", headers=reader.headers("system/*.rs")).status_code == 200
    scoped = make_client(f"system/{rtype}.rs?patient={pid}")
    h2 = scoped.headers(f"system/{rtype}.rs?patient={pid}")
    assert http.get(f"/fhir/{rtype}/{mine}", headers=h2).status_code == 200
    assert http.get(f"/fhir/{rtype}/{theirs}", headers=h2).status_code == 404


def test_summary_of_the_record_types(http: Any, admin: BackendClient) -> None:
    """`_summary=true` keeps the summary elements of the added types too (from the R4 model's
    element metadata where the shared StructureDefinitions stop)."""
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).get_json()["id"]
    body = {"resourceType": "Condition", **bodies(pid)["Condition"], "note": [{"text": "long free text"}]}
    cid = http.post("/fhir/Condition", json=body, headers=h).get_json()["id"]
    found = http.get(f"/fhir/Condition?_id={cid}&_summary=true", headers=h).get_json()["entry"][0]["resource"]
    assert found["code"] == CC and found["subject"] == {"reference": f"Patient/{pid}"} and "note" not in found
