"""`X-Provenance` (FHIR R4 http.html#provenance): a Provenance sent in the header of a create,
update or patch is stored in the same transaction, its target set to the version written. It
needs a scope to create Provenance, must be a valid Provenance naming (if anything) the resource
written, and when it is refused nothing is stored -- neither the resource nor the Provenance."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import BackendClient

PROV = {"resourceType": "Provenance", "recorded": "2024-05-01T10:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/dr-1"}}],
        "reason": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]}]}
OBS = {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/xp"},
       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}, "valueQuantity": {"value": 70}}


def headers(client: BackendClient, prov: Any, scope: str | None = None) -> dict[str, str]:
    return client.headers(scope, **{"X-Provenance": prov if isinstance(prov, str) else json.dumps(prov)})


def provenances(http: Any, admin: BackendClient, target: str) -> list[dict[str, Any]]:
    bundle = http.get("/fhir/Provenance", query_string={"target": target}, headers=admin.headers()).get_json()
    return [e["resource"] for e in bundle.get("entry", [])]


def count(http: Any, admin: BackendClient, rtype: str) -> int:
    return int(http.get(f"/fhir/{rtype}?_summary=count", headers=admin.headers()).get_json()["total"])


@pytest.fixture
def patient(http: Any, admin: BackendClient) -> None:
    assert http.put("/fhir/Patient/xp", json={"resourceType": "Patient", "id": "xp"},
                    headers=admin.headers()).status_code in (200, 201)


def test_create_update_and_patch_store_the_provenance(http: Any, admin: BackendClient, patient: None) -> None:
    resp = http.post("/fhir/Observation", json=OBS, headers=headers(admin, PROV))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    oid = resp.get_json()["id"]
    [prov] = provenances(http, admin, f"Observation/{oid}")
    assert prov["target"] == [{"reference": f"Observation/{oid}/_history/1"}]
    assert prov["agent"] == PROV["agent"] and prov["recorded"] == PROV["recorded"]
    # an update, with the target already naming the resource
    body = dict(resp.get_json(), status="amended")
    sent = dict(PROV, target=[{"reference": f"Observation/{oid}"}])
    assert http.put(f"/fhir/Observation/{oid}", json=body, headers=headers(admin, sent)).status_code == 200
    patch = [{"op": "replace", "path": "/status", "value": "corrected"}]
    resp = http.patch(f"/fhir/Observation/{oid}", json=patch,
                      headers={**headers(admin, PROV), "Content-Type": "application/json-patch+json"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    targets = sorted(p["target"][0]["reference"] for p in provenances(http, admin, f"Observation/{oid}"))
    assert targets == [f"Observation/{oid}/_history/{v}" for v in (1, 2, 3)]
    # the Provenance is part of the patient's record
    everything = http.get("/fhir/Patient/xp/$everything", headers=admin.headers()).get_json()
    assert sum(e["resource"]["resourceType"] == "Provenance" for e in everything["entry"]) == 3
    assert count(http, admin, "Provenance") == 3  # nothing else was written


@pytest.mark.parametrize(("prov", "status", "words"), [
    ("{not json", 400, "not valid JSON"),
    ({"resourceType": "Patient"}, 400, "must hold a Provenance"),
    (dict(PROV, target=[{"reference": "Observation/someone-else"}]), 400, "is not the resource written"),
    ({k: v for k, v in PROV.items() if k != "agent"}, 400, "agent"),  # agent is 1..*
    (dict(PROV, recorded="yesterday"), 400, "recorded"),
])
def test_a_bad_provenance_refuses_the_whole_write(http: Any, admin: BackendClient, patient: None, prov: Any,
                                                  status: int, words: str) -> None:
    before = (count(http, admin, "Observation"), count(http, admin, "Provenance"))
    resp = http.post("/fhir/Observation", json=OBS, headers=headers(admin, prov))
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.get_json()["resourceType"] == "OperationOutcome" and words in resp.get_data(as_text=True)
    assert (count(http, admin, "Observation"), count(http, admin, "Provenance")) == before


def test_a_client_without_a_provenance_scope_is_refused(http: Any, admin: BackendClient, make_client: Any,
                                                        patient: None) -> None:
    writer = make_client("system/Observation.cruds", default_scope="system/Observation.cruds")
    before = count(http, admin, "Observation")
    resp = http.post("/fhir/Observation", json=OBS, headers=headers(writer, PROV))
    assert resp.status_code == 403 and "Provenance" in resp.get_json()["issue"][0]["diagnostics"]
    assert count(http, admin, "Observation") == before
    # without the header the same client writes as before
    assert http.post("/fhir/Observation", json=OBS, headers=writer.headers()).status_code == 201
    # with a Provenance scope it may send one
    both = make_client("system/Observation.cruds system/Provenance.c",
                       default_scope="system/Observation.cruds system/Provenance.c")
    assert http.post("/fhir/Observation", json=OBS, headers=headers(both, PROV)).status_code == 201
