"""The official HL7 R4 examples round-trip through the REST API unchanged.

Every Patient, Observation, QuestionnaireResponse and Consent example is stored with
update-as-create (`PUT /fhir/{type}/{id}`) and read back: the JSON must equal the file except for
`meta`, and every numeric literal must come back with the client's exact text (FHIR requires the
decimal precision as sent: `1.0` is not `1`, `0.10` is not `0.1`).

One server is shared by the whole module (creating an app per file would dominate the run time);
each example uses its own resource id, so the tests do not depend on one another.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BASE, EXAMPLES, example_files, make_settings
from tests.support.apps import app_with_client

TYPES = ("Patient", "Observation", "QuestionnaireResponse", "Consent")
FILES: list[Path] = [p for t in TYPES for p in example_files(f"{t}-")]
SERVER_META = ("versionId", "lastUpdated")
# the record types beyond the first four (issue 14): their HL7 examples, copied into the repository
RECORD_EXAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "hl7-r4-examples"
RECORD_FILES: list[Path] = sorted(RECORD_EXAMPLES.glob("*.json"))


def _skip_without_examples() -> None:
    if not EXAMPLES.is_dir() or not FILES:
        pytest.skip(f"HL7 examples not available in {EXAMPLES}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    _skip_without_examples()
    # Binary needs a scope naming it
    app, http, headers = app_with_client(make_settings(tmp_path_factory.mktemp("examples")),
                                         "system/*.cruds system/Binary.cruds", "examples test client")
    svc = app.extensions["fhirserver"]
    yield http, headers
    svc.engine.dispose()


# ---------------------------------------------------------------- helpers
def parse_exact(text: str) -> tuple[Any, list[str]]:
    """Parse JSON with Decimal floats; also return every numeric literal exactly as written."""
    literals: list[str] = []

    def _float(s: str) -> Decimal:
        literals.append(s)
        return Decimal(s)

    def _int(s: str) -> int:
        literals.append(s)
        return int(s)

    return json.loads(text, parse_float=_float, parse_int=_int), literals


def decimal_literals(literals: list[str]) -> list[str]:
    """The non-integer literals (those whose precision FHIR requires kept)."""
    return [s for s in literals if "." in s or "e" in s.lower()]


def without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


def assert_same_resource(original_text: str, returned_text: str, server_id: str | None = None) -> dict[str, Any]:
    """`server_id`: the id the server assigned (create), which replaces the file's id."""
    original, original_literals = parse_exact(original_text)
    returned, returned_literals = parse_exact(returned_text)
    expected = without_meta(original)
    if server_id is not None:
        expected["id"] = server_id
    assert without_meta(returned) == expected
    # Decimal equality ignores precision (Decimal("1.0") == Decimal("1.00")): compare the text.
    assert sorted(returned_literals) == sorted(original_literals)
    for literal in decimal_literals(original_literals):
        assert re.search(rf"(?<![\w.\-+]){re.escape(literal)}(?![\w.])", returned_text), literal
    # the client's own meta elements (profile, tag, security, ...) are kept; the server sets the rest
    client_meta = {k: v for k, v in (original.get("meta") or {}).items() if k not in SERVER_META}
    for key, value in client_meta.items():
        assert returned["meta"][key] == value, key
    return returned


def assert_server_meta(body: dict[str, Any], version: str) -> None:
    assert body["meta"]["versionId"] == version
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", body["meta"]["lastUpdated"])


