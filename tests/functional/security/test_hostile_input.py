"""Inputs from the hostile-client pass that crashed the server or were stored though invalid
(issue "Security fixes" items 2-6): each answers a 4xx OperationOutcome, and nothing is stored."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import BackendClient

XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'


def count(http: Any, h: dict[str, str], rtype: str = "Patient") -> int:
    return int(http.get(f"/fhir/{rtype}", query_string={"_summary": "count"}, headers=h).get_json()["total"])


def outcome(resp: Any, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    text = " ".join(i.get("diagnostics", "") for i in body["issue"])
    for word in words:
        assert word in text, text
    return body


def nested_extension(levels: int) -> dict[str, Any]:
    ext: dict[str, Any] = {"url": "http://example.org/leaf", "valueString": "x"}
    for i in range(levels - 1):
        ext = {"url": f"http://example.org/level{i}", "extension": [ext]}
    return ext


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": "Hostile"}], **extra}


# ---------------------------------------------------------------- 2: deep nesting
@pytest.mark.parametrize("levels", [33, 150, 400])
def test_deeply_nested_extensions_are_a_400_naming_the_limit(http: Any, admin: BackendClient, levels: int) -> None:
    h = admin.headers()
    before = count(http, h)
    body = patient(extension=[nested_extension(levels)])
    outcome(http.post("/fhir/Patient", json=body, headers=h), 400, "64 levels", "max_json_depth")
    outcome(http.put("/fhir/Patient/deep", json={**body, "id": "deep"}, headers=h), 400, "max_json_depth")
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "extension": [nested_extension(levels)]}
    outcome(http.post("/fhir/Observation", json=obs, headers=h), 400, "max_json_depth")
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"request": {"method": "POST", "url": "Patient"}, "resource": body}]}
    outcome(http.post("/fhir", json=bundle, headers=h), 400, "levels deep", "max_json_depth")
    assert count(http, h) == before
    assert http.get("/fhir/Patient/deep", headers=h).status_code == 404


def test_resources_within_the_depth_limit_are_stored(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    resp = http.post("/fhir/Patient", json=patient(extension=[nested_extension(25)]), headers=h)
    assert resp.status_code == 201, resp.get_data(as_text=True)[:300]


# ---------------------------------------------------------------- 3: parameter counts
def _many(name: str, n: int) -> list[tuple[str, str]]:
    return [(name, f"a{i}") for i in range(n)]


@pytest.mark.parametrize("query", [
    _many("name", 1000),
    _many("name", 101),
    [("name", ",".join(f"a{i}" for i in range(1000)))],
    [("family", ",".join(f"a{i}" for i in range(101)))],
    _many("general-practitioner:Practitioner.name", 500),
    [("_has:Observation:patient:code", ",".join(f"c{i}" for i in range(500)))],
    _many("_has:Observation:patient:code", 300),
], ids=["1000-params", "101-params", "1000-values", "101-values", "chains", "has-values", "has-params"])
def test_too_many_parameters_or_values_are_a_400(http: Any, admin: BackendClient, query: list[tuple[str, str]]) -> None:
    h = admin.headers()
    resp = http.get("/fhir/Patient", query_string=query, headers=h)
    if len("/fhir/Patient") + len(urlencode(query)) > 8192:  # refused for its length first (max_url_bytes)
        outcome(resp, 414, "exceeds the limit")
    else:
        outcome(resp, 400, "at most 100")
    outcome(http.post("/fhir/Patient/_search", data=urlencode(query), headers=h,
                        content_type="application/x-www-form-urlencoded"), 400, "at most 100")


@pytest.mark.parametrize("query", [
    _many("name", 100),
    [("name", ",".join(f"a{i}" for i in range(100)))],
    _many("_has:Observation:patient:code", 100),
    [("_has:Observation:subject:code", ",".join(f"c{i}" for i in range(100)))] * 100,
    [("_id", ",".join(f"id{i}" for i in range(100)))] * 100,
], ids=["100-params", "100-values", "100-has", "100x100-has", "100x100-ids"])
def test_searches_at_the_limits_answer(http: Any, admin: BackendClient, query: list[tuple[str, str]]) -> None:
    h = admin.headers()
    resp = http.post("/fhir/Patient/_search", data=urlencode(query), headers=h,
                        content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    assert resp.get_json()["resourceType"] == "Bundle"


def test_chained_searches_at_the_limits_answer(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    query = [("subject:Patient.name", ",".join(f"n{i}" for i in range(100)))] * 100
    resp = http.post("/fhir/Observation/_search", data=urlencode(query), headers=h,
                     content_type="application/x-www-form-urlencoded")
    assert resp.status_code in (200, 400), resp.get_data(as_text=True)[:300]
    assert resp.get_json()["resourceType"] in ("Bundle", "OperationOutcome")


# ---------------------------------------------------------------- 4: ids and version ids
@pytest.mark.parametrize("version", ["9223372036854775808", "99999999999999999999999", "9223372036854775807",
                                     "0", "abc", "1.5", "-1"])
def test_out_of_range_or_foreign_version_ids_are_404(http: Any, admin: BackendClient, version: str) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json=patient(), headers=h).get_json()["id"]
    outcome(http.get(f"/fhir/Patient/{pid}/_history/{version}", headers=h), 404)
    assert http.get(f"/fhir/Patient/{pid}/_history/1", headers=h).status_code == 200


def test_bad_ids_and_etags_are_4xx(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json=patient(), headers=h).get_json()["id"]
    outcome(http.get("/fhir/Patient/" + "x" * 65, headers=h), 400)
    outcome(http.get("/fhir/Patient/a_b", headers=h), 400)
    resp = http.put(f"/fhir/Patient/{pid}", json={**patient(), "id": pid},
                    headers={**h, "If-Match": 'W/"9223372036854775808"'})
    outcome(resp, 400, "If-Match")
    resp = http.get("/fhir/Observation/$lastn", query_string={"max": "9" * 30}, headers=h)
    assert resp.status_code == 200 and resp.get_json()["resourceType"] == "Bundle"


# ---------------------------------------------------------------- 5: narrative
BAD_NARRATIVES = {
    "script": f'<div {XHTML}><p>hi</p><script>alert(1)</script></div>',
    "onerror": f'<div {XHTML}><img src="x.png" onerror="alert(1)"/></div>',
    "no-namespace": '<div><p>plain html</p></div>',
    "not-a-div": f'<p {XHTML}>text</p>',
    "javascript-href": f'<div {XHTML}><a href=" javascript:alert(1)">x</a></div>',
    "style-expression": f'<div {XHTML}><p style="width: expression(alert(1))">x</p></div>',
    "iframe": f'<div {XHTML}><iframe src="https://evil.example"/></div>',
    "form": f'<div {XHTML}><form action="https://evil.example"><p>x</p></form></div>',
    "foreign-namespace": f'<div {XHTML}><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg></div>',
    "doctype-entity": f'<!DOCTYPE div [<!ENTITY x SYSTEM "file:///etc/passwd">]><div {XHTML}>&x;</div>',
    "processing-instruction": f'<div {XHTML}><?php echo 1; ?><p>x</p></div>',
    "not-well-formed": f'<div {XHTML}><p>unclosed</div>',
    "whitespace-only": f'<div {XHTML}>   <p> </p> </div>',
}


@pytest.mark.parametrize("name", sorted(BAD_NARRATIVES))
def test_narrative_breaking_txt_rules_is_a_400(http: Any, admin: BackendClient, name: str) -> None:
    h = admin.headers()
    before = count(http, h)
    text = {"status": "generated", "div": BAD_NARRATIVES[name]}
    body = outcome(http.post("/fhir/Patient", json=patient(text=text), headers=h), 400, "narrative")
    assert body["issue"][0]["expression"] == ["Patient.text.div"]
    contained = {"resourceType": "Practitioner", "id": "p1", "text": text}
    body = outcome(http.post("/fhir/Patient", json=patient(contained=[contained],
                                                            generalPractitioner=[{"reference": "#p1"}]),
                             headers=h), 400, "narrative")
    assert body["issue"][0]["expression"] == ["Patient.contained[0].text.div"]
    assert count(http, h) == before


def test_rich_valid_narrative_is_stored_as_sent(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    div = (f'<div {XHTML} xml:lang="en"><h1>Summary</h1><table border="1"><tr><th>a</th><td style="color:red">'
           '<a href="https://example.org/x">link</a></td></tr></table><img src="#pic" alt="pic"/>'
           '<!-- a comment --><p class="x">Text &amp; more</p></div>')
    resp = http.post("/fhir/Patient", json=patient(text={"status": "generated", "div": div}), headers=h)
    assert resp.status_code == 201, resp.get_data(as_text=True)[:300]
    assert resp.get_json()["text"]["div"] == div


# ---------------------------------------------------------------- 6: R4 invariants
def _contained(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Practitioner", "id": "p1", "name": [{"family": "Inner"}], **extra}


INVARIANTS = {
    "dom-2": patient(contained=[_contained(contained=[{"resourceType": "Organization", "id": "o1", "name": "x"}])],
                     generalPractitioner=[{"reference": "#p1"}]),
    "dom-4": patient(contained=[_contained(meta={"versionId": "3"})], generalPractitioner=[{"reference": "#p1"}]),
    "dom-4 ": patient(contained=[_contained(meta={"lastUpdated": "2024-01-01T00:00:00Z"})],
                      generalPractitioner=[{"reference": "#p1"}]),
    "dom-5": patient(contained=[_contained(meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                                          "v3-Confidentiality", "code": "R"}]})],
                     generalPractitioner=[{"reference": "#p1"}]),
    "ext-1": patient(extension=[{"url": "http://example.org/empty"}]),
    "ext-1 ": patient(extension=[{"url": "http://example.org/both", "valueString": "x",
                                  "extension": [{"url": "http://example.org/in", "valueString": "y"}]}]),
    "ext-1  ": patient(modifierExtension=[{"url": "http://example.org/empty"}]),
    "ext-1   ": patient(birthDate="1970-01-01", _birthDate={"extension": [{"url": "http://example.org/empty"}]}),
    "ext-1    ": patient(name=[{"family": "X", "extension": [{"url": "http://example.org/a",
                                                             "extension": [{"url": "http://example.org/b"}]}]}]),
}


@pytest.mark.parametrize("case", sorted(INVARIANTS))
def test_r4_invariants_are_enforced_on_write(http: Any, admin: BackendClient, case: str) -> None:
    h = admin.headers()
    before = count(http, h)
    outcome(http.post("/fhir/Patient", json=INVARIANTS[case], headers=h), 400, case.strip())
    outcome(http.put("/fhir/Patient/inv", json={**INVARIANTS[case], "id": "inv"}, headers=h), 400, case.strip())
    assert count(http, h) == before


def test_contained_narrative_is_valid_r4(http: Any, admin: BackendClient) -> None:
    """R4 dropped STU3's dom-1: a contained resource may carry (valid) narrative."""
    h = admin.headers()
    text = {"status": "generated", "div": f'<div {XHTML}>Dr Inner</div>'}
    body = patient(contained=[_contained(text=text)], generalPractitioner=[{"reference": "#p1"}])
    assert http.post("/fhir/Patient", json=body, headers=h).status_code == 201
