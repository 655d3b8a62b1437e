"""Request bodies are validated as FHIR R4 before anything is stored, through HTTP.

Every rejection is a FHIR OperationOutcome whose issue.expression points at the offending element
(`Patient.name[0].given`), and a rejected write leaves no trace in the database.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.support.apps import app_with_client

JSON = {"Content-Type": "application/fhir+json"}


def _server(settings):  # type: ignore[no-untyped-def]
    """An app with its own registered backend client; returns (app, test client, auth headers)."""
    return app_with_client(settings, name="validation test client")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One server for the module (rejected writes store nothing, so tests do not disturb each other;
    each checks that the database is unchanged by comparing before/after snapshots)."""
    app, client, headers = _server(make_settings(tmp_path_factory.mktemp("validation")))
    yield client, headers
    app.extensions["fhirserver"].engine.dispose()


# ---------------------------------------------------------------- helpers
def outcome(resp: Any, status: int, code: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Assert an OperationOutcome error response and return its body."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"], body
    for issue in body["issue"]:
        assert issue["severity"] in ("error", "fatal")
        assert issue["diagnostics"]
    if code is not None:
        codes = (code,) if isinstance(code, str) else code
        assert body["issue"][0]["code"] in codes, body
    return body


def expressions(body: dict[str, Any]) -> list[str]:
    return [e for issue in body["issue"] for e in issue.get("expression", [])]


