"""Create / read / vread / update / delete / history through HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)


def _patient(family: str = "Smith") -> dict:
    return {"resourceType": "Patient", "name": [{"family": family, "given": ["Jo"]}], "birthDate": "1970-01-02"}


def test_create_read_update_delete_history(http, admin):
    h = admin.headers()
    r = http.post("/fhir/Patient", json=_patient(), headers=h)
    assert r.status_code == 201
    pid = r.get_json()["id"]
    assert r.headers["Location"].endswith(f"/fhir/Patient/{pid}/_history/1")
    assert r.headers["ETag"] == 'W/"1"'
    assert r.get_json()["meta"]["versionId"] == "1"

    r = http.get(f"/fhir/Patient/{pid}", headers=h)
    assert r.status_code == 200 and r.get_json()["name"][0]["family"] == "Smith"

    body = r.get_json()
    body["name"][0]["family"] = "Jones"
    r = http.put(f"/fhir/Patient/{pid}", json=body, headers={**h, "If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.get_json()["meta"]["versionId"] == "2"

    r = http.put(f"/fhir/Patient/{pid}", json=body, headers={**h, "If-Match": 'W/"1"'})
    assert r.status_code == 412
    assert r.get_json()["resourceType"] == "OperationOutcome"

    r = http.get(f"/fhir/Patient/{pid}/_history/1", headers=h)
    assert r.status_code == 200 and r.get_json()["name"][0]["family"] == "Smith"

    assert http.delete(f"/fhir/Patient/{pid}", headers=h).status_code == 204
    r = http.get(f"/fhir/Patient/{pid}", headers=h)
    assert r.status_code == 410 and r.get_json()["resourceType"] == "OperationOutcome"

    r = http.get(f"/fhir/Patient/{pid}/_history", headers=h)
    hist = r.get_json()
    assert hist["type"] == "history"
    assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "PUT", "POST"]
