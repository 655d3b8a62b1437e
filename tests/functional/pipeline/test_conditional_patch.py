"""Conditional patch (`PATCH [type]?[search]`), on its own and as a transaction entry, through
HTTP: one match is patched; none is a 404, several a 412, nothing changes; the caller needs
search permission for the condition as well as read and update."""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.conftest import BackendClient

MRN = "http://hospital.example/mrn"
JSON_PATCH = "application/json-patch+json"


def _patient(h: dict[str, str], http: Any, mrn: str, family: str = "Cpatch") -> str:
    body = {"resourceType": "Patient", "name": [{"family": family}], "identifier": [{"system": MRN, "value": mrn}]}
    resp = http.post("/fhir/Patient", json=body, headers=h)
    assert resp.status_code == 201
    return str(resp.get_json()["id"])


def _patch(http: Any, h: dict[str, str], query: str, ops: list[dict[str, Any]]) -> Any:
    return http.patch(f"/fhir/Patient?{query}", data=json.dumps(ops), headers={**h, "Content-Type": JSON_PATCH})


def test_a_conditional_patch_changes_its_one_match(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    mrn = uuid.uuid4().hex[:12]
    pid = _patient(h, http, mrn)
    resp = _patch(http, h, f"identifier={MRN}|{mrn}", [{"op": "add", "path": "/gender", "value": "female"}])
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    assert resp.get_json()["id"] == pid and resp.get_json()["meta"]["versionId"] == "2"
    assert http.get(f"/fhir/Patient/{pid}", headers=h).get_json()["gender"] == "female"


def test_none_or_several_matches_change_nothing(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    twice = uuid.uuid4().hex[:12]
    first, second = _patient(h, http, twice), _patient(h, http, twice)
    ops = [{"op": "add", "path": "/gender", "value": "other"}]
    missing = _patch(http, h, f"identifier={MRN}|nobody-{twice}", ops)
    assert missing.status_code == 404 and missing.get_json()["resourceType"] == "OperationOutcome"
    several = _patch(http, h, f"identifier={MRN}|{twice}", ops)
    assert several.status_code == 412 and several.get_json()["issue"][0]["code"] == "multiple-matches"
    for pid in (first, second):
        stored = http.get(f"/fhir/Patient/{pid}", headers=h).get_json()
        assert "gender" not in stored and stored["meta"]["versionId"] == "1"


def test_a_conditional_patch_needs_search_permission(http: Any, admin: BackendClient, make_client: Any) -> None:
    mrn = uuid.uuid4().hex[:12]
    pid = _patient(admin.headers(), http, mrn)
    no_search = make_client("system/Patient.ru", default_scope="system/Patient.ru")
    resp = _patch(http, no_search.headers(), f"identifier={MRN}|{mrn}", [{"op": "add", "path": "/gender", "value": "male"}])
    assert resp.status_code == 403 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert "gender" not in http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json()


def test_a_transaction_entry_may_patch_conditionally(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    mrn = uuid.uuid4().hex[:12]
    pid = _patient(h, http, mrn)
    fhirpath_patch = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
        {"name": "name", "valueString": "birthDate"}, {"name": "value", "valueDate": "1970-01-02"}]}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": fhirpath_patch, "request": {"method": "PATCH", "url": f"Patient?identifier={MRN}|{mrn}"}}]}
    resp = http.post("/fhir", data=json.dumps(bundle), headers={**h, "Content-Type": "application/fhir+json"})
    assert resp.status_code == 200, resp.get_data(as_text=True)[:400]
    assert resp.get_json()["entry"][0]["response"]["status"].startswith("200")
    assert http.get(f"/fhir/Patient/{pid}", headers=h).get_json()["birthDate"] == "1970-01-02"


def test_a_match_the_caller_may_not_read_is_answered_as_no_match(http: Any, admin: BackendClient,
                                                                 make_client: Any) -> None:
    mrn = uuid.uuid4().hex[:12]
    pid = _patient(admin.headers(), http, mrn)  # no gender: outside the restricted scope below
    males = make_client("system/Patient.rus?gender=male", default_scope="system/Patient.rus?gender=male")
    ops = [{"op": "add", "path": "/birthDate", "value": "1999-09-09"}]
    hidden = _patch(http, males.headers(), f"identifier={MRN}|{mrn}", ops)
    absent = _patch(http, males.headers(), f"identifier={MRN}|nobody-{mrn}", ops)
    assert hidden.status_code == absent.status_code == 404
    assert hidden.get_json()["issue"][0]["code"] == absent.get_json()["issue"][0]["code"]
    assert pid not in hidden.get_data(as_text=True)
    assert "birthDate" not in http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json()
