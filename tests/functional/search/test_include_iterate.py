"""`_include:iterate` follows references level by level to a fixed point (each resource once,
cycles end), up to MAX_ITERATE_LEVELS levels; plain `_include` stays one level. Through HTTP."""

from __future__ import annotations

import uuid
from typing import Any

from fhirserver.storage.includes import MAX_ITERATE_LEVELS
from tests.conftest import BackendClient


def _chain(http: Any, headers: dict[str, str], length: int) -> list[str]:
    """Patients p0 -> p1 -> ... (Patient.link.other), created from the end of the chain."""
    tag = uuid.uuid4().hex[:8]
    ids: list[str] = []
    for i in reversed(range(length)):
        body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": f"Chain{tag}", "given": [str(i)]}]}
        if ids:
            body["link"] = [{"other": {"reference": f"Patient/{ids[0]}"}, "type": "seealso"}]
        resp = http.post("/fhir/Patient", json=body, headers=headers)
        assert resp.status_code == 201
        ids.insert(0, resp.get_json()["id"])
    return ids


def _included(http: Any, headers: dict[str, str], pid: str, include: str) -> list[str]:
    body = http.get("/fhir/Patient", query_string={"_id": pid, include: "Patient:link"}, headers=headers).get_json()
    assert [e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "match"] == [pid]
    return [e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "include"]


def test_iterate_follows_the_chain_to_its_end_and_stops_at_a_cycle(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    ids = _chain(http, h, 4)
    assert _included(http, h, ids[0], "_include") == [ids[1]]
    assert sorted(_included(http, h, ids[0], "_include:iterate")) == sorted(ids[1:])
    # close the cycle p3 -> p0: the walk ends where it started, each resource once
    last = http.get(f"/fhir/Patient/{ids[3]}", headers=h).get_json()
    last["link"] = [{"other": {"reference": f"Patient/{ids[0]}"}, "type": "seealso"}]
    assert http.put(f"/fhir/Patient/{ids[3]}", json=last, headers=h).status_code == 200
    found = _included(http, h, ids[1], "_include:iterate")
    assert sorted(found) == sorted([ids[0], ids[2], ids[3]]) and len(found) == len(set(found))


def test_iterate_stops_after_the_documented_number_of_levels(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    ids = _chain(http, h, MAX_ITERATE_LEVELS + 3)
    found = _included(http, h, ids[0], "_include:iterate")
    assert sorted(found) == sorted(ids[1:MAX_ITERATE_LEVELS + 1])


def test_iterate_goes_only_through_what_the_caller_may_read(http: Any, admin: BackendClient,
                                                            make_client: Any) -> None:
    h = admin.headers()
    ids = _chain(http, h, 3)
    observer = make_client("system/Observation.rs system/Patient.s", default_scope="system/Observation.rs system/Patient.s")
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "iterate"},
           "subject": {"reference": f"Patient/{ids[0]}"}}
    oid = http.post("/fhir/Observation", json=obs, headers=h).get_json()["id"]
    body = http.get("/fhir/Observation", query_string={"_id": oid, "_include": "Observation:subject",
                                                      "_include:iterate": "Patient:link"},
                    headers=observer.headers()).get_json()
    included = [e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "include"]
    assert sorted(included) == sorted(ids)  # subject, then the chain, all readable by search scope
    reader = make_client("system/Observation.rs", default_scope="system/Observation.rs")
    body = http.get("/fhir/Observation", query_string={"_id": oid, "_include": "Observation:subject",
                                                      "_include:iterate": "Patient:link"},
                    headers=reader.headers()).get_json()
    assert [e["search"]["mode"] for e in body["entry"]] == ["match"]  # no Patient scope: no Patient included
