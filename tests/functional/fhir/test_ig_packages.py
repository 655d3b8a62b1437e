"""IG packages: `fhirserver ig install` of US Core 6.1 (shipped under profiles/packages), then every
US Core example validates over HTTP against the profiles it claims, and resources that break a
US Core rule -- a cardinality, a slice, an extension's own definition, an invariant, a required
binding -- are refused with a 422 naming it, while an extensible binding only warns. Packages
that cannot be used are refused by the CLI and nothing is installed."""

from __future__ import annotations

import copy
import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fhirserver.config import Settings
from fhirserver.fhir.packages import read_package
from tests.conftest import REPO, make_settings
from tests.support.apps import app_with_client, fresh_app
from tests.support.cli import cli, ok

PACKAGE = REPO / "profiles" / "packages" / "hl7.fhir.us.core-6.1.0.tgz"
US = "http://hl7.org/fhir/us/core/StructureDefinition/"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
EXAMPLES = read_package(PACKAGE.read_bytes()).examples
# The one example that is not valid FHIR R4: its narrative has no `div` (Narrative.div is 1..1).
INVALID_EXAMPLE = "DiagnosticReport-cbc.json"


def _example(resource_type: str, example_id: str) -> dict[str, Any]:
    doc = next(d for _, d in EXAMPLES if d["resourceType"] == resource_type and d["id"] == example_id)
    return copy.deepcopy(doc)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = make_settings(tmp_path_factory.mktemp("ig"))
    fresh_app(settings).extensions["fhirserver"].engine.dispose()  # a data directory, migrated
    out = ok(cli("ig", "install", str(PACKAGE), data_dir=settings.data_dir))
    assert "installed hl7.fhir.us.core#6.1.0 (5 CodeSystem, 49 profiles, 10 Extension definitions, 36 ValueSet" in out
    return settings


@pytest.fixture(scope="module")
def served(installed: Settings) -> Any:
    app, client, headers = app_with_client(installed)
    yield app, client, headers
    app.extensions["fhirserver"].engine.dispose()


@pytest.fixture(scope="module")
def server(served: Any) -> Any:
    return served[1]


@pytest.fixture(scope="module")
def h(served: Any) -> dict[str, str]:
    return dict(served[2])


def _post(client: Any, h: dict[str, str], path: str, body: dict[str, Any], **params: str) -> Any:
    return client.post(path, data=json.dumps(body), query_string=params, headers={**h, **FHIR_JSON})


