"""System-level history (`GET [base]/_history`) through HTTP: versions of every type the caller may
read, newest first, `_since` and keyset paging, each type through the caller's scopes; access
records are not part of it; audited like a type history."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from fhirserver.fhir.dates import instant_text
from tests.conftest import BackendClient


def _pages(http: Any, headers: dict[str, str], query: dict[str, str]) -> list[dict[str, Any]]:
    """Every entry of the history, following `next` links."""
    entries: list[dict[str, Any]] = []
    resp = http.get("/fhir/_history", query_string=query, headers=headers)
    while True:
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
        body = resp.get_json()
        assert body["resourceType"] == "Bundle" and body["type"] == "history"
        entries += body["entry"]
        nxt = [link["url"] for link in body["link"] if link["relation"] == "next"]
        if not nxt:
            return entries
        url = urlsplit(nxt[0])
        resp = http.get(url.path + "?" + url.query, headers=headers)


def _seed(http: Any, h: dict[str, str]) -> tuple[str, str, str]:
    since = instant_text(int(time.time() * 1_000_000) - 1_000_000)
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Syshist"}]},
                    headers=h).get_json()["id"]
    obs = {"resourceType": "Observation", "status": "preliminary", "code": {"text": "system history"},
           "subject": {"reference": f"Patient/{pid}"}}
    oid = http.post("/fhir/Observation", json=obs, headers=h).get_json()["id"]
    assert http.put(f"/fhir/Observation/{oid}", json={**obs, "id": oid, "status": "final"}, headers=h).status_code == 200
    return since, pid, oid


def test_system_history_lists_every_readable_version_newest_first(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    since, pid, oid = _seed(http, h)
    entries = _pages(http, h, {"_since": since, "_count": "1"})  # one per page: the cursor carries on
    mine = [(e["fullUrl"].split("/fhir/")[1], e["response"]["etag"], e["request"]["method"]) for e in entries
            if e["fullUrl"].endswith((f"/Patient/{pid}", f"/Observation/{oid}"))]
    assert mine == [(f"Observation/{oid}", 'W/"2"', "PUT"), (f"Observation/{oid}", 'W/"1"', "POST"),
                    (f"Patient/{pid}", 'W/"1"', "POST")]
    assert len({(e["fullUrl"], e["response"]["etag"]) for e in entries}) == len(entries)  # no version twice
    assert not any("/AuditEvent/" in e["fullUrl"] for e in entries)  # access records are not versions
    later = _pages(http, h, {"_since": instant_text(int(time.time() * 1_000_000) + 60_000_000)})
    assert later == []


def test_system_history_shows_only_the_types_the_caller_may_read(http: Any, admin: BackendClient,
                                                                 make_client: Any) -> None:
    since, pid, oid = _seed(http, admin.headers())
    observer = make_client("system/Observation.rs", default_scope="system/Observation.rs")
    entries = _pages(http, observer.headers(), {"_since": since})
    types = {e["fullUrl"].split("/fhir/")[1].split("/")[0] for e in entries}
    assert types == {"Observation"} and any(e["fullUrl"].endswith(f"/Observation/{oid}") for e in entries)
    nothing = make_client("system/AuditEvent.rs", default_scope="system/AuditEvent.rs",
                          settings={"auditor": True, "purposes": ["HOPERAT"]})
    resp = http.get("/fhir/_history", headers=nothing.headers())
    assert resp.status_code == 403 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert http.get("/fhir/_history").status_code == 401
    assert http.post("/fhir/_history", headers=admin.headers()).status_code == 405


def test_system_history_is_audited_with_the_patients_it_disclosed(http: Any, admin: BackendClient,
                                                                  auditor: BackendClient) -> None:
    since, pid, _oid = _seed(http, admin.headers())
    assert http.get("/fhir/_history", query_string={"_since": since}, headers=admin.headers()).status_code == 200
    events = http.get("/fhir/AuditEvent", query_string={"patient": f"Patient/{pid}", "_count": "100"},
                      headers=auditor.headers()).get_json()
    subtypes = [c.get("code") for e in events.get("entry", []) for c in e["resource"].get("subtype", [])]
    assert "history-system" in subtypes


def test_at_gives_the_versions_current_during_that_time(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": "Athist"}]}
    pid = http.post("/fhir/Patient", json=body, headers=h).get_json()["id"]
    moments = []
    for gender in ("male", "female"):
        time.sleep(0.05)
        moments.append(instant_text(int(time.time() * 1_000_000)))  # between two versions
        time.sleep(0.05)
        assert http.put(f"/fhir/Patient/{pid}", json={**body, "id": pid, "gender": gender}, headers=h).status_code == 200

    def versions(path: str, at: str) -> list[str]:
        found = http.get(path, query_string={"_at": at, "_count": "1000"}, headers=h).get_json()
        return [e["response"]["etag"] for e in found["entry"] if e["fullUrl"].endswith(f"/Patient/{pid}")]

    for path in (f"/fhir/Patient/{pid}/_history", "/fhir/Patient/_history", "/fhir/_history"):
        assert versions(path, moments[0]) == ['W/"1"'], path
        assert versions(path, moments[1]) == ['W/"2"'], path
        assert versions(path, instant_text(int(time.time() * 1_000_000) + 1_000_000)) == ['W/"3"'], path
        assert versions(path, moments[0][:4]) == ['W/"3"', 'W/"2"', 'W/"1"'], path  # the whole year
    bad = http.get(f"/fhir/Patient/{pid}/_history", query_string={"_at": "yesterday"}, headers=h)
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"