# ---------------------------------------------------------------- tests
def test_example_set_is_complete() -> None:
    _skip_without_examples()
    counts = {t: len(example_files(f"{t}-")) for t in TYPES}
    # every example file of the served types is exercised below, and each one names its own type and id
    assert sum(counts.values()) == len(FILES) and all(counts.values()), counts
    # ... and the folder holds as many as its SOURCES.md says were copied
    sources = (EXAMPLES / "SOURCES.md").read_text()
    line = re.search(r"^Counts: (.*)$", sources, re.M)
    assert line, "SOURCES.md has no Counts line"
    listed = {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", line.group(1))}
    assert {t: listed[t] for t in TYPES} == counts
    for path in FILES:
        data = json.loads(path.read_text())
        assert path.name == f"{data['resourceType']}-{data['id']}.json"


def test_record_type_examples_cover_every_added_type() -> None:
    served = set(json.loads((Path(__file__).resolve().parents[3] / "profiles" / "resource-types.json").read_text())
                 ["types"])
    have = {p.name.split("-", 1)[0] for p in RECORD_FILES}
    # AuditEvent is server-written (no examples are stored); a Subscription is admitted only with
    # an endpoint registered for its client (tests/functional/subscriptions), which HL7's examples lack
    assert served - have - set(TYPES) == {"AuditEvent", "Subscription"}
    sources = (RECORD_EXAMPLES / "SOURCES.md").read_text()
    assert f"Files: {len(RECORD_FILES)}" in sources
    for path in RECORD_FILES:
        data = json.loads(path.read_text())
        assert path.name == f"{data['resourceType']}-{data['id']}.json"


# HL7 examples that break an R4 rule: refused, with the rule named
INVALID_EXAMPLES = {
    "Questionnaire-qs1.json": "Value for the field 'linkId' is required",  # Questionnaire.item.linkId is 1..1
    "Questionnaire-zika-virus-exposure-assessment.json": "txt-2",  # a narrative of whitespace only
}


@pytest.mark.parametrize("path", RECORD_FILES, ids=[p.name for p in RECORD_FILES])
def test_record_type_example_round_trips(server, path: Path) -> None:  # type: ignore[no-untyped-def]
    if path.name in INVALID_EXAMPLES:
        http, headers = server
        resp = http.put(f"/fhir/{path.name.split('-', 1)[0]}/{path.name.split('-', 1)[1][:-5]}",
                        data=path.read_bytes(), headers={**headers, "Content-Type": "application/fhir+json"})
        assert resp.status_code == 400 and INVALID_EXAMPLES[path.name] in resp.get_data(as_text=True)
        return
    test_put_as_create_then_read_round_trips(server, path)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_put_as_create_then_read_round_trips(server, path: Path) -> None:  # type: ignore[no-untyped-def]
    http, headers = server
    text = path.read_text()
    original, _ = parse_exact(text)
    rtype, rid = original["resourceType"], original["id"]

    resp = http.put(f"/fhir/{rtype}/{rid}", data=text.encode(),
                    headers={**headers, "Content-Type": "application/fhir+json"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Location"] == f"{BASE}/{rtype}/{rid}/_history/1"
    assert resp.headers["ETag"] == 'W/"1"'
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    created = assert_same_resource(text, resp.get_data(as_text=True))
    assert_server_meta(created, "1")

    resp = http.get(f"/fhir/{rtype}/{rid}", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["ETag"] == 'W/"1"'
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    read = assert_same_resource(text, resp.get_data(as_text=True))
    assert_server_meta(read, "1")
    assert read["meta"]["lastUpdated"] == created["meta"]["lastUpdated"]

    # the versioned read gives the same document
    resp = http.get(f"/fhir/{rtype}/{rid}/_history/1", headers=headers)
    assert resp.status_code == 200
    assert_same_resource(text, resp.get_data(as_text=True))


def _has_decimal(path: Path) -> bool:
    return bool(decimal_literals(parse_exact(path.read_text())[1]))


DECIMAL_FILES = [p for p in FILES if _has_decimal(p)]


@pytest.mark.parametrize("path", DECIMAL_FILES, ids=[p.name for p in DECIMAL_FILES])
def test_decimals_keep_precision_in_search_and_history(server, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Search results and history bundles embed the stored resource: decimals there keep their text too."""
    http, headers = server
    text = path.read_text()
    original, literals = parse_exact(text)
    rtype = original["resourceType"]
    decimals = sorted(decimal_literals(literals))
    resp = http.post(f"/fhir/{rtype}", data=text.encode(),
                     headers={**headers, "Content-Type": "application/fhir+json"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    rid = resp.get_json()["id"]
    original["id"] = rid

    resp = http.get(f"/fhir/{rtype}/{rid}/_history", headers=headers)
    assert resp.status_code == 200
    bundle, bundle_literals = parse_exact(resp.get_data(as_text=True))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
    versions = [e for e in bundle["entry"] if "resource" in e]
    assert versions
    for entry in versions:
        assert without_meta(entry["resource"]) == without_meta(original)
    assert len(versions) == 1 and versions[0]["request"]["method"] == "POST"
    assert sorted(decimal_literals(bundle_literals)) == decimals

    resp = http.get(f"/fhir/{rtype}?_id={rid}", headers=headers)
    assert resp.status_code == 200
    bundle, bundle_literals = parse_exact(resp.get_data(as_text=True))
    assert [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"] == [rid]
    assert sorted(decimal_literals(bundle_literals)) == decimals


POST_SAMPLE = [p for t in TYPES for p in example_files(f"{t}-")[:2]]


@pytest.mark.parametrize("path", POST_SAMPLE, ids=[p.name for p in POST_SAMPLE])
def test_post_create_ignores_client_id(server, path: Path) -> None:  # type: ignore[no-untyped-def]
    http, headers = server
    text = path.read_text()
    original, _ = parse_exact(text)
    rtype, client_id = original["resourceType"], original["id"]

    ids = []
    for _ in range(2):
        resp = http.post(f"/fhir/{rtype}", data=text.encode(),
                         headers={**headers, "Content-Type": "application/fhir+json"})
        assert resp.status_code == 201, resp.get_data(as_text=True)
        body, _ = parse_exact(resp.get_data(as_text=True))
        new_id = body["id"]
        assert new_id != client_id
        assert resp.headers["Location"] == f"{BASE}/{rtype}/{new_id}/_history/1"
        assert body["meta"]["versionId"] == "1"
        assert_same_resource(text, resp.get_data(as_text=True), server_id=new_id)
        ids.append(new_id)
    assert ids[0] != ids[1]

    for new_id in ids:
        resp = http.get(f"/fhir/{rtype}/{new_id}", headers=headers)
        assert resp.status_code == 200
        body = assert_same_resource(text, resp.get_data(as_text=True), server_id=new_id)
        assert body["meta"]["versionId"] == "1"
    # the client's id was not used: nothing exists under it unless a PUT put it there
    resp = http.get(f"/fhir/{rtype}?_id={client_id}&_count=100", headers=headers)
    assert resp.status_code == 200
    assert not {e["resource"]["id"] for e in resp.get_json().get("entry", [])} & set(ids)