def _errors(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return [i for i in outcome["issue"] if i["severity"] in ("error", "fatal")]


def test_install_reports_the_package_and_its_self_test(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    out = ok(cli("ig", "install", str(PACKAGE), data_dir=settings.data_dir))
    assert "examples: 187 of 188 valid against the profiles they claim" in out
    assert f"invalid: {INVALID_EXAMPLE}: DiagnosticReport.text must contain ['div'] properties" in out
    # US Core 6.1's tribal-affiliation names a slice it never declares: set aside and said so
    assert "not enforced: " + US + "us-core-tribal-affiliation: Extension.extension:tribeName.value[x]" in out
    listed = ok(cli("ig", "list", data_dir=settings.data_dir))
    assert listed.startswith("hl7.fhir.us.core#6.1.0\tsha256 ")
    again = ok(cli("ig", "install", str(PACKAGE), "--json", data_dir=settings.data_dir))
    report = json.loads(again[again.index("{"):])
    assert report["replaced"] == "hl7.fhir.us.core#6.1.0" and report["examples"]["checked"] == 188
    assert report["licence"] == "CC0-1.0"
    assert ok(cli("ig", "remove", "hl7.fhir.us.core", data_dir=settings.data_dir)) == "removed hl7.fhir.us.core\n"
    assert ok(cli("ig", "list", data_dir=settings.data_dir)) == ""
    assert cli("ig", "remove", "hl7.fhir.us.core", data_dir=settings.data_dir).returncode != 0


@pytest.mark.parametrize("name", sorted({n for n, _ in EXAMPLES}))
def test_every_us_core_example_validates(served: Any, server: Any, h: dict[str, str], name: str) -> None:
    doc = next(d for n, d in EXAMPLES if n == name)
    entries = [e["resource"] for e in doc.get("entry", [])] if doc["resourceType"] == "Bundle" else [doc]
    types = served[0].extensions["fhirserver"].types.names()
    for resource in entries:
        if resource["resourceType"] not in types:
            assert resource["resourceType"] in ("Media", "Endpoint"), resource["resourceType"]  # not served here
            continue
        out = _post(server, h, f"/fhir/{resource['resourceType']}/$validate", resource)
        if name == INVALID_EXAMPLE:
            assert out.status_code == 200 and "must contain ['div']" in _errors(out.get_json())[0]["diagnostics"]
            continue
        assert out.status_code == 200, out.get_json()
        assert _errors(out.get_json()) == [], (name, out.get_json())


BROKEN = [
    # (what breaks, resource type, example id, change, the rule named, where)
    ("cardinality", "Patient", "example", lambda r: r.pop("identifier"),
     "Patient.identifier: at least 1 required", "Patient.identifier"),
    ("an extension's own definition (us-core-race needs its text)", "Patient", "example",
     lambda r: r["extension"][0].__setitem__("extension", r["extension"][0]["extension"][:-1]),
     "Extension.extension:text: at least 1 required matching url \"text\"", "Patient.extension[0].extension"),
    ("invariant us-core-6 (xor)", "Patient", "example", lambda r: r["name"][0].pop("family") and r["name"][0].pop("given"),
     "us-core-6:", "Patient.name[0]"),
    ("invariant us-core-16 (matches)", "Practitioner", "practitioner-1",
     lambda r: r["identifier"][0].__setitem__("value", "12345"), "us-core-16:", "Practitioner.identifier[0]"),
    ("slice by value set", "Condition", "condition-duodenal-ulcer",
     lambda r: r["category"][0]["coding"][0].__setitem__("code", "not-a-category"),
     "Condition.category:us-core: at least 1 required matching a code from "
     "http://hl7.org/fhir/us/core/ValueSet/us-core-problem-or-health-concern", "Condition.category"),
    ("required binding", "Observation", "some-day-smoker", lambda r: r.__setitem__("status", "preliminary"),
     "Observation.status: the code is not in the value set "
     "http://hl7.org/fhir/us/core/ValueSet/us-core-observation-smoking-status-status (required binding)",
     "Observation.status"),
]


@pytest.mark.parametrize("what,rtype,example_id,change,rule,where", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_rule_is_refused_and_named(server: Any, h: dict[str, str], what: str, rtype: str, example_id: str,
                                            change: Any, rule: str, where: str) -> None:
    good = _example(rtype, example_id)
    good.pop("id")
    assert _post(server, h, f"/fhir/{rtype}", good).status_code == 201
    bad = copy.deepcopy(good)
    change(bad)
    refused = _post(server, h, f"/fhir/{rtype}", bad)
    assert refused.status_code == 422, refused.get_json()
    errors = _errors(refused.get_json())
    assert any(e["diagnostics"].startswith(rule) and where in e.get("expression", []) for e in errors), errors
    # $validate says the same without storing; the claim alone makes the profile apply
    bad["meta"].pop("profile")
    if not bad["meta"]:
        bad.pop("meta")
    unclaimed = _post(server, h, f"/fhir/{rtype}/$validate", bad)
    assert unclaimed.status_code == 200 and _errors(unclaimed.get_json()) == []
    profile = good["meta"]["profile"][0]
    checked = _post(server, h, f"/fhir/{rtype}/$validate", bad, profile=profile)
    assert any(e["diagnostics"].startswith(rule) for e in _errors(checked.get_json())), checked.get_json()


def test_an_extensible_binding_only_warns(server: Any, h: dict[str, str]) -> None:
    body = _example("Observation", "sexual-orientation-example")
    body["valueCodeableConcept"] = {"coding": [{"system": "http://snomed.info/sct", "code": "1234567"}]}
    out = _post(server, h, "/fhir/Observation/$validate", body)
    assert out.status_code == 200 and _errors(out.get_json()) == []
    warnings = [i for i in out.get_json()["issue"] if i["severity"] == "warning"]
    assert any("us-core-sexual-orientation (extensible binding)" in w["diagnostics"] for w in warnings), warnings
    body.pop("id")
    assert _post(server, h, "/fhir/Observation", body).status_code == 201


def test_a_binding_the_server_cannot_check_is_said_so(server: Any, h: dict[str, str]) -> None:
    """us-core-birthsex imports VSAC value sets the package does not carry: not a violation,
    not silently passed either."""
    body = _example("Patient", "example")
    out = _post(server, h, "/fhir/Patient/$validate", body)
    notes = [i["diagnostics"] for i in out.get_json()["issue"] if i["severity"] == "information"]
    assert any("binding to http://hl7.org/fhir/us/core/ValueSet/birthsex was not checked" in n for n in notes), notes


def test_without_the_package_us_core_claims_are_unknown(tmp_path: Path) -> None:
    app, client, h = app_with_client(make_settings(tmp_path))
    try:
        bad = _example("Patient", "example")
        bad.pop("identifier")
        out = _post(client, h, "/fhir/Patient/$validate", bad)
        assert out.status_code == 200 and _errors(out.get_json()) == []
        assert any("is not known to this server" in i["diagnostics"] for i in out.get_json()["issue"])
    finally:
        app.extensions["fhirserver"].engine.dispose()


def _tgz(files: dict[str, object]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


MANIFEST = {"name": "example.ig", "version": "1.0.0", "fhirVersions": ["4.0.1"]}
UNAPPLICABLE = {"resourceType": "StructureDefinition", "url": "http://example.org/sd/p", "type": "Observation",
                "derivation": "constraint", "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Observation",
                "differential": {"element": [
                    {"id": "Observation.value[x]", "path": "Observation.value[x]",
                     "slicing": {"discriminator": [{"type": "type", "path": "$this"}], "rules": "open"}},
                    {"id": "Observation.value[x]:q", "path": "Observation.value[x]", "sliceName": "q"}]}}


@pytest.mark.parametrize("content,message", [
    (b"not a package at all", "not a readable .tgz package"),
    (_tgz({"package/StructureDefinition-x.json": UNAPPLICABLE}), "package/package.json with a name and a version is missing"),
    (_tgz({"package/package.json": {**MANIFEST, "fhirVersions": ["5.0.0"]}}), "is for FHIR 5.0.0, not R4"),
    (_tgz({"package/package.json": MANIFEST, "package/x.json": b"{not json"}), "package/x.json is not JSON"),
    (_tgz({"package/package.json": MANIFEST, "package/StructureDefinition-p.json": UNAPPLICABLE}),
     "discriminator {'type': 'type', 'path': '$this'} of Observation.value[x] is not supported; nothing was installed"),
], ids=["not-gzip", "no-manifest", "fhir-5", "bad-json", "unapplicable-profile"])
def test_an_unusable_package_is_refused_and_nothing_installed(tmp_path: Path, content: bytes, message: str) -> None:
    settings = make_settings(tmp_path)
    path = tmp_path / "p.tgz"
    path.write_bytes(content)
    run = cli("ig", "install", str(path), data_dir=settings.data_dir)
    assert run.returncode == 1 and message in run.stderr, run
    assert ok(cli("ig", "list", data_dir=settings.data_dir)) == ""


def test_members_outside_the_package_folder_are_never_read(tmp_path: Path) -> None:
    """A member named `../x` or `/etc/x` is ignored (and nothing is ever extracted to disk)."""
    evil = {**UNAPPLICABLE, "url": "http://example.org/sd/evil"}
    content = _tgz({"package/package.json": MANIFEST, "package/../StructureDefinition-e.json": evil,
                    "/package/StructureDefinition-f.json": evil, "other/StructureDefinition-g.json": evil})
    package = read_package(content)
    assert package.resources == [] and package.label == "example.ig#1.0.0"
    path = tmp_path / "p.tgz"
    path.write_bytes(content)
    settings = make_settings(tmp_path)
    assert "installed example.ig#1.0.0 (0 examples)" in ok(cli("ig", "install", str(path), data_dir=settings.data_dir))


def test_the_capability_statement_lists_the_installed_profiles(server: Any, h: dict[str, str]) -> None:
    rest = server.get("/fhir/metadata", headers=h).get_json()["rest"][0]
    supported = {r["type"]: r.get("supportedProfile", []) for r in rest["resource"]}
    assert US + "us-core-patient" in supported["Patient"]
    assert {US + "us-core-blood-pressure", US + "us-core-observation-lab"} <= set(supported["Observation"])
    assert US + "us-core-coverage" in supported["Coverage"]
    assert not any(US + "us-core-race" in urls for urls in supported.values())  # an extension, not a profile


def _absent(outcome: dict[str, Any]) -> set[tuple[str, str]]:
    return {(i["diagnostics"].split(":")[0], i["expression"][0]) for i in outcome["issue"]
            if "a must-support element is absent" in i["diagnostics"] and i["severity"] == "information"}


def test_validate_reports_absent_must_support_elements_without_failing(server: Any, h: dict[str, str]) -> None:
    body = _example("Patient", "example")
    before = _absent(_post(server, h, "/fhir/Patient/$validate", body).get_json())
    assert before == {("Patient.telecom.use", "Patient.telecom[1].use")}  # the example's second telecom has none
    body["address"][0].pop("city")
    body.pop("birthDate")
    out = _post(server, h, "/fhir/Patient/$validate", body).get_json()
    assert _errors(out) == []
    assert _absent(out) - before == {("Patient.birthDate", "Patient.birthDate"),
                                     ("Patient.address.city", "Patient.address[0].city")}
    body.pop("id")
    assert _post(server, h, "/fhir/Patient", body).status_code == 201  # reported, never refused
