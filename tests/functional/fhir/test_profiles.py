"""Shipped profiles through HTTP: the HL7 vital-signs examples conform; a resource claiming
vitalsigns (or a specific vital profile) that breaks it is refused on create and update with a 422
OperationOutcome naming the element, and nothing is stored; `$validate?profile=` reports the same
issues; unknown claimed profiles are accepted; the CapabilityStatement lists the profiles; a new
profile is a JSON file, no code."""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fhirserver.app import create_app
from fhirserver.fhir.profiles import ProfileError, ProfileRegistry
from tests.conftest import REPO, example_files, load_example, make_settings

SD = "http://hl7.org/fhir/StructureDefinition/"
VITALSIGNS = SD + "vitalsigns"
VITAL_EXAMPLES = [p for p in example_files("Observation-") if VITALSIGNS in json.loads(p.read_text())
                  .get("meta", {}).get("profile", [])]
SPECIFIC = {"Observation-heart-rate.json": SD + "heartrate", "Observation-blood-pressure.json": SD + "bp",
            "Observation-blood-pressure-dar.json": SD + "bp", "Observation-blood-pressure-cancel.json": SD + "bp"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _heart_rate() -> dict[str, Any]:
    """A valid vital-signs Observation, without id (the file's id is the server's business)."""
    body = load_example("Observation-heart-rate.json")
    body.pop("id")
    body.pop("text")
    return body


def _post(http: Any, h: dict[str, str], path: str, body: dict[str, Any], **params: str) -> Any:
    return http.post(path, data=json.dumps(body), query_string=params, headers={**h, **FHIR_JSON})


def _put(http: Any, h: dict[str, str], path: str, body: dict[str, Any]) -> Any:
    return http.put(path, data=json.dumps(body), headers={**h, **FHIR_JSON})


def _errors(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return [i for i in outcome["issue"] if i["severity"] in ("error", "fatal")]


def _without_request_id(issues: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Error responses (not $validate's 200) end each diagnostics with the request id."""
    return [{**i, "diagnostics": re.sub(r" \(request id [^)]*\)$", "", i["diagnostics"])} for i in issues]


def _expressions(outcome: dict[str, Any]) -> set[str]:
    return {e for i in _errors(outcome) for e in i.get("expression", [])}


def _count(http: Any, h: dict[str, str], **params: str) -> int:
    resp = http.get("/fhir/Observation", query_string={"_summary": "count", **params}, headers=h)
    assert resp.status_code == 200, resp.get_json()
    return int(resp.get_json()["total"])


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.__setitem__(key, value)


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        for key in keys:
            body.pop(key)

    return change


def _quantity_system(body: dict[str, Any]) -> None:
    body["valueQuantity"]["system"] = "http://example.org/units"


# (id, change to a valid vital-signs Observation, the element the error must name, diagnostics hint)
BROKEN = [
    ("no-category", _drop("category"), "Observation.category", "category"),
    ("wrong-category", _set("category", [{"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]),
     "Observation.category", "VSCat"),
    ("no-subject", _drop("subject"), "Observation.subject", "subject"),
    ("subject-not-a-patient", _set("subject", {"reference": "Group/g1"}), "Observation.subject", "Patient"),
    ("no-effective", _drop("effectiveDateTime"), "Observation.effective", "effective"),
    ("effective-instant", lambda b: (b.pop("effectiveDateTime"), b.__setitem__("effectiveInstant",
                                                                               "2024-01-02T03:04:05Z")),
     "Observation.effectiveInstant", "dateTime, Period"),
    ("non-ucum-unit-system", _quantity_system, "Observation.valueQuantity.system", "unitsofmeasure"),
    ("no-value-no-dar", _drop("valueQuantity"), "Observation", "vs-2"),
    ("no-loinc-code", _set("code", {"coding": [{"system": "http://snomed.info/sct", "code": "364075005"}]}),
     "Observation.code.coding", "loinc"),
]


def _broken(change: Callable[[dict[str, Any]], None], claim: bool = True) -> dict[str, Any]:
    body = _heart_rate()
    change(body)
    if not claim:
        body.pop("meta")
    return body


def _assert_names(outcome: dict[str, Any], expression: str, hint: str) -> None:
    errors = _errors(outcome)
    assert errors, outcome
    named = [e for e in errors if expression in e.get("expression", [])]
    assert named, outcome
    assert any(hint.lower() in e["diagnostics"].lower() for e in named), outcome


# ---------------------------------------------------------------- the HL7 examples conform
def test_every_vitalsigns_example_is_exercised() -> None:
    if not VITAL_EXAMPLES:
        pytest.skip("HL7 examples not available")
    assert len(VITAL_EXAMPLES) >= 10


@pytest.mark.parametrize("path", VITAL_EXAMPLES, ids=lambda p: p.name)
def test_hl7_vitalsigns_examples_create_and_validate(http, admin, path: Path) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    body = json.loads(path.read_text())
    created = _post(http, h, "/fhir/Observation", body)
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["meta"]["profile"] == [VITALSIGNS]
    for profile in (VITALSIGNS, SPECIFIC.get(path.name)):
        if profile:
            out = _post(http, h, "/fhir/Observation/$validate", body, profile=profile)
            assert out.status_code == 200 and not _errors(out.get_json()), (profile, out.get_json())
            assert out.get_json()["issue"][0]["diagnostics"].startswith("All OK")


# ---------------------------------------------------------------- violations are refused
@pytest.mark.parametrize(("change", "expression", "hint"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_violations_are_refused_on_create_and_update(http, admin, change, expression, hint) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    good = _post(http, h, "/fhir/Observation", _heart_rate())
    assert good.status_code == 201, good.get_json()
    oid = good.get_json()["id"]
    before = _count(http, h)
    bad = _broken(change)

    created = _post(http, h, "/fhir/Observation", bad)
    assert created.status_code == 422, created.get_json()
    _assert_names(created.get_json(), expression, hint)

    updated = _put(http, h, f"/fhir/Observation/{oid}", {**bad, "id": oid})
    assert updated.status_code == 422, updated.get_json()
    _assert_names(updated.get_json(), expression, hint)

    as_create = _put(http, h, "/fhir/Observation/vs-new", {**bad, "id": "vs-new"})
    assert as_create.status_code == 422, as_create.get_json()
    _assert_names(as_create.get_json(), expression, hint)

    # nothing stored: no new resource, no new version, and the update-as-create id is unknown
    assert _count(http, h) == before
    current = http.get(f"/fhir/Observation/{oid}", headers=h).get_json()
    assert current["meta"]["versionId"] == "1"
    assert current["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert http.get("/fhir/Observation/vs-new", headers=h).status_code == 404


@pytest.mark.parametrize(("change", "expression", "hint"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_validate_operation_reports_the_same_issues(http, admin, change, expression, hint) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    before = _count(http, h)
    on_write = _post(http, h, "/fhir/Observation", _broken(change)).get_json()
    # the profile named as a parameter (resource claims nothing) and as a Parameters body
    by_param = _post(http, h, "/fhir/Observation/$validate", _broken(change, claim=False), profile=VITALSIGNS)
    assert by_param.status_code == 200
    _assert_names(by_param.get_json(), expression, hint)
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": _broken(change, claim=False)},
        {"name": "mode", "valueCode": "create"}, {"name": "profile", "valueCanonical": VITALSIGNS}]}
    by_body = _post(http, h, "/fhir/Observation/$validate", params)
    # ... and the claim in meta.profile: all the same issues as the refused write
    by_claim = _post(http, h, "/fhir/Observation/$validate", _broken(change))
    for out in (by_param, by_body, by_claim):
        assert out.status_code == 200
        assert _errors(out.get_json()) == _without_request_id(_errors(on_write))
    assert _count(http, h) == before


def test_transaction_with_a_violation_stores_nothing(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    patient = "urn:uuid:5b4cbb1c-36a4-4a55-8d64-1b7c3c2f9d10"
    good, bad = _heart_rate(), _broken(_drop("effectiveDateTime"))
    good["subject"] = bad["subject"] = {"reference": patient}  # not resolvable locally: not checked
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient, "resource": {"resourceType": "Patient", "name": [{"family": "Txvital"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": good, "request": {"method": "POST", "url": "Observation"}},
        {"resource": bad, "request": {"method": "POST", "url": "Observation"}},
    ]}
    before = _count(http, h)
    resp = _post(http, h, "/fhir", bundle)
    assert resp.status_code == 422, resp.get_json()
    assert any(e.endswith("Observation.effective") for e in _expressions(resp.get_json()))
    assert _count(http, h) == before
    found = http.get("/fhir/Patient", query_string={"family": "Txvital"}, headers=h).get_json()
    assert not found.get("entry")


def test_profiles_apply_only_when_claimed(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    plain = _broken(_drop("category", "subject"), claim=False)
    assert _post(http, h, "/fhir/Observation", plain).status_code == 201
    out = _post(http, h, "/fhir/Observation/$validate", plain).get_json()
    assert not _errors(out)


def test_unknown_claimed_profile_is_accepted(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    other = "http://example.org/fhir/StructureDefinition/my-observation"
    body = _broken(_drop("category", "subject"))
    body["meta"] = {"profile": [other, VITALSIGNS + "|9.9.9"]}  # another IG; a version we do not ship
    created = _post(http, h, "/fhir/Observation", body)
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["meta"]["profile"] == [other, VITALSIGNS + "|9.9.9"]
    out = _post(http, h, "/fhir/Observation/$validate", body).get_json()
    assert not _errors(out)
    notes = [i for i in out["issue"] if i["severity"] == "information" and "not known" in i["diagnostics"]]
    assert [n["expression"] for n in notes] == [["Observation.meta.profile[0]"], ["Observation.meta.profile[1]"]]
    # a profile *asked for* by $validate that the server does not ship stays an error
    asked = _post(http, h, "/fhir/Observation/$validate", body, profile=other).get_json()
    assert any("not known" in e["diagnostics"] for e in _errors(asked))


def test_versioned_claim_is_checked(http, admin) -> None:  # type: ignore[no-untyped-def]
    body = _broken(_drop("subject"))
    body["meta"] = {"profile": [VITALSIGNS + "|4.0.1"]}
    resp = _post(http, admin.headers(), "/fhir/Observation", body)
    assert resp.status_code == 422
    _assert_names(resp.get_json(), "Observation.subject", "subject")


def test_specific_vital_profiles(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    temperature = load_example("Observation-body-temperature.json")
    temperature["meta"] = {"profile": [SD + "heartrate"]}  # wrong LOINC code and unit for a heart rate
    resp = _post(http, h, "/fhir/Observation", temperature)
    assert resp.status_code == 422
    assert {"Observation.code.coding", "Observation.valueQuantity.code"} <= _expressions(resp.get_json())

    bp = load_example("Observation-blood-pressure.json")
    bp["component"] = bp["component"][:1]  # systolic only
    bp["component"][0]["valueQuantity"]["code"] = "kPa"
    out = _post(http, h, "/fhir/Observation/$validate", bp, profile=SD + "bp").get_json()
    assert {"Observation.component", "Observation.component[0].valueQuantity.code"} <= _expressions(out)
    assert any("DiastolicBP" in e["diagnostics"] for e in _errors(out))
    # the specific profile also checks its base, vitalsigns
    weight = _broken(_drop("subject"))
    weight["code"] = {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]}
    weight["valueQuantity"] = {"value": 70, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}
    weight["meta"] = {"profile": [SD + "bodyweight"]}
    resp = _post(http, h, "/fhir/Observation", weight)
    assert resp.status_code == 422 and _expressions(resp.get_json()) == {"Observation.subject"}


def test_profile_for_another_type(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    patient = {"resourceType": "Patient", "meta": {"profile": [VITALSIGNS]}, "gender": "female"}
    resp = _post(http, h, "/fhir/Patient", patient)
    assert resp.status_code == 422 and _expressions(resp.get_json()) == {"Patient.meta.profile[0]"}
    out = _post(http, h, "/fhir/Patient/$validate", {"resourceType": "Patient"}, profile=VITALSIGNS).get_json()
    assert any("constrains Observation" in e["diagnostics"] for e in _errors(out))


def test_contained_resources_are_checked(http, admin) -> None:  # type: ignore[no-untyped-def]
    inner = {**_broken(_drop("subject")), "id": "hr"}
    outer = {**_heart_rate(), "contained": [inner], "hasMember": [{"reference": "#hr"}]}
    resp = _post(http, admin.headers(), "/fhir/Observation", outer)
    assert resp.status_code == 422
    assert _expressions(resp.get_json()) == {"Observation.contained[0].subject"}


def test_capability_statement_lists_the_profiles(http) -> None:  # type: ignore[no-untyped-def]
    cs = http.get("/fhir/metadata").get_json()
    observation = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Observation")
    assert {VITALSIGNS, SD + "heartrate", SD + "bp", SD + "bodyweight"} <= set(observation["supportedProfile"])


# ---------------------------------------------------------------- adding a profile is data
def test_a_new_profile_is_only_a_json_file(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO / "profiles", profiles)
    url = "http://example.org/fhir/StructureDefinition/member"
    (profiles / "StructureDefinition-member.json").write_text(json.dumps({
        "resourceType": "StructureDefinition", "id": "member", "url": url, "name": "Member", "status": "draft",
        "kind": "resource", "abstract": False, "type": "Patient", "derivation": "constraint",
        "baseDefinition": SD + "Patient",
        "differential": {"element": [
            {"id": "Patient.identifier", "path": "Patient.identifier", "min": 1,
             "slicing": {"discriminator": [{"type": "value", "path": "system"}], "rules": "closed"}},
            {"id": "Patient.identifier:member", "path": "Patient.identifier", "sliceName": "member",
             "min": 1, "max": "1"},
            {"id": "Patient.identifier:member.system", "path": "Patient.identifier.system", "min": 1,
             "fixedUri": "http://example.org/members"},
            {"id": "Patient", "path": "Patient", "constraint": [
                {"key": "mem-1", "severity": "error", "human": "A member has a name or a telecom",
                 "expression": "name.exists() or telecom.exists()"},
                {"key": "mem-2", "severity": "error", "human": "birthDate is a full date",
                 "expression": "birthDate.toString().length() = 10"}]},
            {"id": "Patient.birthDate", "path": "Patient.birthDate", "min": 1},
            {"id": "Patient.deceased[x]", "path": "Patient.deceased[x]", "type": [{"code": "boolean"}]},
        ]},
    }))
    app = create_app(make_settings(tmp_path, profiles_dir=str(profiles)))
    try:
        from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
        from fhirserver.auth.clients import register_backend_client

        svc = app.extensions["fhirserver"]
        http = app.test_client()
        key = generate_key()
        rec = register_backend_client(svc.engine, "profile test", "system/*.cruds", jwks=public_jwks(key))
        form = token_request_form(key, rec.client_id, svc.settings.token_url, "system/*.cruds")
        h = {"Authorization": f"Bearer {http.post('/auth/token', data=form).get_json()['access_token']}"}

        good = {"resourceType": "Patient", "meta": {"profile": [url]}, "birthDate": "1970-01-01",
                "name": [{"family": "Member"}],
                "identifier": [{"system": "http://example.org/members", "value": "m-1"}]}
        assert _post(http, h, "/fhir/Patient", good).status_code == 201
        # a constraint outside the FHIRPath subset is not guessed: $validate says it was not evaluated
        notes = _post(http, h, "/fhir/Patient/$validate", good).get_json()["issue"]
        assert notes[0]["diagnostics"] == "All OK"
        assert any("mem-2" in n["diagnostics"] and "not evaluated" in n["diagnostics"] for n in notes)
        bad = copy.deepcopy(good)
        bad.pop("birthDate")
        bad.pop("name")
        bad["identifier"].append({"system": "http://example.org/other", "value": "x"})
        bad["deceasedDateTime"] = "2020-01-01"
        resp = _post(http, h, "/fhir/Patient", bad)
        assert resp.status_code == 422
        assert _expressions(resp.get_json()) == {"Patient", "Patient.birthDate", "Patient.identifier[1]",
                                                 "Patient.deceasedDateTime"}
        assert any(e["diagnostics"].startswith("mem-1:") for e in _errors(resp.get_json()))
        cs = http.get("/fhir/metadata").get_json()
        patient = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Patient")
        assert url in patient["supportedProfile"]
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_a_profile_the_evaluator_cannot_apply_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "StructureDefinition-x.json").write_text(json.dumps({
        "resourceType": "StructureDefinition", "url": "http://example.org/x", "type": "Patient",
        "derivation": "constraint", "baseDefinition": SD + "Patient",
        "differential": {"element": [
            {"id": "Patient.identifier", "path": "Patient.identifier",
             "slicing": {"discriminator": [{"type": "profile", "path": "$this"}], "rules": "open"}},
            {"id": "Patient.identifier:a", "path": "Patient.identifier", "sliceName": "a", "min": 1},
        ]},
    }))
    with pytest.raises(ProfileError, match="discriminator"):
        ProfileRegistry.load(tmp_path)


# ------------------------------------------------------------------ required profiles (setting)
def test_required_profiles_apply_to_every_write_of_the_type(tmp_path: Path) -> None:
    """`required_profiles`: an Observation that does not meet the heart-rate profile is refused
    although it claims nothing; one that meets it is stored; $validate reports the same."""
    from tests.support.apps import app_with_client

    _app, http, h = app_with_client(make_settings(tmp_path, required_profiles=f"Observation={SD}heartrate"),
                                    name="required profiles client")
    assert _post(http, h, "/fhir/Observation", _heart_rate()).status_code == 201
    weight = _heart_rate()
    weight["code"] = {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]}
    refused = _post(http, h, "/fhir/Observation", weight)
    assert refused.status_code == 422 and _errors(refused.get_json())
    checked = _post(http, h, "/fhir/Observation/$validate", weight)
    assert checked.status_code == 200 and _errors(checked.get_json())
    assert _post(http, h, "/fhir/Patient", {"resourceType": "Patient"}).status_code == 201  # other types: unaffected


def test_an_unknown_required_profile_stops_the_server_from_starting(tmp_path: Path) -> None:
    from tests.support.cli import cli

    run = cli("client", "list", data_dir=tmp_path / "data",
              FHIRSERVER_REQUIRED_PROFILES="Observation=http://example.org/StructureDefinition/nowhere")
    assert run.returncode != 0
    assert "required_profiles" in run.stderr and "Fix:" in run.stderr and "Traceback" not in run.stderr