def search_ids(http: Any, headers: dict[str, str], rtype: str = "Patient") -> list[str]:
    resp = http.get(f"/fhir/{rtype}?_count=100", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [e["resource"]["id"] for e in resp.get_json().get("entry", []) if e["search"]["mode"] == "match"]


def type_history(http: Any, headers: dict[str, str], rtype: str = "Patient") -> list[dict[str, Any]]:
    resp = http.get(f"/fhir/{rtype}/_history?_count=1000", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json().get("entry", [])


def post(http: Any, headers: dict[str, str], body: Any, rtype: str = "Patient") -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"/fhir/{rtype}", data=data, headers={**headers, **JSON})


def snapshot(http: Any, headers: dict[str, str], rtype: str = "Patient") -> tuple[list[str], list[Any]]:
    """What is stored of a type: current ids and every version (id, etag)."""
    versions = [(e["fullUrl"], e["response"]["etag"]) for e in type_history(http, headers, rtype)]
    return sorted(search_ids(http, headers, rtype)), versions


class Unchanged:
    """`with Unchanged(http, h, "Patient"):` -- the block must not store anything of that type."""

    def __init__(self, http: Any, headers: dict[str, str], *rtypes: str) -> None:
        self.http, self.headers, self.rtypes = http, headers, rtypes or ("Patient",)

    def __enter__(self) -> Unchanged:
        self.before = {t: snapshot(self.http, self.headers, t) for t in self.rtypes}
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            for t in self.rtypes:
                assert snapshot(self.http, self.headers, t) == self.before[t], f"{t} changed"


# ---------------------------------------------------------------- bodies that are not a resource
NOT_A_RESOURCE = {
    "invalid-json": b'{"resourceType": "Patient", ',
    "trailing-comma": b'{"resourceType": "Patient",}',
    "json-array": b'[{"resourceType": "Patient"}]',
    "json-null": b"null",
    "json-string": b'"Patient"',
    "json-number": b"42",
    "not-utf8": b'{"resourceType": "Patient", "name": [{"family": "\xff\xfe"}]}',
}


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("body", list(NOT_A_RESOURCE.values()), ids=list(NOT_A_RESOURCE))
def test_body_that_is_not_a_json_object_is_rejected(srv, method: str, body: bytes) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    url = "/fhir/Patient" if method == "POST" else "/fhir/Patient/p1"
    with Unchanged(http, h):
        outcome(http.open(url, method=method, data=body, headers={**h, **JSON}), 400, "structure")


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_empty_body_is_rejected(srv, method: str) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    url = "/fhir/Patient" if method == "POST" else "/fhir/Patient/p1"
    with Unchanged(http, h):
        body = outcome(http.open(url, method=method, data=b"", headers={**h, **JSON}), 400,
                       ("structure", "required", "invalid"))
    assert "empty" in body["issue"][0]["diagnostics"].lower()


# ---------------------------------------------------------------- unknown elements
UNKNOWN = [
    # (resource, the unknown element's FHIRPath)
    ({"resourceType": "Patient", "foo": 1}, "Patient.foo"),
    ({"resourceType": "Patient", "name": [{"family": "Fox", "foo": "x"}]}, "Patient.name[0].foo"),
    ({"resourceType": "Patient", "name": [{"family": "Fox"}, {"family": "Fox", "period": {"start": "2001", "x": 1}}]},
     "Patient.name[1].period.x"),
    ({"resourceType": "Patient", "extension": [{"url": "http://example.org/x", "valueString": "v", "foo": 1}]},
     "Patient.extension[0].foo"),
    ({"resourceType": "Patient", "Active": True}, "Patient.Active"),  # element names are case-sensitive
    ({"resourceType": "Observation", "status": "final", "code": {"text": "t"},
      "valueQuantity": {"value": 1, "unit": "mg", "foo": True}}, "Observation.valueQuantity.foo"),
]


@pytest.mark.parametrize("resource,expression", UNKNOWN, ids=[e for _r, e in UNKNOWN])
def test_unknown_element_is_rejected_with_its_path(srv, resource: dict, expression: str) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    rtype = resource["resourceType"]
    with Unchanged(http, h, rtype):
        body = outcome(post(http, h, resource, rtype), 400, "structure")
    assert expression in expressions(body), body


def test_every_unknown_element_is_reported(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    resource = {"resourceType": "Patient", "foo": 1, "active": True, "bar": 2}
    with Unchanged(http, h):
        body = outcome(post(http, h, resource), 400, "structure")
    unknown = sorted(k for k in resource if k not in ("resourceType", "active"))
    assert sorted(expressions(body)) == [f"Patient.{k}" for k in unknown]


# ---------------------------------------------------------------- wrong types and values
WRONG = [
    ({"active": "true"}, "Patient.active"),
    ({"active": 1}, "Patient.active"),
    ({"name": [{"given": "x"}]}, "Patient.name[0].given"),
    ({"name": {"family": "Fox"}}, "Patient.name"),
    ({"name": [{"family": 7}]}, "Patient.name[0].family"),
    ({"birthDate": "1990-13-01"}, "Patient.birthDate"),
    ({"birthDate": "1990-02-30"}, "Patient.birthDate"),
    ({"birthDate": "01/02/1990"}, "Patient.birthDate"),
    ({"birthDate": None}, "Patient.birthDate"),
    ({"gender": "robot"}, "Patient.gender"),
    ({"gender": "Male"}, "Patient.gender"),
    ({"deceasedBoolean": "no"}, "Patient.deceasedBoolean"),
    ({"id": "not a valid id!"}, "Patient.id"),
    ({"telecom": [{"system": "pager-ish", "value": "1"}]}, "Patient.telecom[0].system"),
]


@pytest.mark.parametrize("fields,expression", WRONG, ids=[f"{e}={json.dumps(f)}" for f, e in WRONG])
def test_wrong_type_or_value_is_rejected_with_its_path(srv, fields: dict, expression: str) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    with Unchanged(http, h):
        body = outcome(post(http, h, {"resourceType": "Patient", **fields}), 400, ("value", "structure", "invalid"))
    assert expression in expressions(body), body


def test_wrong_decimal_type_in_observation(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
           "valueQuantity": {"value": "72.5", "unit": "kg"}}
    with Unchanged(http, h, "Observation"):
        body = outcome(post(http, h, obs, "Observation"), 400, ("value", "structure", "invalid"))
    assert "Observation.valueQuantity.value" in expressions(body), body


def test_missing_required_element(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    obs = {"resourceType": "Observation", "code": {"text": "weight"}}  # status is 1..1
    with Unchanged(http, h, "Observation"):
        body = outcome(post(http, h, obs, "Observation"), 400, ("required", "value", "structure", "invalid"))
    assert "Observation.status" in expressions(body), body


def test_two_choice_types_at_once(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    with Unchanged(http, h):
        outcome(post(http, h, {"resourceType": "Patient", "deceasedBoolean": True, "deceasedDateTime": "2001"}), 400)


# ---------------------------------------------------------------- resourceType
def test_resource_type_must_match_the_url(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "t"}}
    with Unchanged(http, h, "Patient", "Observation"):
        body = outcome(post(http, h, obs, "Patient"), 400)
        assert any("resourceType" in e for e in expressions(body)), body
        body = outcome(http.put("/fhir/Patient/o1", json={**obs, "id": "o1"}, headers=h), 400)
        assert any("resourceType" in e for e in expressions(body)), body


@pytest.mark.parametrize("resource", [{"name": [{"family": "Fox"}]}, {"resourceType": 3}, {"resourceType": None}],
                         ids=["absent", "number", "null"])
def test_resource_type_is_required(srv, resource: dict) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    with Unchanged(http, h):
        body = outcome(post(http, h, resource), 400)
    assert any("resourceType" in e for e in expressions(body)), body


# ---------------------------------------------------------------- ids on update
def test_put_id_must_match_the_url(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    with Unchanged(http, h):
        resp = http.put("/fhir/Patient/url-id", json={"resourceType": "Patient", "id": "body-id"}, headers=h)
        body = outcome(resp, 400, "invalid")
    assert "Patient.id" in expressions(body)
    for rid in ("url-id", "body-id"):
        outcome(http.get(f"/fhir/Patient/{rid}", headers=h), 404, "not-found")


def test_put_without_id_in_body(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    with Unchanged(http, h):
        resp = http.put("/fhir/Patient/url-id-2", json={"resourceType": "Patient", "active": True}, headers=h)
        body = outcome(resp, 400, ("required", "invalid"))
    assert "Patient.id" in expressions(body)
    outcome(http.get("/fhir/Patient/url-id-2", headers=h), 404, "not-found")


# ---------------------------------------------------------------- nothing is stored on failure
def test_failed_update_leaves_the_stored_resource_unchanged(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    good = {"resourceType": "Patient", "id": "keep", "name": [{"family": "Original"}]}
    assert http.put("/fhir/Patient/keep", json=good, headers=h).status_code == 201
    bad = {**good, "name": [{"family": "Changed"}], "birthDate": "not-a-date"}
    with Unchanged(http, h):
        body = outcome(http.put("/fhir/Patient/keep", json=bad, headers=h), 400)
    assert "Patient.birthDate" in expressions(body)

    resp = http.get("/fhir/Patient/keep", headers=h)
    assert resp.status_code == 200
    assert resp.headers["ETag"] == 'W/"1"'
    assert resp.get_json()["name"] == good["name"]
    history = http.get("/fhir/Patient/keep/_history", headers=h).get_json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"1"']
    # neither value of the failed update is searchable
    resp = http.get("/fhir/Patient?family=Changed", headers=h)
    assert resp.status_code == 200 and resp.get_json().get("entry", []) == []
    assert "keep" in search_ids(http, h)


def test_failed_conditional_writes_store_nothing(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    bad = {"resourceType": "Patient", "identifier": [{"system": "urn:s", "value": "v"}], "foo": 1}
    with Unchanged(http, h):
        resp = http.post("/fhir/Patient", json=bad, headers={**h, "If-None-Exist": "identifier=urn:s|v"})
        assert "Patient.foo" in expressions(outcome(resp, 400, "structure"))
        resp = http.put("/fhir/Patient?identifier=urn:s|v", json=bad, headers=h)
        assert "Patient.foo" in expressions(outcome(resp, 400, "structure"))


# ---------------------------------------------------------------- contained resources
CONTAINED = [
    ([{"resourceType": "Patient", "id": "c1", "foo": 1}], "Patient.contained[0].foo"),
    ([{"resourceType": "Patient", "id": "c1", "active": "yes"}], "Patient.contained[0].active"),
    ([{"resourceType": "Patient", "id": "c1"}, {"resourceType": "Patient", "id": "c2", "gender": "robot"}],
     "Patient.contained[1].gender"),
    ([{"resourceType": "Practitioner", "id": "pr", "name": [{"family": "Who", "foo": 1}]}],
     "Patient.contained[0].name[0].foo"),
    ([{"resourceType": "Organization", "id": "org", "foo": 1}], "Patient.contained[0].foo"),
]


@pytest.mark.parametrize("contained,expression", CONTAINED, ids=[e for _c, e in CONTAINED])
def test_contained_resources_are_validated(srv, contained: list, expression: str) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    resource = {"resourceType": "Patient", "contained": contained, "name": [{"family": "Fox"}]}
    with Unchanged(http, h):
        body = outcome(post(http, h, resource), 400, ("structure", "value", "invalid"))
    assert expression in expressions(body), body


def test_contained_resource_without_resource_type(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    resource = {"resourceType": "Patient", "contained": [{"id": "c1", "active": True}]}
    with Unchanged(http, h):
        body = outcome(post(http, h, resource), 400)
    assert any(e.startswith("Patient.contained[0]") for e in expressions(body)), body


def test_contained_resource_of_unknown_type(srv) -> None:  # type: ignore[no-untyped-def]
    """An unknown contained resourceType is a client error (400), not a server failure (500)."""
    http, h = srv
    resource = {"resourceType": "Patient", "contained": [{"resourceType": "NoSuchType", "id": "c1"}]}
    with Unchanged(http, h):
        body = outcome(post(http, h, resource), 400)
    assert any(e.startswith("Patient.contained[0]") for e in expressions(body)), body


def test_valid_contained_resource_is_accepted(srv) -> None:  # type: ignore[no-untyped-def]
    """Control for the tests above: the same shapes without the error are stored."""
    http, h = srv
    resource = {"resourceType": "Patient", "name": [{"family": "Fox"}],
                "contained": [{"resourceType": "Practitioner", "id": "pr", "name": [{"family": "Who"}]}],
                "generalPractitioner": [{"reference": "#pr"}]}
    resp = post(http, h, resource)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.get_json()["contained"] == resource["contained"]
    assert resp.get_json()["id"] in search_ids(http, h)


# ---------------------------------------------------------------- body size limit
LIMIT = 2000


@pytest.fixture
def small_server(tmp_path):  # type: ignore[no-untyped-def]
    app, client, headers = _server(make_settings(tmp_path, max_body_bytes=LIMIT))
    yield client, headers
    app.extensions["fhirserver"].engine.dispose()


def _patient_of_size(size: int, rid: str | None = None) -> bytes:
    base = {"resourceType": "Patient", **({"id": rid} if rid else {}), "name": [{"family": ""}]}
    pad = size - len(json.dumps(base, separators=(",", ":")).encode())
    base["name"][0]["family"] = "x" * pad
    data = json.dumps(base, separators=(",", ":")).encode()
    assert len(data) == size
    return data


def test_oversized_body_is_rejected_with_413(small_server) -> None:  # type: ignore[no-untyped-def]
    http, h = small_server
    # at the limit: accepted
    resp = http.post("/fhir/Patient", data=_patient_of_size(LIMIT), headers={**h, **JSON})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    kept = resp.get_json()["id"]

    with Unchanged(http, h):
        body = outcome(http.post("/fhir/Patient", data=_patient_of_size(LIMIT + 1), headers={**h, **JSON}), 413)
        assert str(LIMIT) in body["issue"][0]["diagnostics"]
        outcome(http.put("/fhir/Patient/big", data=_patient_of_size(LIMIT * 3, "big"), headers={**h, **JSON}), 413)
    outcome(http.get("/fhir/Patient/big", headers=h), 404, "not-found")
    assert search_ids(http, h) == [kept]


# ---------------------------------------------------------------- formats (XML: test_xml.py)
def test_other_request_content_type_is_415(srv) -> None:  # type: ignore[no-untyped-def]
    http, h = srv
    data = json.dumps({"resourceType": "Patient", "active": True}).encode()
    with Unchanged(http, h):
        outcome(http.post("/fhir/Patient", data=data, headers={**h, "Content-Type": "text/plain"}), 415,
                "not-supported")
    # the same bytes as JSON are fine
    resp = http.post("/fhir/Patient", data=data, headers={**h, "Content-Type": "application/json; charset=utf-8"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
