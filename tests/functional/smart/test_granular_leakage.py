"""A patient app with a granular v2 scope (`patient/Observation.rs?category=laboratory`, and the
same on Condition and DiagnosticReport) sees only the patient's laboratory results: not through search, read, _include, _revinclude, chaining,
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


# the record types (issue 14): a granular category scope on Condition and DiagnosticReport, the US
# Core way (patient/Condition.rs?category=...), holds on every read path too
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
DR_CAT = "http://terminology.hl7.org/CodeSystem/v2-0074"
RECORD_CASES = [
    ("Condition", COND_CAT, "problem-list-item", "encounter-diagnosis", "http://snomed.info/sct", "38341003"),
    ("DiagnosticReport", DR_CAT, "LAB", "RAD", "http://loinc.org", "58410-2"),
]


def _record(rtype: str, pid: str, system: str, category: str, code_system: str, code: str) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": rtype, "subject": {"reference": f"Patient/{pid}"},
                            "category": [{"coding": [{"system": system, "code": category}]}],
                            "code": {"coding": [{"system": code_system, "code": code}]}}
    if rtype == "DiagnosticReport":
        body["status"] = "final"
    return body


def test_granular_scope_on_record_types_does_not_leak(smart: Smart) -> None:
    me, other = smart.patient("Granularrec"), smart.patient("Strangerrec")
    user, _ = smart.user(f"Patient/{me}")
    for rtype, system, allowed, hidden, code_system, code in RECORD_CASES:
        made = {}
        for pid, cat, hidden_code in ((me, allowed, code), (me, hidden, "999"), (other, allowed, code)):
            resp = smart.http.post(f"/fhir/{rtype}", json=_record(rtype, pid, system, cat, code_system, hidden_code),
                                   headers=smart.admin.headers())
            assert resp.status_code == 201, resp.get_data(as_text=True)
            made[(pid, cat)] = resp.get_json()["id"]
        mine, secret = made[(me, allowed)], made[(me, hidden)]
        scope = f"launch/patient patient/Patient.rs patient/{rtype}.rs?category={system}|{allowed}"
        client_id, _ = smart.app_client(scopes=scope)
        tok = smart.tokens(client_id, scope, user)["access_token"]

        def get(path: str, tok: str = tok, **params: str) -> dict[str, Any]:
            resp = smart.get(path, tok, query_string=params)
            assert resp.status_code == 200, resp.get_data(as_text=True)
            return resp.get_json()

        found = get(f"/fhir/{rtype}")
        assert _ids(found, rtype) == {mine} and found["total"] == 1, rtype
        assert get(f"/fhir/{rtype}", _summary="count")["total"] == 1
        assert smart.get(f"/fhir/{rtype}/{secret}", tok).status_code == 404
        assert smart.get(f"/fhir/{rtype}/{made[(other, allowed)]}", tok).status_code == 404
        rev = get("/fhir/Patient", _revinclude=f"{rtype}:subject")
        assert _ids(rev, "Patient") == {me} and _ids(rev, rtype) == {mine}
        assert _ids(get(f"/fhir/{rtype}", _include=f"{rtype}:subject"), "Patient") == {me}
        assert get(f"/fhir/{rtype}", **{"subject:Patient.name": "Strangerrec"}).get("total") == 0
        assert get("/fhir/Patient", **{f"_has:{rtype}:subject:code": "999"}).get("total") == 0
        assert _ids(get("/fhir/Patient", **{f"_has:{rtype}:subject:code": code}), "Patient") == {me}
        everything = get(f"/fhir/Patient/{me}/$everything")
        assert _ids(everything, rtype) == {mine}
        assert smart.get(f"/fhir/Patient/{other}/$everything", tok).status_code == 404
        # and the other record types are not granted at all by this scope
        assert smart.get("/fhir/Encounter", tok).status_code == 403
