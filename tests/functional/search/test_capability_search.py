"""The CapabilityStatement declares what search answers: the R4 composite parameters (and they
work: a blood-pressure query no longer returns every Observation), every `_include` target of a
type's reference parameters and every `_revinclude` source that may point at it."""

from __future__ import annotations

from typing import Any

from tests.conftest import BackendClient

LOINC = "http://loinc.org"


def _obs(pid: str, code: str, value: float | None = None, components: list[tuple[str, float]] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Observation", "status": "final",
                            "code": {"coding": [{"system": LOINC, "code": code}]},
                            "subject": {"reference": f"Patient/{pid}"}}
    if value is not None:
        body["valueQuantity"] = {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
    if components:
        body["component"] = [{"code": {"coding": [{"system": LOINC, "code": c}]},
                              "valueQuantity": {"value": v, "unit": "mmHg", "system": "http://unitsofmeasure.org",
                                                "code": "mm[Hg]"}} for c, v in components]
    return body


def test_composites_are_declared_and_answer(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).get_json()["id"]
    ids = {}
    for name, body in (("high", _obs(pid, "85354-9", components=[("8480-6", 150), ("8462-4", 95)])),
                       ("normal", _obs(pid, "85354-9", components=[("8480-6", 118), ("8462-4", 76)])),
                       ("hr", _obs(pid, "8867-4", value=72))):
        ids[name] = http.post("/fhir/Observation", json=body, headers=h).get_json()["id"]

    def found(query: str) -> set[str]:
        r = http.get(f"/fhir/Observation?patient={pid}&{query}", headers={**h, "Prefer": "handling=strict"})
        assert r.status_code == 200, r.get_data(as_text=True)
        return {e["resource"]["id"] for e in r.get_json().get("entry", [])}

    assert found(f"component-code-value-quantity={LOINC}|8480-6$gt140") == {ids["high"]}
    assert found("component-code-value-quantity=8480-6$lt140") == {ids["normal"]}
    assert found("combo-code-value-quantity=8462-4$ge90") == {ids["high"]}
    assert found("code-value-quantity=8867-4$gt60") == {ids["hr"]}
    assert found("code-value-quantity=8867-4$lt60") == set()
    cs = http.get("/fhir/metadata").get_json()
    obs = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Observation")
    declared = {p["name"]: p["type"] for p in obs["searchParam"]}
    for name in ("code-value-quantity", "combo-code-value-quantity", "component-code-value-quantity",
                 "code-value-concept", "code-value-date", "code-value-string"):
        assert declared[name] == "composite"


def test_includes_are_declared_and_each_works(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).get_json()["id"]
    oid = http.post("/fhir/Observation", json=_obs(pid, "8867-4", 60), headers=h).get_json()["id"]
    cs = http.get("/fhir/metadata").get_json()
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert "Observation:subject" in by_type["Observation"]["searchInclude"]
    assert "Observation:patient" in by_type["Observation"]["searchInclude"]
    assert "Observation:subject" in by_type["Patient"]["searchRevInclude"]
    for rtype, entry in by_type.items():
        for inc in entry.get("searchInclude", []):
            r = http.get(f"/fhir/{rtype}?_include={inc}", headers={**h, "Prefer": "handling=strict"})
            assert r.status_code in (200, 403), (inc, r.get_data(as_text=True)[:200])
        for rev in entry.get("searchRevInclude", []):
            r = http.get(f"/fhir/{rtype}?_revinclude={rev}", headers={**h, "Prefer": "handling=strict"})
            assert r.status_code in (200, 403), (rev, r.get_data(as_text=True)[:200])
    bundle = http.get(f"/fhir/Observation?_id={oid}&_include=Observation:subject", headers=h).get_json()
    assert {(e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle["entry"]} == {
        ("Observation", "match"), ("Patient", "include")}
    bundle = http.get(f"/fhir/Patient?_id={pid}&_revinclude=Observation:subject", headers=h).get_json()
    assert {(e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle["entry"]} == {
        ("Patient", "match"), ("Observation", "include")}
