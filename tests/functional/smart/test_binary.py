"""Binary (a document's bytes, referenced from a DocumentReference) is patient data without a
place in the R4 Patient compartment. It is served with two safeguards, both data in the registry:

- reading or writing it needs a scope that names Binary (`system/Binary.rs`; a wildcard
  `system/*.rs` does not grant it), and
- a Binary whose `securityContext` names a patient's resource joins that patient's compartments,
  so patient scopes, the patient's consents, `$everything` and erasure cover it; one without
  (or pointing to nothing stored) belongs to no patient and is readable with a Binary scope only.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.conftest import BackendClient
from tests.functional.smart.conftest import Smart

DATA = base64.b64encode(b"Discharge letter").decode()


def binary(context: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Binary", "contentType": "text/plain", "data": DATA}
    if context:
        body["securityContext"] = {"reference": context}
    return body


@pytest.fixture
def writer(make_client: Any) -> BackendClient:
    """A back office that may write Binaries (the scope names the type) and the rest."""
    return make_client("system/Binary.cruds system/*.cruds", default_scope="system/Binary.cruds system/*.cruds",
                       settings={"consent_exempt": True})


def test_a_wildcard_scope_does_not_grant_binaries(http: Any, admin: BackendClient, make_client: Any,
                                                  writer: BackendClient) -> None:
    refused = http.post("/fhir/Binary", json=binary(), headers=admin.headers())  # system/*.cruds
    assert refused.status_code == 403 and "system/Binary.rs" in refused.get_json()["issue"][0]["diagnostics"]
    resp = http.post("/fhir/Binary", json=binary(), headers=writer.headers())
    assert resp.status_code == 201, resp.get_data(as_text=True)
    bid = resp.get_json()["id"]
    wildcard = make_client("system/*.rs", default_scope="system/*.rs")
    for path in (f"/fhir/Binary/{bid}", "/fhir/Binary"):
        got = http.get(path, headers=wildcard.headers())
        assert got.status_code == 403 and "system/Binary.rs" in got.get_json()["issue"][0]["diagnostics"]
    reader = make_client("system/Binary.rs", default_scope="system/Binary.rs")
    got = http.get(f"/fhir/Binary/{bid}", headers=reader.headers())
    assert got.status_code == 200 and got.get_json()["data"] == DATA


def test_security_context_puts_the_binary_in_the_patients_compartment(smart: Smart, writer: BackendClient) -> None:
    me, other = smart.patient("Binaryowner"), smart.patient("Binarystranger")
    h = writer.headers()
    doc = smart.http.post("/fhir/DocumentReference", headers=h, json={
        "resourceType": "DocumentReference", "status": "current", "subject": {"reference": f"Patient/{me}"},
        "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/placeholder"}}]}).get_json()["id"]
    via_doc = smart.http.post("/fhir/Binary", json=binary(f"DocumentReference/{doc}"), headers=h).get_json()["id"]
    via_patient = smart.http.post("/fhir/Binary", json=binary(f"Patient/{me}"), headers=h).get_json()["id"]
    theirs = smart.http.post("/fhir/Binary", json=binary(f"Patient/{other}"), headers=h).get_json()["id"]
    nobody = smart.http.post("/fhir/Binary", json=binary("DocumentReference/not-stored"), headers=h).get_json()["id"]
    scope = "launch/patient patient/Patient.rs patient/Binary.rs"
    user, _ = smart.user(f"Patient/{me}")
    client_id, _ = smart.app_client(scopes=scope)
    tok = smart.tokens(client_id, scope, user)["access_token"]
    for bid, status in ((via_doc, 200), (via_patient, 200), (theirs, 404), (nobody, 404)):
        assert smart.get(f"/fhir/Binary/{bid}", tok).status_code == status, bid
    found = smart.get("/fhir/Binary", tok).get_json()
    assert {e["resource"]["id"] for e in found.get("entry", [])} == {via_doc, via_patient}
    everything = smart.get(f"/fhir/Patient/{me}/$everything", tok).get_json()
    assert {via_doc, via_patient} <= {e["resource"]["id"] for e in everything["entry"]}


def test_the_patients_consent_governs_their_binaries(smart: Smart, make_client: Any, writer: BackendClient) -> None:
    me = smart.patient("Binaryconsent")
    bid = smart.http.post("/fhir/Binary", json=binary(f"Patient/{me}"), headers=writer.headers()).get_json()["id"]
    treat = make_client("system/Binary.rs", default_scope="system/Binary.rs")
    assert smart.http.get(f"/fhir/Binary/{bid}", headers=treat.headers()).status_code == 200
    deny = {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{me}"}, "provision": {"type": "deny"}}
    assert smart.http.post("/fhir/Consent", json=deny, headers=smart.admin.headers()).status_code == 201
    assert smart.http.get(f"/fhir/Binary/{bid}", headers=treat.headers()).status_code == 404
