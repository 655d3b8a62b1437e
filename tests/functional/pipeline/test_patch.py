"""PATCH on every writable type: JSON Patch (application/json-patch+json) and FHIRPath Patch
(Parameters): the result validated as a PUT body, If-Match honoured, scope and consent as an
update, a new version in history, the AuditEvent an update; malformed documents 400, operations
that cannot apply 422, nothing stored on any error."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import BackendClient

JSON_PATCH = "application/json-patch+json"


def _patient(http: Any, h: dict[str, str]) -> dict[str, Any]:
    body = {"resourceType": "Patient", "name": [{"use": "official", "family": "Patchy", "given": ["Ann"]}],
            "gender": "female", "birthDate": "1970-01-01", "identifier": [{"system": "urn:x", "value": "1"}]}
    r = http.post("/fhir/Patient", json=body, headers=h)
    assert r.status_code == 201
    return dict(r.get_json())


def _op(kind: str, path: str, **parts: Any) -> dict[str, Any]:
    part = [{"name": "type", "valueCode": kind}, {"name": "path", "valueString": path}]
    for name, value in parts.items():
        if name == "name":
            part.append({"name": "name", "valueString": value})
        elif name in ("index", "source", "destination"):
            part.append({"name": name, "valueInteger": value})
        else:
            part.append({"name": "value", name: value})
    return {"name": "operation", "part": part}


def _fhirpath(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(ops)}


def test_json_patch(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    p = _patient(http, h)
    ops = [{"op": "replace", "path": "/gender", "value": "other"},
           {"op": "add", "path": "/name/0/given/-", "value": "Beth"},
           {"op": "remove", "path": "/birthDate"},
           {"op": "test", "path": "/name/0/family", "value": "Patchy"}]
    r = http.patch(f"/fhir/Patient/{p['id']}", json=ops, headers={**h, "Content-Type": JSON_PATCH, "If-Match": 'W/"1"'})
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["gender"] == "other" and body["name"][0]["given"] == ["Ann", "Beth"] and "birthDate" not in body
    assert body["meta"]["versionId"] == "2" and r.headers["ETag"] == 'W/"2"'
    assert http.get(f"/fhir/Patient/{p['id']}", headers=h).get_json() == body
    history = http.get(f"/fhir/Patient/{p['id']}/_history", headers=h).get_json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]


def test_fhirpath_patch(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    p = _patient(http, h)
    doc = _fhirpath(
        _op("replace", "Patient.gender", valueCode="male"),
        _op("add", "Patient", name="active", valueBoolean=True),
        _op("add", "Patient", name="telecom", valueContactPoint={"system": "phone", "value": "555"}),
        _op("insert", "Patient.name.where(use='official').given", valueString="Cara", index=0),
        _op("delete", "Patient.birthDate"),
        _op("add", "Patient", name="identifier", valueIdentifier={"system": "urn:y", "value": "2"}),
        _op("move", "Patient.identifier", source=1, destination=0),
        _op("delete", "Patient.deceased"),  # matches nothing: nothing to delete
    )
    r = http.patch(f"/fhir/Patient/{p['id']}", json=doc, headers=h)
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["gender"] == "male" and body["active"] is True and body["telecom"] == [{"system": "phone", "value": "555"}]
    assert body["name"][0]["given"] == ["Cara", "Ann"] and "birthDate" not in body
    assert [i["system"] for i in body["identifier"]] == ["urn:y", "urn:x"]


@pytest.mark.parametrize("ops, status", [
    ([{"op": "test", "path": "/gender", "value": "male"}], 422),  # a failed test
    ([{"op": "replace", "path": "/nope/0", "value": 1}], 422),  # a path that does not exist
    ([{"op": "replace", "path": "/gender", "value": "not-a-gender"}], 400),  # the result is invalid
    ([{"op": "replace", "path": "/id", "value": "other"}], 422),  # the id may not change
    ([{"op": "frobnicate", "path": "/gender"}], 400),  # not JSON Patch
    ({"op": "replace"}, 400),  # not an array
])
def test_json_patch_errors_store_nothing(http: Any, admin: BackendClient, ops: Any, status: int) -> None:
    h = admin.headers()
    p = _patient(http, h)
    r = http.patch(f"/fhir/Patient/{p['id']}", json=ops, headers={**h, "Content-Type": JSON_PATCH})
    assert r.status_code == status and r.get_json()["resourceType"] == "OperationOutcome", r.get_data(as_text=True)
    assert http.get(f"/fhir/Patient/{p['id']}", headers=h).get_json()["meta"]["versionId"] == "1"


@pytest.mark.parametrize("doc, status", [
    (_fhirpath(_op("replace", "Patient.name", valueString="x")), 422),  # two names? one: but wrong type -> invalid
    (_fhirpath(_op("replace", "Patient.deceased", valueBoolean=True)), 422),  # replace needs a match
    (_fhirpath(_op("add", "Patient", name="gender", valueCode="male")), 422),  # already set
    (_fhirpath(_op("add", "Patient", name="notAnElement", valueString="x")), 422),
    (_fhirpath({"name": "operation", "part": [{"name": "type", "valueCode": "explode"}]}), 400),
    ({"resourceType": "Observation", "status": "final"}, 422),  # a merge patch may not change the type
])
def test_fhirpath_patch_errors_store_nothing(http: Any, admin: BackendClient, doc: Any, status: int) -> None:
    h = admin.headers()
    p = _patient(http, h)
    r = http.patch(f"/fhir/Patient/{p['id']}", json=doc, headers=h)
    assert r.status_code in (status, 400), r.get_data(as_text=True)
    assert r.get_json()["resourceType"] == "OperationOutcome"
    assert http.get(f"/fhir/Patient/{p['id']}", headers=h).get_json()["meta"]["versionId"] == "1"


def test_if_match_scope_and_absent_targets(http: Any, admin: BackendClient, make_client: Any) -> None:
    h = admin.headers()
    p = _patient(http, h)
    ops = [{"op": "replace", "path": "/gender", "value": "other"}]
    stale = http.patch(f"/fhir/Patient/{p['id']}", json=ops, headers={**h, "Content-Type": JSON_PATCH, "If-Match": 'W/"7"'})
    assert stale.status_code == 412
    reader = make_client("system/Patient.rs")
    denied = http.patch(f"/fhir/Patient/{p['id']}", json=ops, headers={**reader.headers("system/Patient.rs"),
                                                                         "Content-Type": JSON_PATCH})
    assert denied.status_code == 403
    assert http.patch("/fhir/Patient/does-not-exist", json=ops, headers={**h, "Content-Type": JSON_PATCH}).status_code == 404
    assert http.patch("/fhir/AuditEvent/x", json=ops, headers={**h, "Content-Type": JSON_PATCH}).status_code == 405
    cs = http.get("/fhir/metadata").get_json()
    assert cs["patchFormat"] == ["application/json-patch+json", "application/fhir+json", "application/merge-patch+json"]
    patient_entry = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Patient")
    assert {"code": "patch"} in patient_entry["interaction"]


def test_patch_is_audited_as_an_update(http: Any, admin: BackendClient, auditor: BackendClient) -> None:
    h = admin.headers()
    p = _patient(http, h)
    r = http.patch(f"/fhir/Patient/{p['id']}", json=[{"op": "replace", "path": "/gender", "value": "other"}],
                   headers={**h, "Content-Type": JSON_PATCH})
    request_id = r.headers["X-Request-Id"]
    events = http.get(f"/fhir/AuditEvent?entity=Patient/{p['id']}&_count=50",
                      headers=auditor.headers("system/AuditEvent.rs")).get_json()["entry"]
    event = next(e["resource"] for e in events if any(
        x.get("what", {}).get("identifier", {}).get("value") == request_id for x in e["resource"]["entity"]))
    assert event["action"] == "U" and event["subtype"][0]["code"] == "patch"


# ------------------------------------------------------------------ bounded work (issue 29, item 4)
def amplification(copies: int = 21) -> list[dict[str, Any]]:
    """The red team's body: one note, then `copies` copies of the note array into itself (each
    doubles the document: 2**21 notes from 1.2 kB)."""
    return [{"op": "add", "path": "/note", "value": [{"text": "C"}]},
            *[{"op": "copy", "from": "/note", "path": "/note/-"} for _ in range(copies)]]


def test_copy_amplification_is_refused_before_the_work(http: Any, admin: BackendClient) -> None:
    h = {**admin.headers(), "Content-Type": JSON_PATCH}
    p = _patient(http, admin.headers())
    r = http.patch(f"/fhir/Patient/{p['id']}", json=amplification(), headers=h)
    assert r.status_code == 413, r.get_data(as_text=True)
    assert r.get_json()["issue"][0]["code"] == "too-costly"
    assert http.get(f"/fhir/Patient/{p['id']}", headers=admin.headers()).get_json()["meta"]["versionId"] == "1"
    # as many operations as a patch may hold: refused before any is applied
    many = [{"op": "test", "path": "/id", "value": p["id"]}] * 1001
    r = http.patch(f"/fhir/Patient/{p['id']}", json=many, headers=h)
    assert r.status_code == 413
    fhirpath = _fhirpath(*[_op("replace", "Patient.gender", valueCode="male")] * 1001)
    r = http.patch(f"/fhir/Patient/{p['id']}", json=fhirpath, headers={**admin.headers(),
                                                                        "Content-Type": "application/fhir+json"})
    assert r.status_code == 413


def test_a_modest_copy_still_works(http: Any, admin: BackendClient) -> None:
    """Copies are made as adds of the copied value: the result is RFC 6902's, the copy independent."""
    h = {**admin.headers(), "Content-Type": JSON_PATCH}
    p = _patient(http, admin.headers())
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "note test"},
           "subject": {"reference": f"Patient/{p['id']}"}}
    oid = http.post("/fhir/Observation", json=obs, headers=admin.headers()).get_json()["id"]
    ops = [{"op": "add", "path": "/note", "value": [{"text": "C"}]},
           *[{"op": "copy", "from": "/note/0", "path": "/note/-"}] * 3,
           {"op": "replace", "path": "/note/0/text", "value": "first"}]
    r = http.patch(f"/fhir/Observation/{oid}", json=ops, headers=h)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert [n["text"] for n in r.get_json()["note"]] == ["first", "C", "C", "C"]
    ops = [{"op": "copy", "from": "/name/0", "path": "/name/-"}, {"op": "replace", "path": "/name/1/family", "value": "Copy"}]
    r = http.patch(f"/fhir/Patient/{p['id']}", json=ops, headers=h)
    assert r.status_code == 200, r.get_data(as_text=True)
    body = http.get(f"/fhir/Patient/{p['id']}", headers=admin.headers()).get_json()
    assert [n["family"] for n in body["name"]] == ["Patchy", "Copy"]
