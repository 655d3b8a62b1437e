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


def test_every_index_row_of_a_large_resource_is_written(http, admin):
    """A write's index rows go in as multi-row INSERTs on PostgreSQL (db/raw.executemany), in
    chunks whose sizes are powers of two (128 rows at most): 301 identifiers make chunks of 128,
    128, 32, 8, 4 and 1 rows. Every one of them must be found, and none left after an update."""
    h = admin.headers()
    ids = [{"system": "urn:example:mrn", "value": f"v{i}"} for i in range(301)]
    pid = http.post("/fhir/Patient", json={**_patient("Many"), "identifier": ids}, headers=h).get_json()["id"]
    for i in (0, 127, 128, 255, 256, 287, 295, 299, 300):
        found = http.get(f"/fhir/Patient?identifier=urn:example:mrn|v{i}", headers=h).get_json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [pid], i
    body = http.get(f"/fhir/Patient/{pid}", headers=h).get_json()
    body["identifier"] = ids[:7] + [{"system": "urn:example:mrn", "value": "w7"}]
    assert http.put(f"/fhir/Patient/{pid}", json=body, headers=h).status_code == 200
    assert http.get("/fhir/Patient?identifier=urn:example:mrn|v7", headers=h).get_json()["total"] == 0
    for value in ("v0", "v6", "w7"):
        assert http.get(f"/fhir/Patient?identifier=urn:example:mrn|{value}&_summary=count",
                        headers=h).get_json()["total"] == 1, value
