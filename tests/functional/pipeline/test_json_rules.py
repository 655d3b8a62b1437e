"""FHIR JSON rules beyond the schema (empty values, null, duplicate properties), HEAD, and
If-None-Match lists — through HTTP, and nothing is stored when a body is refused."""

from __future__ import annotations

import json

import pytest


def _ids(http, h) -> set[str]:  # type: ignore[no-untyped-def]
    return {e["resource"]["id"] for e in http.get("/fhir/Patient?_count=1000", headers=h).get_json().get("entry", [])
            if e["search"]["mode"] == "match"}


@pytest.mark.parametrize(
    ("body", "expression"),
    [
        ('{"resourceType":"Patient","name":[]}', "Patient.name"),
        ('{"resourceType":"Patient","name":[{}]}', "Patient.name[0]"),
        ('{"resourceType":"Patient","gender":""}', "Patient.gender"),
        ('{"resourceType":"Patient","name":[{"family":"  "}]}', "Patient.name[0].family"),
        ('{"resourceType":"Patient","active":null}', "Patient.active"),
        ('{"resourceType":"Patient","name":[{"given":[null]}]}', "Patient.name[0].given"),
    ],
)
def test_empty_and_null_values_are_400(http, admin, body: str, expression: str) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    before = _ids(http, h)
    resp = http.post("/fhir/Patient", data=body, headers={**h, "Content-Type": "application/fhir+json"})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert expression in outcome["issue"][0]["expression"]
    assert _ids(http, h) == before


def test_repeated_property_is_400(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    before = _ids(http, h)
    body = '{"resourceType":"Patient","gender":"male","gender":"female"}'
    resp = http.post("/fhir/Patient", data=body, headers={**h, "Content-Type": "application/fhir+json"})
    assert resp.status_code == 400
    assert "gender" in resp.get_json()["issue"][0]["diagnostics"]
    assert _ids(http, h) == before


def test_head_is_get_without_a_body(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "other"}, headers=h).get_json()["id"]
    get = http.get(f"/fhir/Patient/{pid}", headers=h)
    head = http.head(f"/fhir/Patient/{pid}", headers=h)
    assert head.status_code == 200 and head.get_data() == b""
    assert head.headers["ETag"] == get.headers["ETag"]
    assert http.head("/fhir/Patient/does-not-exist", headers=h).status_code == 404


def test_if_none_match_accepts_lists_and_star(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    created = http.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male"}, headers=h)
    pid, etag = created.get_json()["id"], created.headers["ETag"]
    assert http.get(f"/fhir/Patient/{pid}", headers={**h, "If-None-Match": f'W/"7", {etag}'}).status_code == 304
    assert http.get(f"/fhir/Patient/{pid}", headers={**h, "If-None-Match": "*"}).status_code == 304
    resp = http.get(f"/fhir/Patient/{pid}", headers={**h, "If-None-Match": 'W/"7", W/"8"'})
    assert resp.status_code == 200 and json.loads(resp.get_data())["id"] == pid
