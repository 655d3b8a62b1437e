"""US Core 6.1 on the read side: every search parameter and combination the US Core Server
CapabilityStatement marks SHALL, for each served type, answers exactly the resource it names
(docs/us-core.md lists them; this test checks the table and runs one search per row).

Two patients each get one resource of every type, differing in every searched value, so a row's
query built from patient 0's values must return patient 0's resource and nothing of patient 1's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.support.apps import app_with_client

DOC = Path(__file__).resolve().parents[3] / "docs" / "us-core.md"
SCT, LOINC = "http://snomed.info/sct", "http://loinc.org"


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def bodies(i: int) -> dict[str, dict[str, Any]]:
    """One resource of each type for patient `up{i}`; every searched value differs between i=0 and 1."""
    me = {"reference": f"Patient/up{i}"}
    day = f"2024-0{i + 1}-1{i}"
    return {
        "Patient": {"identifier": [{"system": "urn:mrn", "value": f"mrn-{i}"}],
                    "name": [{"family": f"Uscore{'ab'[i]}", "given": ["Pat"]}], "gender": ["female", "male"][i],
                    "birthDate": f"198{i}-05-0{i + 1}"},
        "AllergyIntolerance": {"patient": me, "code": cc(SCT, f"9193600{i}"),
                               "clinicalStatus": cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                                    ["active", "resolved"][i])},
        "CarePlan": {"subject": me, "status": "active", "intent": "plan",
                     "category": [cc("http://hl7.org/fhir/us/core/CodeSystem/careplan-category", "assess-plan")]},
        "CareTeam": {"subject": me, "status": ["active", "inactive"][i]},
        "Condition": {"subject": me, "code": cc(SCT, f"3834100{i}"), "onsetDateTime": day,
                      "category": [cc("http://terminology.hl7.org/CodeSystem/condition-category",
                                      ["problem-list-item", "encounter-diagnosis"][i])]},
        "Device": {"patient": me, "type": cc(SCT, f"1427003{i}")},
        "DiagnosticReport": {"subject": me, "status": "final", "code": cc(LOINC, f"58410-{i}"),
                             "effectiveDateTime": day,
                             "category": [cc("http://terminology.hl7.org/CodeSystem/v2-0074", ["LAB", "RAD"][i])]},
        "DocumentReference": {"subject": me, "status": "current", "type": cc(LOINC, f"18842-{i}"), "date": day + "T10:00:00Z",
                              "category": [cc("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                                              "clinical-note")],
                              "content": [{"attachment": {"contentType": "text/plain", "data": "bm90ZQ=="}}]},
        "Encounter": {"subject": me, "status": "finished", "class": {"code": "AMB"}, "period": {"start": day}},
        "Goal": {"subject": me, "lifecycleStatus": "active", "description": {"text": f"goal {i}"}},
        "Immunization": {"patient": me, "status": "completed", "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", f"20{i}"),
                         "occurrenceDateTime": day},
        "Location": {"name": f"Ward {'ab'[i]}", "address": {"city": ["Boston", "Denver"][i], "state": "MA"}},
        "Medication": {"code": cc("http://www.nlm.nih.gov/research/umls/rxnorm", f"31410{i}")},
        "MedicationDispense": {"subject": me, "status": ["completed", "in-progress"][i],
                               "medicationReference": {"reference": f"Medication/um{i}"}},
        "Coverage": {"beneficiary": me, "status": "active", "payor": [{"display": f"Payer {'ab'[i]}"}]},
        "MedicationRequest": {"subject": me, "status": ["active", "stopped"][i], "intent": "order",
                              "medicationReference": {"reference": f"Medication/um{i}"}},
        "Organization": {"name": f"Clinic {'ab'[i]}", "address": [{"city": ["Austin", "Dallas"][i]}]},
        "Practitioner": {"name": [{"family": f"Doctor{'ab'[i]}"}],
                         "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"99999999{i}"}]},
        "PractitionerRole": {"practitioner": {"reference": f"Practitioner/upr{i}"}, "specialty": [cc(SCT, f"41979300{i}")]},
        "Procedure": {"subject": me, "status": "completed", "code": cc(SCT, f"7364100{i}"), "performedDateTime": day},
        "QuestionnaireResponse": {"subject": me, "status": "completed", "questionnaire": f"http://example.org/q/{i}"},
        "RelatedPerson": {"patient": me, "name": [{"family": f"Kin{'ab'[i]}"}]},
        "ServiceRequest": {"subject": me, "status": "active", "intent": "order", "code": cc(SCT, f"10818700{i}"),
                           "category": [cc(SCT, f"10825200{i}")], "authoredOn": day},
        "Specimen": {"subject": me, "type": cc(SCT, f"12213800{i}")},
        "Observation": {"subject": me, "status": "final", "code": cc(LOINC, f"8867-{i}"), "effectiveDateTime": day,
                        "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category",
                                        ["vital-signs", "laboratory"][i])]},
    }


# (type, query for patient 0's resource): the SHALL searches of the US Core 6.1 server
ROWS: list[tuple[str, str]] = [
    ("Patient", "_id=up0"), ("Patient", "identifier=urn:mrn|mrn-0"), ("Patient", "name=Uscorea"),
    ("Patient", "birthdate=1980-05-01&name=Uscorea"), ("Patient", "gender=female&name=Uscorea"),
    ("AllergyIntolerance", "patient=up0"),
    ("CarePlan", "patient=up0&category=http://hl7.org/fhir/us/core/CodeSystem/careplan-category|assess-plan"),
    ("CareTeam", "patient=up0&status=active"),
    ("Condition", "patient=up0"),
    ("Coverage", "patient=up0"),
    ("Device", "patient=up0"),
    ("DiagnosticReport", "patient=up0"), ("DiagnosticReport", "patient=up0&category=LAB"),
    ("DiagnosticReport", "patient=up0&code=http://loinc.org|58410-0"),
    ("DiagnosticReport", "patient=up0&category=LAB&date=ge2024-01-10"),
    ("DocumentReference", "_id={DocumentReference}"), ("DocumentReference", "patient=up0"),
    ("DocumentReference", "patient=up0&category=clinical-note"),
    ("DocumentReference", "patient=up0&category=clinical-note&date=ge2024-01-10"),
    ("DocumentReference", "patient=up0&type=http://loinc.org|18842-0"),
    ("Encounter", "_id={Encounter}"), ("Encounter", "patient=up0"), ("Encounter", "date=ge2024-01-10&patient=up0"),
    ("Goal", "patient=up0"),
    ("Immunization", "patient=up0"),
    ("Location", "name=Ward a"), ("Location", "address=Boston"),
    ("MedicationRequest", "patient=up0&intent=order"), ("MedicationRequest", "patient=up0&intent=order&status=active"),
    ("MedicationRequest", "patient=up0&intent=order&_include=MedicationRequest:medication"),
    ("MedicationDispense", "patient=up0"), ("MedicationDispense", "patient=up0&status=completed"),
    ("Observation", "patient=up0&category=vital-signs"), ("Observation", "patient=up0&code=http://loinc.org|8867-0"),
    ("Observation", "patient=up0&category=vital-signs&date=ge2024-01-10"),
    ("Organization", "name=Clinic a"), ("Organization", "address=Austin"),
    ("Practitioner", "name=Doctora"), ("Practitioner", "identifier=http://hl7.org/fhir/sid/us-npi|999999990"),
    ("PractitionerRole", "specialty=http://snomed.info/sct|419793000"),
    ("PractitionerRole", "practitioner=Practitioner/upr0"),
    ("PractitionerRole", "practitioner=Practitioner/upr0&_include=PractitionerRole:practitioner"),
    ("Procedure", "patient=up0"), ("Procedure", "patient=up0&date=ge2024-01-10"),
    ("QuestionnaireResponse", "_id={QuestionnaireResponse}"), ("QuestionnaireResponse", "patient=up0"),
    ("QuestionnaireResponse", "patient=up0&questionnaire=http://example.org/q/0"),
    ("RelatedPerson", "_id={RelatedPerson}"), ("RelatedPerson", "patient=up0"),
    ("ServiceRequest", "_id={ServiceRequest}"), ("ServiceRequest", "patient=up0"),
    ("ServiceRequest", "patient=up0&category=http://snomed.info/sct|108252000"),
    ("ServiceRequest", "patient=up0&code=http://snomed.info/sct|108187000"),
    ("ServiceRequest", "patient=up0&category=http://snomed.info/sct|108252000&authored=ge2024-01-10"),
    ("Specimen", "_id={Specimen}"), ("Specimen", "patient=up0"),
    ("Condition", "patient=up0&_revinclude=Provenance:target"),
]
# what a row's query must return besides the type's own resource of patient 0 (its _include / _revinclude)
INCLUDED = {"_include=MedicationRequest:medication": "Medication/um0",
            "_include=PractitionerRole:practitioner": "Practitioner/upr0",
            "_revinclude=Provenance:target": "Provenance/{Provenance}"}


def test_the_documented_table_is_the_tested_table() -> None:
    text = DOC.read_text()
    documented = re.findall(r"^\| (\w+) \| `([^`]+)` \|", text, re.M)
    assert documented == ROWS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One server for the module (the rows only read): the app, a client's headers, and the ids of
    patient 0's resources (fixed ids for the referenced ones, server ids for the rest)."""
    app, http, h = app_with_client(make_settings(tmp_path_factory.mktemp("us-core")), name="us core test client")
    svc = app.extensions["fhirserver"]
    fixed = {"Patient": "up{}", "Medication": "um{}", "Practitioner": "upr{}"}
    ids: dict[str, str] = {}
    for i in (0, 1):
        for rtype, body in sorted(bodies(i).items(), key=lambda kv: kv[0] not in fixed):
            body = {"resourceType": rtype, **body}
            if rtype in fixed:
                rid = fixed[rtype].format(i)
                resp = http.put(f"/fhir/{rtype}/{rid}", json={**body, "id": rid}, headers=h)
            else:
                resp = http.post(f"/fhir/{rtype}", json=body, headers=h)
            assert resp.status_code in (200, 201), (rtype, resp.get_data(as_text=True))
            if i == 0:
                ids[rtype] = resp.get_json()["id"]
    prov = {"resourceType": "Provenance", "target": [{"reference": f"Condition/{ids['Condition']}"}],
            "recorded": "2024-01-10T10:00:00Z", "agent": [{"who": {"reference": "Practitioner/upr0"}}]}
    ids["Provenance"] = http.post("/fhir/Provenance", json=prov, headers=h).get_json()["id"]
    yield http, h, ids
    svc.engine.dispose()


@pytest.mark.parametrize(("rtype", "query"), ROWS, ids=[f"{t}?{q}" for t, q in ROWS])
def test_us_core_search(server: Any, rtype: str, query: str) -> None:
    http, headers, stored = server
    q = re.sub(r"\{(\w+)\}", lambda m: stored[m.group(1)], query)
    resp = http.get(f"/fhir/{rtype}?{q}", headers={**headers, "Prefer": "handling=strict"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    bundle = resp.get_json()
    matches = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
               if e["search"]["mode"] == "match"}
    included = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
                if e["search"]["mode"] == "include"}
    assert matches == {f"{rtype}/{stored[rtype]}"} and bundle["total"] == 1, (matches, stored[rtype])
    want = {re.sub(r"\{(\w+)\}", lambda m: stored[m.group(1)], v) for k, v in INCLUDED.items() if k in query}
    assert included == want
