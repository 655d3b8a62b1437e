"""$validate through HTTP: the same validation as a write, answered as an OperationOutcome,
nothing stored, audited; modes create/update/delete; Parameters bodies; unknown profiles."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import example_files, raw_db

GOOD = {"resourceType": "Patient", "name": [{"family": "Valid"}], "gender": "female"}


def _post(http: Any, h: dict[str, str], path: str, body: dict[str, Any], **params: str) -> Any:
    return http.post(path, data=json.dumps(body), query_string=params,
                     headers={**h, "Content-Type": "application/fhir+json"})


def _rows(settings: Any, rtype: str) -> int:
    with raw_db(settings) as cx:
        return int(cx.execute("SELECT count(*) FROM resource WHERE type = ?", (rtype,)).fetchone()[0])


def _errors(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    assert outcome["resourceType"] == "OperationOutcome"
    return [i for i in outcome["issue"] if i["severity"] in ("error", "fatal")]


def test_valid_and_invalid_resources_store_nothing(http, admin, settings) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    before = _rows(settings, "Patient")
    ok = _post(http, h, "/fhir/Patient/$validate", GOOD)
    assert ok.status_code == 200 and not _errors(ok.get_json())
    assert ok.get_json()["issue"][0]["diagnostics"].startswith("All OK")
    bad = _post(http, h, "/fhir/Patient/$validate", {**GOOD, "gender": "sometimes", "colour": "blue"})
    assert bad.status_code == 200
    errors = _errors(bad.get_json())
    assert errors and any("Patient" in " ".join(e.get("expression", [])) for e in errors)
    wrong_type = _post(http, h, "/fhir/Observation/$validate", GOOD)
    assert _errors(wrong_type.get_json())
    assert _rows(settings, "Patient") == before


def test_parameters_body_and_modes(http, admin) -> None:  # type: ignore[no-untyped-def]
    h = admin.headers()
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": GOOD},
                                                          {"name": "mode", "valueCode": "create"}]}
    assert not _errors(_post(http, h, "/fhir/Patient/$validate", params).get_json())
    pid = http.post("/fhir/Patient", json=GOOD, headers=h).get_json()["id"]
    upd = _post(http, h, f"/fhir/Patient/{pid}/$validate", {**GOOD, "id": pid}, mode="update")
    assert not _errors(upd.get_json())
    mismatch = _post(http, h, f"/fhir/Patient/{pid}/$validate", {**GOOD, "id": "other"}, mode="update")
    assert _errors(mismatch.get_json())
    delete_ok = http.post(f"/fhir/Patient/{pid}/$validate", query_string={"mode": "delete"}, headers=h)
    assert delete_ok.status_code == 200 and not _errors(delete_ok.get_json())
    missing = http.post("/fhir/Patient/nope/$validate", query_string={"mode": "delete"}, headers=h)
    assert missing.status_code == 404
    assert _post(http, h, "/fhir/Patient/$validate", GOOD, mode="upsert").status_code == 400
    assert http.post("/fhir/Patient/$validate", headers=h).status_code == 400  # nothing to validate
    assert http.get(f"/fhir/Patient/{pid}", headers=h).get_json()["meta"]["versionId"] == "1"


def test_unknown_profile_is_reported(http, admin) -> None:  # type: ignore[no-untyped-def]
    out = _post(http, admin.headers(), "/fhir/Patient/$validate", GOOD,
                profile="http://example.org/StructureDefinition/unknown").get_json()
    assert any("not known" in e["diagnostics"] for e in _errors(out))


def test_validate_needs_a_token_and_is_audited(http, admin, settings) -> None:  # type: ignore[no-untyped-def]
    assert _post(http, {}, "/fhir/Patient/$validate", GOOD).status_code == 401
    h = admin.headers()  # the token request is audited too: fetch it first
    with raw_db(settings) as cx:
        before = cx.execute("SELECT count(*) FROM access_record").fetchone()[0]
    _post(http, h, "/fhir/Patient/$validate", GOOD)
    with raw_db(settings) as cx:
        assert cx.execute("SELECT count(*) FROM access_record").fetchone()[0] == before + 1


@pytest.mark.parametrize("path", example_files()[:40], ids=lambda p: p.name)
def test_official_examples_validate_clean(http, admin, path) -> None:  # type: ignore[no-untyped-def]
    body = json.loads(path.read_text())
    resp = _post(http, admin.headers(), f"/fhir/{body['resourceType']}/$validate", body)
    assert resp.status_code == 200 and not _errors(resp.get_json()), resp.get_json()
