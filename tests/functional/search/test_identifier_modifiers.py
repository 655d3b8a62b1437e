"""`:identifier` on reference parameters (a logical reference by identifier) and `:of-type` on
identifier parameters, both answered from keyed digests (the values never sit in the index in
clear)."""

from __future__ import annotations

import sqlite3
from typing import Any

from tests.conftest import BackendClient, db_path

MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


def test_identifier_and_of_type(http: Any, admin: BackendClient, settings: Any) -> None:
    h = admin.headers()
    p1 = http.post("/fhir/Patient", json={"resourceType": "Patient", "identifier": [
        {"type": MR, "system": "urn:hosp", "value": "MRN-7731"}, {"system": "urn:other", "value": "X-1"}]},
        headers=h).get_json()["id"]
    http.post("/fhir/Patient", json={"resourceType": "Patient", "identifier": [
        {"system": "urn:hosp", "value": "MRN-7731"}]}, headers=h)  # same value, no type
    obs = http.post("/fhir/Observation", json={
        "resourceType": "Observation", "status": "final", "code": {"text": "weight"},
        "subject": {"identifier": {"system": "urn:hosp", "value": "MRN-7731"}}}, headers=h)
    assert obs.status_code == 201, obs.get_data(as_text=True)
    oid = obs.get_json()["id"]

    def ids(rtype: str, query: str) -> set[str]:
        r = http.get(f"/fhir/{rtype}?{query}", headers={**h, "Prefer": "handling=strict"})
        assert r.status_code == 200, r.get_data(as_text=True)
        return {e["resource"]["id"] for e in r.get_json().get("entry", [])}

    assert ids("Observation", "subject:identifier=urn:hosp|MRN-7731") == {oid}
    assert ids("Observation", "subject:identifier=MRN-7731") == {oid}
    assert ids("Observation", "subject:identifier=urn:elsewhere|MRN-7731") == set()
    assert ids("Observation", "patient:identifier=urn:hosp|MRN-0000") == set()
    of_type = "http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN-7731"
    assert ids("Patient", f"identifier:of-type={of_type}") == {p1}
    assert ids("Patient", "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|DL|MRN-7731") == set()
    bad = http.get("/fhir/Patient?identifier:of-type=MR|MRN-7731", headers=h)
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"
    wrong = http.get("/fhir/Observation?subject:of-type=a|b|c", headers=h)
    assert wrong.status_code == 400
    cx = sqlite3.connect(db_path(settings))
    try:
        assert not cx.execute("SELECT count(*) FROM idx_string WHERE value LIKE '%MRN-7731%'").fetchone()[0]
        assert not cx.execute("SELECT count(*) FROM idx_token WHERE code LIKE '%MRN-7731%'").fetchone()[0]
    finally:
        cx.close()
