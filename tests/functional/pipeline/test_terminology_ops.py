"""CodeSystem/$lookup, CodeSystem/$validate-code, ValueSet/$expand and ValueSet/$validate-code
over stored terminology resources, through HTTP: hierarchies (is-a, descendent-of, is-not-a),
enumerated concepts, excludes, imported value sets, text filter and paging; a code system the
caller may not read is as unavailable as an absent one."""

from __future__ import annotations

import uuid
from typing import Any

from tests.conftest import BackendClient


def _cs(url: str) -> dict[str, Any]:
    """vehicle > car > (sedan, coupe); vehicle > bike; truck (with property size=large)."""
    return {"resourceType": "CodeSystem", "url": url, "version": "1", "name": "Vehicles", "status": "active",
            "content": "complete",
            "property": [{"code": "size", "type": "code"}],
            "concept": [
                {"code": "vehicle", "display": "Vehicle", "concept": [
                    {"code": "car", "display": "Motor car", "concept": [
                        {"code": "sedan", "display": "Sedan car"}, {"code": "coupe", "display": "Coupe car"}]},
                    {"code": "bike", "display": "Bicycle"}]},
                {"code": "truck", "display": "Truck", "property": [{"code": "size", "valueCode": "large"}]}]}


def _vs(url: str, compose: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "ValueSet", "url": url, "status": "active", "compose": compose}


def _setup(http: Any, h: dict[str, str]) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    system = f"http://example.org/cs/vehicles-{tag}"
    assert http.post("/fhir/CodeSystem", json=_cs(system), headers=h).status_code == 201
    return system, tag


def _codes(body: dict[str, Any]) -> list[str]:
    return [c["code"] for c in body["expansion"].get("contains", [])]


def _param(body: dict[str, Any], name: str) -> Any:
    return next((p for p in body["parameter"] if p["name"] == name), None)


