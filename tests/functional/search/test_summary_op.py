"""Patient/[id]/$summary: an IPS-shaped document Bundle of exactly the patient's visible data --
sections with narratives and entries (or an empty reason), every referenced resource included and
valid R4; the caller's scopes and the patient's consents apply as for $everything; audited."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.bundle import Bundle

from tests.conftest import BackendClient

CAT = "http://terminology.hl7.org/CodeSystem/observation-category"


def obs(pid: str, category: str, code: str, value: float) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "category": [{"coding": [{"system": CAT, "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": f"code {code}"}]},
            "effectiveDateTime": "2025-03-04", "valueQuantity": {"value": value, "unit": "u"}}


def test_summary_is_an_ips_document_of_the_patient(http: Any, admin: BackendClient, make_client: Any) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Summary"}]},
                    headers=h).get_json()["id"]
    other = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).get_json()["id"]
    made = [http.post("/fhir/Observation", json=obs(pid, "vital-signs", "8867-4", 72), headers=h).get_json()["id"],
            http.post("/fhir/Observation", json=obs(pid, "laboratory", "2339-0", 5.4), headers=h).get_json()["id"]]
    http.post("/fhir/Observation", json=obs(other, "laboratory", "2339-0", 9.9), headers=h)
    cond = http.post("/fhir/Condition", headers=h, json={
        "resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
        "code": {"text": "Hypertension"},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]}}).get_json()["id"]
    resp = http.get(f"/fhir/Patient/{pid}/$summary", headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    Bundle.model_validate(body)  # valid R4 (fhir.resources)
    assert body["type"] == "document" and body["identifier"]["value"].startswith("urn:uuid:")
    comp = body["entry"][0]["resource"]
    assert comp["resourceType"] == "Composition" and comp["type"]["coding"][0]["code"] == "60591-5"
    sections = {s["code"]["coding"][0]["code"]: s for s in comp["section"]}
    assert sections["11450-4"]["entry"] == [{"reference": f"Condition/{cond}"}]
    assert "Hypertension" in sections["11450-4"]["text"]["div"]
    assert sections["48765-2"]["emptyReason"]["coding"][0]["code"] == "unavailable"  # required, no allergies
    assert sections["8716-3"]["entry"] == [{"reference": f"Observation/{made[0]}"}]
    assert sections["30954-2"]["entry"] == [{"reference": f"Observation/{made[1]}"}]
    refs = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body["entry"][1:]}
    assert refs == {f"Patient/{pid}", f"Condition/{cond}", *(f"Observation/{m}" for m in made)}
    # scopes apply: without Condition access the problems section is empty; another patient's is 404
    narrow = make_client("system/Patient.rs system/Observation.rs", default_scope="system/Patient.rs system/Observation.rs")
    slim = http.get(f"/fhir/Patient/{pid}/$summary", headers=narrow.headers()).get_json()
    slim_sections = {s["code"]["coding"][0]["code"]: s for s in slim["entry"][0]["resource"]["section"]}
    assert "entry" not in slim_sections["11450-4"] and "emptyReason" in slim_sections["11450-4"]
    assert http.get("/fhir/Patient/nobody/$summary", headers=h).status_code == 404
    cs = http.get("/fhir/metadata").get_json()
    patient = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Patient")
    assert any(o["name"] == "summary" for o in patient["operation"])
