"""A patient app with a granular v2 scope (`patient/Observation.rs?category=laboratory`) sees only
the patient's laboratory results: not through search, read, _include, _revinclude, chaining,
_has or $everything, and never another patient's data."""

from __future__ import annotations

from typing import Any

from tests.functional.smart.conftest import Smart

CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
SCOPE = f"launch/patient patient/Patient.rs patient/Observation.rs?category={CAT}|laboratory"


def _ids(bundle: dict[str, Any], rtype: str) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == rtype}


def test_granular_scope_does_not_leak(smart: Smart) -> None:
    me, other = smart.patient("Granular"), smart.patient("Stranger")
    lab = smart.observation(me, code="718-7", category="laboratory")
    vital = smart.observation(me, code="8867-4", category="vital-signs")
    smart.observation(other, code="718-7", category="laboratory")
    user, _ = smart.user(f"Patient/{me}")
    client_id, _ = smart.app_client(scopes=SCOPE)
    tok = smart.tokens(client_id, SCOPE, user)["access_token"]

    def get(path: str, **params: str) -> dict[str, Any]:
        resp = smart.get(path, tok, query_string=params)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp.get_json()

    found = get("/fhir/Observation")
    assert _ids(found, "Observation") == {lab} and found["total"] == 1
    assert smart.get(f"/fhir/Observation/{vital}", tok).status_code == 404
    rev = get("/fhir/Patient", _revinclude="Observation:subject")
    assert _ids(rev, "Patient") == {me} and _ids(rev, "Observation") == {lab}
    inc = get("/fhir/Observation", _include="Observation:subject")
    assert _ids(inc, "Patient") == {me}
    assert get("/fhir/Observation", **{"subject:Patient.name": "Stranger"}).get("total") == 0
    assert get("/fhir/Observation", **{"subject:Patient.name": "Granular"}).get("total") == 1
    has_vital = get("/fhir/Patient", **{"_has:Observation:subject:code": "http://loinc.org|8867-4"})
    assert has_vital.get("total") == 0  # the hidden vital sign does not make the patient match
    has_lab = get("/fhir/Patient", **{"_has:Observation:subject:code": "http://loinc.org|718-7"})
    assert _ids(has_lab, "Patient") == {me}
    everything = get(f"/fhir/Patient/{me}/$everything")
    assert _ids(everything, "Observation") == {lab} and _ids(everything, "Patient") == {me}
    assert smart.get(f"/fhir/Patient/{other}/$everything", tok).status_code == 404