def test_lookup_gives_display_name_parent_and_children(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    system, _tag = _setup(http, h)
    body = http.get("/fhir/CodeSystem/$lookup", query_string={"system": system, "code": "car"}, headers=h).get_json()
    assert _param(body, "display")["valueString"] == "Motor car" and _param(body, "name")["valueString"] == "Vehicles"
    props = {(p["part"][0]["valueCode"], p["part"][1]["valueCode"]) for p in body["parameter"] if p["name"] == "property"}
    assert props == {("parent", "vehicle"), ("child", "sedan"), ("child", "coupe")}
    posted = http.post("/fhir/CodeSystem/$lookup", headers=h, json={"resourceType": "Parameters", "parameter": [
        {"name": "coding", "valueCoding": {"system": system, "code": "bike"}}]}).get_json()
    assert _param(posted, "display")["valueString"] == "Bicycle"
    for query, status in (({"system": system, "code": "plane"}, 404), ({"system": system + "-x", "code": "car"}, 404),
                          ({"system": system}, 400)):
        resp = http.get("/fhir/CodeSystem/$lookup", query_string=query, headers=h)
        assert resp.status_code == status and resp.get_json()["resourceType"] == "OperationOutcome", query


def test_expand_follows_hierarchy_filters_excludes_and_imports(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    system, tag = _setup(http, h)
    base = f"http://example.org/vs/{tag}"
    sets = {
        "cars": {"include": [{"system": system, "filter": [{"property": "concept", "op": "is-a", "value": "car"}]}]},
        "below-car": {"include": [{"system": system, "filter": [{"property": "concept", "op": "descendent-of",
                                                                 "value": "car"}]}]},
        "not-car": {"include": [{"system": system, "filter": [{"property": "concept", "op": "is-not-a",
                                                               "value": "car"}]}]},
        "large": {"include": [{"system": system, "filter": [{"property": "size", "op": "=", "value": "large"}]}]},
        "listed": {"include": [{"system": system, "concept": [{"code": "bike"}, {"code": "truck"}]}]},
        "all-but-cars": {"include": [{"system": system}], "exclude": [{"valueSet": [f"{base}/cars"]}]},
    }
    for name, compose in sets.items():
        assert http.post("/fhir/ValueSet", json=_vs(f"{base}/{name}", compose), headers=h).status_code == 201

    def expand(name: str, **extra: str) -> dict[str, Any]:
        resp = http.get("/fhir/ValueSet/$expand", query_string={"url": f"{base}/{name}", **extra}, headers=h)
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
        return dict(resp.get_json())

    assert sorted(_codes(expand("cars"))) == ["car", "coupe", "sedan"]
    assert sorted(_codes(expand("below-car"))) == ["coupe", "sedan"]
    assert sorted(_codes(expand("not-car"))) == ["bike", "truck", "vehicle"]
    assert _codes(expand("large")) == ["truck"]
    listed = expand("listed")
    assert listed["expansion"]["contains"] == [{"system": system, "code": "bike", "display": "Bicycle"},
                                               {"system": system, "code": "truck", "display": "Truck"}]
    assert sorted(_codes(expand("all-but-cars"))) == ["bike", "truck", "vehicle"]
    # text filter and paging
    assert sorted(_codes(expand("cars", filter="car"))) == ["car", "coupe", "sedan"]
    assert _codes(expand("cars", filter="sedan")) == ["sedan"]
    page = expand("not-car", count="2", offset="1")
    assert page["expansion"]["total"] == 3 and page["expansion"]["offset"] == 1 and len(_codes(page)) == 2
    # by id, and by a ValueSet in the POST body
    vid = http.get("/fhir/ValueSet", query_string={"url": f"{base}/cars"}, headers=h).get_json()["entry"][0]["resource"]["id"]
    assert sorted(_codes(http.get(f"/fhir/ValueSet/{vid}/$expand", headers=h).get_json())) == ["car", "coupe", "sedan"]
    inline = http.post("/fhir/ValueSet/$expand", headers=h, json={"resourceType": "Parameters", "parameter": [
        {"name": "valueSet", "resource": _vs("urn:inline", sets["listed"])}]}).get_json()
    assert _codes(inline) == ["bike", "truck"]


def test_validate_code_against_value_sets_and_code_systems(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    system, tag = _setup(http, h)
    url = f"http://example.org/vs/{tag}/cars"
    http.post("/fhir/ValueSet", json=_vs(url, {"include": [{"system": system, "filter": [
        {"property": "concept", "op": "is-a", "value": "car"}]}]}), headers=h)

    def check(path: str, **query: str) -> tuple[bool, str | None]:
        body = http.get(path, query_string=query, headers=h).get_json()
        message = _param(body, "message")
        return _param(body, "result")["valueBoolean"], message["valueString"] if message else None

    assert check("/fhir/ValueSet/$validate-code", url=url, system=system, code="sedan") == (True, None)
    ok, why = check("/fhir/ValueSet/$validate-code", url=url, system=system, code="bike")
    assert not ok and "bike" in (why or "")
    ok, why = check("/fhir/ValueSet/$validate-code", url=url, system=system, code="sedan", display="Saloon")
    assert not ok and "Sedan car" in (why or "")
    assert check("/fhir/CodeSystem/$validate-code", url=system, code="truck") == (True, None)
    assert check("/fhir/CodeSystem/$validate-code", url=system, code="plane")[0] is False


def test_a_code_system_the_caller_may_not_read_is_not_available(http: Any, admin: BackendClient,
                                                                make_client: Any) -> None:
    system, tag = _setup(http, admin.headers())
    url = f"http://example.org/vs/{tag}/everything"
    http.post("/fhir/ValueSet", json=_vs(url, {"include": [{"system": system}]}), headers=admin.headers())
    vs_only = make_client("system/ValueSet.rs", default_scope="system/ValueSet.rs")
    resp = http.get("/fhir/ValueSet/$expand", query_string={"url": url}, headers=vs_only.headers())
    absent = http.get("/fhir/ValueSet/$expand", query_string={"url": url + "-none"}, headers=vs_only.headers())
    assert resp.status_code == 422 and "not available" in resp.get_json()["issue"][0]["diagnostics"]
    assert absent.status_code == 404
    assert http.get("/fhir/CodeSystem/$lookup", query_string={"system": system, "code": "car"},
                    headers=vs_only.headers()).status_code == 403  # no CodeSystem scope at all
