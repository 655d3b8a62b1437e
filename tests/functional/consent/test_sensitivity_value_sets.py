"""Sensitivity categories are ValueSets: the shipped ones (profiles/ValueSet-sensitivity-*.json,
ICD-10-CM categories as `code regex` filters) label writes, an operator's category can name a
ValueSet an installed IG package brings, and a category whose value set the server cannot decide
stops the server from starting (sensitive data would otherwise go unlabelled)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fhirserver.config import Settings
from tests.conftest import REPO, make_settings
from tests.support.apps import app_with_client, fresh_app
from tests.support.cli import cli, ok

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
GENETIC_VS = "http://example.org/ValueSet/genetic-tests"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _package(tmp_path: Path, value_set: dict[str, Any]) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, doc in (("package/package.json", {"name": "example.sensitivity", "version": "1.0.0",
                                                    "fhirVersions": ["4.0.1"]}),
                          ("package/ValueSet-genetic.json", value_set)):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "sensitivity.tgz"
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def _profiles_with_category(tmp_path: Path, value_set_url: str) -> Path:
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO / "profiles", profiles)
    (profiles / "sensitive-codes-genetic.json").write_text(json.dumps({"categories": [
        {"label": "GDIS", "display": "genetic disease information sensitivity", "valueSet": value_set_url}]}))
    return profiles


def _labels(client: Any, h: dict[str, str], body: dict[str, Any]) -> set[str]:
    made = client.post(f"/fhir/{body['resourceType']}", data=json.dumps(body), headers={**h, **FHIR_JSON})
    assert made.status_code == 201, made.get_data(as_text=True)
    return {s["code"] for s in made.get_json()["meta"].get("security", []) if s["system"] == ACT}


def _back_office(settings: Settings) -> tuple[Any, Any, dict[str, str]]:
    """A consent-exempt client (the consent back office): it may see what it labels."""
    return app_with_client(settings, name="back office", client_settings={"consent_exempt": True})


def _condition(system: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": system, "code": code}]}}


def test_the_shipped_value_sets_label_by_code_and_by_icd10_category(tmp_path: Path) -> None:
    app, client, h = _back_office(make_settings(tmp_path))
    try:
        assert _labels(client, h, _condition(ICD10, "F10.20")) == {"SUD"}  # F10.* (alcohol use disorders)
        assert _labels(client, h, _condition(ICD10, "B20")) == {"HIV"}
        assert _labels(client, h, _condition(ICD10, "F17.210")) == set()  # nicotine: deliberately left out
        assert _labels(client, h, _condition(ICD10, "XF10")) == set()  # a category matches from the start
        assert _labels(client, h, _condition("http://snomed.info/sct", "86406008")) == {"HIV"}
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_a_category_can_name_a_value_set_from_an_installed_package(tmp_path: Path) -> None:
    profiles = _profiles_with_category(tmp_path, GENETIC_VS)
    settings = make_settings(tmp_path, profiles_dir=str(profiles))
    value_set = {"resourceType": "ValueSet", "url": GENETIC_VS, "status": "active", "compose": {"include": [
        {"system": "http://loinc.org", "concept": [{"code": "21636-6"}, {"code": "21637-4"}]}]}}
    package = _package(tmp_path, value_set)
    # without the package the server does not start: the category could not be applied
    refused = cli("subscription", "list", data_dir=settings.data_dir, FHIRSERVER_PROFILES_DIR=str(profiles))
    assert refused.returncode == 1 and f"the value set {GENETIC_VS} of label GDIS is not available" in refused.stderr
    # the package manager does not need the services, so it works under that very configuration
    ok(cli("ig", "install", str(package), data_dir=settings.data_dir, FHIRSERVER_PROFILES_DIR=str(profiles)))
    app, client, h = _back_office(settings)
    try:
        obs = {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/p2"},
               "code": {"coding": [{"system": "http://loinc.org", "code": "21636-6"}]}}
        assert _labels(client, h, obs) == {"GDIS"}
        obs["code"]["coding"][0]["code"] = "2345-7"  # glucose: in no sensitive value set
        assert _labels(client, h, obs) == set()
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_a_value_set_whose_membership_cannot_be_decided_stops_the_server(tmp_path: Path) -> None:
    """A SNOMED CT is-a filter without SNOMED CT loaded: this server cannot tell which codes it
    holds, so it refuses to start rather than leave such data unlabelled."""
    settings = make_settings(tmp_path)
    value_set = {"resourceType": "ValueSet", "url": GENETIC_VS, "status": "active", "compose": {"include": [
        {"system": "http://snomed.info/sct", "filter": [{"property": "concept", "op": "is-a", "value": "64572001"}]}]}}
    ok(cli("ig", "install", str(_package(tmp_path, value_set)), data_dir=settings.data_dir))
    profiles = _profiles_with_category(tmp_path, GENETIC_VS)
    run = cli("subscription", "list", data_dir=settings.data_dir, FHIRSERVER_PROFILES_DIR=str(profiles))
    assert run.returncode == 1 and "its membership cannot be decided" in run.stderr, run
    with pytest.raises(Exception, match="its membership cannot be decided"):
        fresh_app(make_settings(tmp_path, profiles_dir=str(profiles)))
