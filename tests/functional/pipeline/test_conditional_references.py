"""Conditional references in batch and transaction Bundles (`Patient?identifier=sys|val`, as
v2-to-FHIR converters send them), through HTTP: one match becomes a plain reference; none or
several is a 412 with nothing stored; the search runs with the caller's access, so a target the
caller may not see fails exactly as an absent one does."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from tests.conftest import BackendClient

MRN = "http://hospital.example/mrn"
LOINC = "http://loinc.org"


def _patient(family: str, mrn: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}], "identifier": [{"system": MRN, "value": mrn}]}


def _obs(subject: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": subject}}


def _post(http: Any, headers: dict[str, str], kind: str, entries: list[dict[str, Any]]) -> Any:
    bundle = {"resourceType": "Bundle", "type": kind, "entry": entries}
    return http.post("/fhir", data=json.dumps(bundle), headers={**headers, "Content-Type": "application/fhir+json"})


def _observations(http: Any, headers: dict[str, str], code: str) -> list[dict[str, Any]]:
    found = http.get("/fhir/Observation", query_string={"code": f"{LOINC}|{code}"}, headers=headers).get_json()
    return [e["resource"] for e in found.get("entry", [])]


def _create(http: Any, headers: dict[str, str], body: dict[str, Any]) -> str:
    resp = http.post(f"/fhir/{body['resourceType']}", json=body, headers=headers)
    assert resp.status_code == 201, resp.get_data(as_text=True)[:300]
    return str(resp.get_json()["id"])


def _fresh(http: Any, h: dict[str, str], family: str) -> tuple[str, str, str]:
    """A new patient with its own MRN, and an Observation code no other test uses: (mrn, id, code)."""
    mrn = uuid.uuid4().hex[:12]
    return mrn, _create(http, h, _patient(family, mrn)), f"cr-{family.lower()}-{mrn}"


def test_a_transaction_resolves_a_conditional_reference_to_its_one_match(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    mrn, pid, code = _fresh(http, h, "Condref")
    resp = _post(http, h, "transaction", [
        {"resource": _obs(f"Patient?identifier={MRN}|{mrn}", code), "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:" + str(uuid.uuid4()), "resource": _obs(f"Patient?identifier={MRN}|{mrn}", code),
         "request": {"method": "POST", "url": "Observation"}},
    ])
    assert resp.status_code == 200, resp.get_data(as_text=True)[:400]
    assert [e["response"]["status"].split()[0] for e in resp.get_json()["entry"]] == ["201", "201"]
    stored = _observations(http, h, code)
    assert len(stored) == 2 and {o["subject"]["reference"] for o in stored} == {f"Patient/{pid}"}
    # stored as a plain reference, so it is searchable by the patient
    by_patient = http.get("/fhir/Observation", query_string={"subject": f"Patient/{pid}", "code": f"{LOINC}|{code}"},
                          headers=h).get_json()
    assert by_patient["total"] == 2


def test_no_match_or_several_fail_the_whole_transaction_with_412(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    mrn = uuid.uuid4().hex[:12]
    twice = uuid.uuid4().hex[:12]
    _create(http, h, _patient("Twicea", twice))
    _create(http, h, _patient("Twiceb", twice))
    code = "cr-fail-" + mrn
    for ref, why in ((f"Patient?identifier={MRN}|{mrn}", "not-found"),
                     (f"Patient?identifier={MRN}|{twice}", "multiple-matches")):
        resp = _post(http, h, "transaction", [
            {"resource": _patient("Crfirst", "x" + mrn), "request": {"method": "POST", "url": "Patient"}},
            {"resource": _obs(ref, code), "request": {"method": "POST", "url": "Observation"}},
        ])
        body = resp.get_json()
        assert resp.status_code == 412, (why, resp.get_data(as_text=True)[:300])
        assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == why
        assert "entry 1" in body["issue"][0]["diagnostics"]
    assert _observations(http, h, code) == []
    found = http.get("/fhir/Patient", query_string={"identifier": f"{MRN}|x{mrn}"}, headers=h).get_json()
    assert found["total"] == 0  # the first entry was rolled back with the rest


def test_a_target_the_caller_may_not_search_fails_as_an_absent_one(http: Any, admin: BackendClient,
                                                                   make_client: Any) -> None:
    h = admin.headers()
    mrn = uuid.uuid4().hex[:12]
    _create(http, h, _patient("Hiddencr", mrn))
    writer = make_client("system/Observation.cruds", default_scope="system/Observation.cruds")
    code = "cr-hidden-" + mrn
    hidden = _post(http, writer.headers(), "transaction", [
        {"resource": _obs(f"Patient?identifier={MRN}|{mrn}", code), "request": {"method": "POST", "url": "Observation"}}])
    absent = _post(http, writer.headers(), "transaction", [
        {"resource": _obs(f"Patient?identifier={MRN}|{mrn}-absent", code), "request": {"method": "POST", "url": "Observation"}}])
    assert hidden.status_code == absent.status_code == 412
    issue_hidden, issue_absent = hidden.get_json()["issue"][0], absent.get_json()["issue"][0]
    assert issue_hidden["code"] == issue_absent["code"] == "not-found"
    def said(issue: dict[str, Any], value: str) -> str:  # the text, without the value asked for and the request id
        return re.sub(r"request id [0-9a-f-]+", "", issue["diagnostics"].replace(value, "X"))

    assert said(issue_hidden, mrn) == said(issue_absent, f"{mrn}-absent")
    assert _observations(http, h, code) == []


def test_a_batch_fails_only_the_entry_whose_reference_does_not_resolve(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    mrn, pid, code = _fresh(http, h, "Batchcr")
    resp = _post(http, h, "batch", [
        {"resource": _obs(f"Patient?identifier={MRN}|{mrn}", code), "request": {"method": "POST", "url": "Observation"}},
        {"resource": _obs(f"Patient?identifier={MRN}|nobody-{mrn}", code), "request": {"method": "POST", "url": "Observation"}},
        {"resource": _obs(f"Patient/{pid}", code), "request": {"method": "POST", "url": "Observation"}},
    ])
    assert resp.status_code == 200
    entries = resp.get_json()["entry"]
    assert [e["response"]["status"].split()[0] for e in entries] == ["201", "412", "201"]
    assert entries[1]["response"]["outcome"]["issue"][0]["code"] == "not-found"
    assert {o["subject"]["reference"] for o in _observations(http, h, code)} == {f"Patient/{pid}"}


def test_malformed_conditional_references_are_refused(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    for ref, status in (("Spaceship?identifier=x|1", 400), ("Patient?unknownparam=1", 400)):
        resp = _post(http, h, "transaction", [
            {"resource": _obs(ref, "cr-bad"), "request": {"method": "POST", "url": "Observation"}}])
        assert resp.status_code == status, (ref, resp.get_data(as_text=True)[:300])
        assert resp.get_json()["resourceType"] == "OperationOutcome"


def test_transaction_entries_update_and_delete_conditionally(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    mrn, pid, _code = _fresh(http, h, "Condput")
    gone_mrn, gone, _c = _fresh(http, h, "Conddel")
    resp = _post(http, h, "transaction", [
        {"resource": {**_patient("Condput", mrn), "gender": "female"},
         "request": {"method": "PUT", "url": f"Patient?identifier={MRN}|{mrn}"}},
        {"request": {"method": "DELETE", "url": f"Patient?identifier={MRN}|{gone_mrn}"}},
    ])
    assert resp.status_code == 200, resp.get_data(as_text=True)[:400]
    assert [e["response"]["status"].split()[0] for e in resp.get_json()["entry"]] == ["200", "204"]
    updated = http.get(f"/fhir/Patient/{pid}", headers=h).get_json()
    assert updated["gender"] == "female" and updated["meta"]["versionId"] == "2"
    assert http.get(f"/fhir/Patient/{gone}", headers=h).status_code == 410
    # a conditional update matching two fails the whole transaction
    twice = uuid.uuid4().hex[:12]
    _create(http, h, _patient("Twiceput", twice))
    _create(http, h, _patient("Twiceput", twice))
    resp = _post(http, h, "transaction", [
        {"resource": _patient("Twiceput", twice), "request": {"method": "PUT", "url": f"Patient?identifier={MRN}|{twice}"}}])
    assert resp.status_code == 412 and resp.get_json()["resourceType"] == "OperationOutcome"
