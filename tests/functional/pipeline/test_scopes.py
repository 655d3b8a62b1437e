"""SMART scopes through HTTP: what the token endpoint grants, and what each granted scope lets a
token do on /fhir (403 before data is touched, v2 granular restrictions, auditing of every call)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from fhirserver.auth.assertion import client_assertion
from fhirserver.db.schema import access_record
from tests.conftest import AUDITOR_SETTINGS

CAT_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
LAB = f"{CAT_SYSTEM}|laboratory"
VITALS = f"{CAT_SYSTEM}|vital-signs"
LAB_SCOPE = f"system/Observation.rs?category={LAB}"
V2_LETTERS = "cruds"


# ---------------------------------------------------------------- helpers
def request_token(http: Any, client: Any, scope: str) -> Any:
    """POST /auth/token with a fresh assertion (no caching: every call is a new request)."""
    return http.post("/auth/token", data={
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion(client.key, client.client_id, client.token_url),
    })


def granted(http: Any, client: Any, scope: str) -> set[str]:
    resp = request_token(http, client, scope)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["access_token"]
    return set(body["scope"].split())


def assert_invalid_scope(resp: Any) -> None:
    assert resp.status_code == 400, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["error"] == "invalid_scope", body
    assert "access_token" not in body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_forbidden(resp: Any) -> None:
    assert resp.status_code == 403, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "forbidden"
    assert body["issue"][0]["severity"] == "error"


def audit_count(svc: Any) -> int:
    with svc.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(access_record)).scalar_one()


def latest_audit_id(svc: Any) -> str:
    with svc.engine.connect() as conn:
        return conn.execute(select(access_record.c.id).order_by(access_record.c.pk.desc()).limit(1)).scalar_one()


def patient(family: str = "Smith", identifier: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": family, "given": ["Jo"]}],
                            "birthDate": "1970-01-02"}
    if identifier:
        body["identifier"] = [{"system": "urn:test:mrn", "value": identifier}]
    return body


def observation(category: str, value: float) -> dict[str, Any]:
    system, code = category.split("|")
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": system, "code": code}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }


def create(http: Any, admin: Any, body: dict[str, Any]) -> str:
    r = http.post(f"/fhir/{body['resourceType']}", json=body, headers=admin.headers())
    assert r.status_code == 201, r.get_data(as_text=True)
    return r.get_json()["id"]


def patient_total(http: Any, admin: Any) -> int:
    r = http.get("/fhir/Patient?_total=accurate", headers=admin.headers())
    assert r.status_code == 200
    return r.get_json()["total"]


def without(letter: str) -> str:
    return "".join(c for c in V2_LETTERS if c != letter)


# ---------------------------------------------------------------- what the token endpoint grants
def test_granted_scope_is_intersection_of_requested_and_registered(http, make_client):
    registered = "system/Patient.rs system/Observation.r"
    client = make_client(registered)
    requested_letters = "rs"
    expected = set()
    for word in registered.split():
        head, letters = word.rsplit(".", 1)
        expected.add(f"{head}.{''.join(c for c in letters if c in requested_letters)}")
    got = granted(http, client, f"system/*.{requested_letters}")
    assert got == expected == {"system/Patient.rs", "system/Observation.r"}


def test_granted_scope_never_widens_permissions(http, make_client):
    client = make_client("system/Patient.rs system/Observation.r")
    assert granted(http, client, "system/Patient.cruds") == {"system/Patient.rs"}
    assert granted(http, client, "system/Observation.rs") == {"system/Observation.r"}
    assert granted(http, client, "system/*.cruds") == {"system/Patient.rs", "system/Observation.r"}
    assert granted(http, client, "system/Patient.rs system/Consent.rs") == {"system/Patient.rs"}


def test_intersected_token_enforces_granted_not_requested(http, make_client, admin):
    pid = create(http, admin, patient())
    oid = create(http, admin, observation(LAB, 1.0))
    client = make_client("system/Patient.rs system/Observation.r")
    resp = request_token(http, client, "system/*.cruds")
    assert resp.status_code == 200
    h = bearer(resp.get_json()["access_token"])
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    assert http.get("/fhir/Patient", headers=h).status_code == 200
    assert http.get(f"/fhir/Observation/{oid}", headers=h).status_code == 200
    assert_forbidden(http.get("/fhir/Observation", headers=h))
    assert_forbidden(http.post("/fhir/Patient", json=patient("Evil"), headers=h))
    assert_forbidden(http.get("/fhir/Consent", headers=h))


@pytest.mark.parametrize("requested", [
    "system/Consent.rs",
    "system/Consent.cruds system/QuestionnaireResponse.r",
    "system/Patient.cud",  # registered Patient permissions are only r and s
    "patient/Patient.rs",  # context not registered
    "user/*.rs",
])
def test_nothing_grantable_is_invalid_scope(http, make_client, requested):
    client = make_client("system/Patient.rs system/Observation.r")
    assert_invalid_scope(request_token(http, client, requested))


def test_empty_scope_is_invalid_scope(http, make_client):
    client = make_client("system/*.cruds")
    assert_invalid_scope(request_token(http, client, ""))
    assert_invalid_scope(request_token(http, client, "   "))


BAD_WORDS = [
    "system/Patient.xyz",  # unknown permission letters
    "system/patient.rs",  # resource type must be capitalised
    "foo",
    "system/Patient.sr",  # v2 letters out of order
    "system/Patient.rrs",  # repeated letter
    "system/Patient.read?category=x",  # v1 cannot carry a restriction
    "System/Patient.rs",  # unknown context
    "admin/Patient.rs",
    "system/Patient",
    "system/Patient.",
    "system/.rs",
    "system/Patient.Read",
    "system/Patient.*s",
    "*/*.*",
]


@pytest.mark.parametrize("word", BAD_WORDS)
def test_malformed_scope_alone_is_refused(http, make_client, word):
    client = make_client("system/*.cruds")
    assert_invalid_scope(request_token(http, client, word))


@pytest.mark.parametrize("word", BAD_WORDS)
def test_malformed_scope_is_never_granted(http, make_client, word):
    client = make_client("system/*.cruds")
    got = granted(http, client, f"system/Patient.r {word}")
    assert word not in got
    assert got == {"system/Patient.r"}


def test_scope_for_unknown_resource_type_is_not_granted(http, make_client):
    """`system/Nope.rs` names no resource type this server has; it must not show up as granted."""
    client = make_client("system/*.cruds")
    types = {e["type"] for e in http.get("/fhir/metadata").get_json()["rest"][0]["resource"]}
    assert "Nope" not in types
    resp = request_token(http, client, "system/Patient.r system/Nope.rs")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert set(resp.get_json()["scope"].split()) == {"system/Patient.r"}
    assert_invalid_scope(request_token(http, client, "system/Nope.rs"))


def test_non_resource_scope_not_registered_is_not_granted(http, make_client):
    client = make_client("system/Patient.rs")
    assert granted(http, client, "system/Patient.rs openid fhirUser offline_access") == {"system/Patient.rs"}


# ---------------------------------------------------------------- SMART v1 syntax
def test_v1_read_scope(http, make_client, admin):
    pid = create(http, admin, patient())
    before = patient_total(http, admin)
    client = make_client("system/*.cruds")
    assert granted(http, client, "system/Patient.read") == {"system/Patient.read"}
    h = client.headers("system/Patient.read")
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    r = http.get("/fhir/Patient", headers=h)
    assert r.status_code == 200 and r.get_json()["total"] == before
    assert_forbidden(http.post("/fhir/Patient", json=patient("Evil"), headers=h))
    body = http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json()
    assert_forbidden(http.put(f"/fhir/Patient/{pid}", json={**body, "birthDate": "1999-09-09"}, headers=h))
    assert_forbidden(http.delete(f"/fhir/Patient/{pid}", headers=h))
    assert_forbidden(http.get("/fhir/Observation", headers=h))
    assert patient_total(http, admin) == before
    after = http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json()
    assert after["meta"]["versionId"] == body["meta"]["versionId"]


def test_v1_write_scope(http, make_client, admin):
    pid = create(http, admin, patient())
    client = make_client("system/*.cruds")
    assert granted(http, client, "system/*.write") == {"system/*.write"}
    h = client.headers("system/*.write")
    assert_forbidden(http.get(f"/fhir/Patient/{pid}", headers=h))
    assert_forbidden(http.get("/fhir/Patient", headers=h))
    r = http.post("/fhir/Patient", json=patient("New"), headers=h)
    assert r.status_code == 201, r.get_data(as_text=True)
    new_id = r.get_json()["id"]
    body = http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json()
    r = http.put(f"/fhir/Patient/{pid}", json={**body, "birthDate": "1980-01-01"}, headers=h)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert http.delete(f"/fhir/Patient/{new_id}", headers=h).status_code == 204
    assert http.get(f"/fhir/Patient/{new_id}", headers=admin.headers()).status_code == 410


def test_v1_star_star_scope(http, make_client, admin):
    client = make_client("system/*.cruds")
    assert granted(http, client, "system/*.*") == {"system/*.*"}
    h = client.headers("system/*.*")
    r = http.post("/fhir/Patient", json=patient(), headers=h)
    assert r.status_code == 201
    pid = r.get_json()["id"]
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    assert http.get("/fhir/Patient", headers=h).status_code == 200
    assert http.get("/fhir/Patient/_history", headers=h).status_code == 200
    assert http.delete(f"/fhir/Patient/{pid}", headers=h).status_code == 204


def test_v1_scope_narrowed_by_v2_registration(http, make_client):
    client = make_client("system/Patient.rs system/Observation.r")
    # v1 `read` = rs: Patient keeps the v1 form, Observation is narrowed to r only.
    assert granted(http, client, "system/*.read") == {"system/Patient.read", "system/Observation.r"}
    assert_invalid_scope(request_token(http, client, "system/*.write"))


def test_v1_registered_v2_requested(http, make_client):
    client = make_client("system/Patient.read")
    assert granted(http, client, "system/Patient.rs") == {"system/Patient.rs"}
    assert granted(http, client, "system/Patient.r") == {"system/Patient.r"}
    assert_invalid_scope(request_token(http, client, "system/Patient.c"))


# ---------------------------------------------------------------- per-interaction permission checks
@pytest.fixture
def existing(http, admin) -> dict[str, Any]:
    pid = create(http, admin, patient("Existing", identifier="mrn-1"))
    body = http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json()
    return body


def _assert_unchanged(http: Any, admin: Any, existing: dict[str, Any], total: int) -> None:
    r = http.get(f"/fhir/Patient/{existing['id']}", headers=admin.headers())
    assert r.status_code == 200
    now = r.get_json()
    assert now["meta"]["versionId"] == existing["meta"]["versionId"]
    assert now["name"] == existing["name"] and now["birthDate"] == existing["birthDate"]
    assert patient_total(http, admin) == total


def test_read_needs_r(http, make_client, admin, existing):
    total = patient_total(http, admin)
    h = make_client(f"system/Patient.{without('r')}").headers(f"system/Patient.{without('r')}")
    pid = existing["id"]
    for path in (f"/fhir/Patient/{pid}", f"/fhir/Patient/{pid}/_history/1", f"/fhir/Patient/{pid}/_history"):
        r = http.get(path, headers=h)
        assert_forbidden(r)
        assert "Existing" not in r.get_data(as_text=True)
    _assert_unchanged(http, admin, existing, total)


def test_search_needs_s(http, make_client, admin, existing):
    total = patient_total(http, admin)
    scope = f"system/Patient.{without('s')}"
    h = make_client(scope).headers(scope)
    for r in (http.get("/fhir/Patient", headers=h),
              http.get("/fhir/Patient?family=Existing", headers=h),
              http.post("/fhir/Patient/_search", data={"family": "Existing"}, headers=h)):
        assert_forbidden(r)
        assert "Existing" not in r.get_data(as_text=True)
    _assert_unchanged(http, admin, existing, total)


def test_history_type_needs_s(http, make_client, admin, existing):
    total = patient_total(http, admin)
    scope = f"system/Patient.{without('s')}"
    h = make_client(scope).headers(scope)
    r = http.get("/fhir/Patient/_history", headers=h)
    assert_forbidden(r)
    assert "Existing" not in r.get_data(as_text=True)
    _assert_unchanged(http, admin, existing, total)


def test_create_needs_c(http, make_client, admin, existing):
    total = patient_total(http, admin)
    scope = f"system/Patient.{without('c')}"
    h = make_client(scope).headers(scope)
    assert_forbidden(http.post("/fhir/Patient", json=patient("Intruder"), headers=h))
    # update-as-create (PUT to a new id) needs c too
    assert_forbidden(http.put("/fhir/Patient/brand-new-id", json={**patient("Intruder"), "id": "brand-new-id"},
                              headers=h))
    r = http.get("/fhir/Patient/brand-new-id", headers=admin.headers())
    assert r.status_code == 404
    _assert_unchanged(http, admin, existing, total)
    r = http.get("/fhir/Patient?family=Intruder", headers=admin.headers())
    assert r.get_json()["total"] == 0


def test_update_needs_u(http, make_client, admin, existing):
    total = patient_total(http, admin)
    scope = f"system/Patient.{without('u')}"
    h = make_client(scope).headers(scope)
    changed = {**existing, "birthDate": "2001-01-01"}
    assert_forbidden(http.put(f"/fhir/Patient/{existing['id']}", json=changed, headers=h))
    assert_forbidden(http.put("/fhir/Patient?identifier=urn:test:mrn|mrn-1", json=changed, headers=h))
    _assert_unchanged(http, admin, existing, total)


def test_delete_needs_d(http, make_client, admin, existing):
    total = patient_total(http, admin)
    scope = f"system/Patient.{without('d')}"
    h = make_client(scope).headers(scope)
    assert_forbidden(http.delete(f"/fhir/Patient/{existing['id']}", headers=h))
    assert_forbidden(http.delete("/fhir/Patient?identifier=urn:test:mrn|mrn-1", headers=h))
    _assert_unchanged(http, admin, existing, total)


def test_conditional_writes_need_s(http, make_client, admin, existing):
    """A conditional create/update/delete searches, so it needs s besides c/u/d."""
    total = patient_total(http, admin)
    scope = f"system/Patient.{without('s')}"
    h = make_client(scope).headers(scope)
    cond = "identifier=urn:test:mrn|mrn-1"
    assert_forbidden(http.post("/fhir/Patient", json=patient("Cond"), headers={**h, "If-None-Exist": cond}))
    assert_forbidden(http.put(f"/fhir/Patient?{cond}", json={**existing, "birthDate": "2002-02-02"}, headers=h))
    assert_forbidden(http.delete(f"/fhir/Patient?{cond}", headers=h))
    _assert_unchanged(http, admin, existing, total)


def test_update_with_u_but_without_c_cannot_create(http, make_client, admin, existing):
    total = patient_total(http, admin)
    scope = f"system/Patient.{without('c')}"
    h = make_client(scope).headers(scope)
    r = http.put("/fhir/Patient/not-there-yet", json={**patient("Sneaky"), "id": "not-there-yet"}, headers=h)
    assert_forbidden(r)
    assert http.get("/fhir/Patient/not-there-yet", headers=admin.headers()).status_code == 404
    _assert_unchanged(http, admin, existing, total)
    # ...but it may update an existing one (so the 403 above is about creation, not about u)
    r = http.put(f"/fhir/Patient/{existing['id']}", json={**existing, "birthDate": "1971-01-01"}, headers=h)
    assert r.status_code == 200, r.get_data(as_text=True)


def test_scope_on_one_type_grants_nothing_on_another(http, make_client, admin):
    oid = create(http, admin, observation(LAB, 2.0))
    h = make_client("system/Patient.cruds").headers("system/Patient.cruds")
    assert_forbidden(http.get(f"/fhir/Observation/{oid}", headers=h))
    assert_forbidden(http.get("/fhir/Observation", headers=h))
    assert_forbidden(http.post("/fhir/Observation", json=observation(LAB, 3.0), headers=h))
    assert_forbidden(http.delete(f"/fhir/Observation/{oid}", headers=h))
    assert http.get(f"/fhir/Observation/{oid}", headers=admin.headers()).status_code == 200


def test_full_permissions_work(http, make_client):
    """Control for the negative tests above: with every letter each interaction succeeds."""
    scope = "system/Patient.cruds"
    h = make_client(scope).headers(scope)
    r = http.post("/fhir/Patient", json=patient("Full"), headers=h)
    assert r.status_code == 201
    body = r.get_json()
    pid = body["id"]
    assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
    assert http.get("/fhir/Patient", headers=h).status_code == 200
    assert http.get("/fhir/Patient/_history", headers=h).status_code == 200
    assert http.put(f"/fhir/Patient/{pid}", json={**body, "birthDate": "1990-01-01"}, headers=h).status_code == 200
    assert http.delete(f"/fhir/Patient/{pid}", headers=h).status_code == 204


# ---------------------------------------------------------------- 403 before data is touched
def test_forbidden_does_not_leak_existence(http, make_client, admin, existing):
    scope = "system/Patient.s"
    h = make_client(scope).headers(scope)
    r_missing = http.get("/fhir/Patient/does-not-exist", headers=h)
    r_present = http.get(f"/fhir/Patient/{existing['id']}", headers=h)
    assert_forbidden(r_missing)
    assert_forbidden(r_present)
    assert r_missing.get_json()["issue"][0]["code"] == r_present.get_json()["issue"][0]["code"]
    assert_forbidden(http.delete("/fhir/Patient/does-not-exist", headers=h))
    assert_forbidden(http.put("/fhir/Patient/does-not-exist", json={**patient(), "id": "does-not-exist"}, headers=h))
    assert_forbidden(http.get("/fhir/Patient/does-not-exist/_history", headers=h))
    # control: with r the same missing id is a 404
    rh = make_client("system/Patient.r").headers("system/Patient.r")
    assert http.get("/fhir/Patient/does-not-exist", headers=rh).status_code == 404


def test_forbidden_before_body_validation(http, make_client, admin):
    total = patient_total(http, admin)
    scope = "system/Patient.rs"
    h = make_client(scope).headers(scope)
    assert_forbidden(http.post("/fhir/Patient", data=b"{not json", headers={**h, "Content-Type": "application/fhir+json"}))
    assert_forbidden(http.post("/fhir/Patient", json={"resourceType": "Patient", "bogus": 1}, headers=h))
    assert patient_total(http, admin) == total


# ---------------------------------------------------------------- AuditEvent access
def test_audit_events_need_an_audit_event_scope(http, make_client, admin, svc):
    admin.headers()
    event_id = latest_audit_id(svc)
    scope = "system/Patient.rs system/Observation.rs"
    h = make_client(scope).headers(scope)
    assert_forbidden(http.get("/fhir/AuditEvent", headers=h))
    assert_forbidden(http.get(f"/fhir/AuditEvent/{event_id}", headers=h))

    scope = "system/AuditEvent.rs"
    h = make_client(scope, settings=AUDITOR_SETTINGS).headers(scope)
    r = http.get("/fhir/AuditEvent", headers=h)
    assert r.status_code == 200 and r.get_json()["total"] >= 1
    r = http.get(f"/fhir/AuditEvent/{event_id}", headers=h)
    assert r.status_code == 200 and r.get_json()["id"] == event_id


def test_audit_events_are_read_only(http, admin, auditor, svc):
    h = admin.headers()
    event_id = latest_audit_id(svc)
    r = http.get(f"/fhir/AuditEvent/{event_id}", headers=auditor.headers())
    assert r.status_code == 200
    original = r.get_json()
    assert original["resourceType"] == "AuditEvent"
    r = http.post("/fhir/AuditEvent", json={**original, "id": None, "outcome": "0"}, headers=h)
    assert r.status_code == 405
    assert r.get_json()["resourceType"] == "OperationOutcome"
    assert http.put(f"/fhir/AuditEvent/{event_id}", json={**original, "outcome": "8"}, headers=h).status_code == 405
    assert http.delete(f"/fhir/AuditEvent/{event_id}", headers=h).status_code == 405
    after = http.get(f"/fhir/AuditEvent/{event_id}", headers=auditor.headers()).get_json()
    assert after == original


# ---------------------------------------------------------------- v2 granular restriction
@pytest.fixture
def lab_and_vitals(http, admin) -> tuple[str, str]:
    return create(http, admin, observation(LAB, 5.0)), create(http, admin, observation(VITALS, 80.0))


def test_granular_scope_limits_search_and_read(http, make_client, lab_and_vitals):
    lab_id, vital_id = lab_and_vitals
    client = make_client(LAB_SCOPE)
    assert granted(http, client, LAB_SCOPE) == {LAB_SCOPE}
    h = client.headers(LAB_SCOPE)

    r = http.get("/fhir/Observation", headers=h)
    assert r.status_code == 200
    bundle = r.get_json()
    assert bundle["total"] == 1
    assert [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"] == [lab_id]

    r = http.post("/fhir/Observation/_search", data={}, headers=h)
    assert r.status_code == 200 and r.get_json()["total"] == 1

    for query in (f"category={VITALS}", f"_id={vital_id}", "code=http://loinc.org|2345-7&category=vital-signs"):
        r = http.get(f"/fhir/Observation?{query}", headers=h)
        assert r.status_code == 200 and r.get_json()["total"] == 0, query

    r = http.get("/fhir/Observation?_summary=count", headers=h)
    assert r.status_code == 200 and r.get_json()["total"] == 1

    assert http.get(f"/fhir/Observation/{lab_id}", headers=h).status_code == 200
    for path in (f"/fhir/Observation/{vital_id}", f"/fhir/Observation/{vital_id}/_history/1",
                 f"/fhir/Observation/{vital_id}/_history"):
        r = http.get(path, headers=h)
        assert r.status_code == 404, path
        assert "vital-signs" not in r.get_data(as_text=True)


def test_callers_whose_restrictions_differ_only_in_a_value_never_share_a_read(http, make_client, lab_and_vitals):
    """The gate keeps one compiled read statement per predicate shape and binds each caller's
    values into it (db/compiled.py). Two callers whose scopes differ only in the category's value
    share that statement: alternating their reads must still let each see its own category only."""
    lab_id, vital_id = lab_and_vitals
    vitals_scope = f"system/Observation.rs?category={VITALS}"
    lab = make_client(LAB_SCOPE).headers(LAB_SCOPE)
    vitals = make_client(vitals_scope).headers(vitals_scope)
    for _ in range(3):  # the first round compiles, the later ones reuse what was kept
        assert http.get(f"/fhir/Observation/{lab_id}", headers=lab).status_code == 200
        assert http.get(f"/fhir/Observation/{lab_id}", headers=vitals).status_code == 404
        assert http.get(f"/fhir/Observation/{vital_id}", headers=vitals).status_code == 200
        assert http.get(f"/fhir/Observation/{vital_id}", headers=lab).status_code == 404


def test_granular_scope_limits_type_history(http, make_client, lab_and_vitals):
    lab_id, vital_id = lab_and_vitals
    h = make_client(LAB_SCOPE).headers(LAB_SCOPE)
    r = http.get("/fhir/Observation/_history", headers=h)
    assert r.status_code == 200
    ids = {e["resource"]["id"] for e in r.get_json().get("entry", []) if "resource" in e}
    assert ids == {lab_id}
    assert vital_id not in r.get_data(as_text=True)


def test_granular_registration_applies_to_broader_request(http, make_client, lab_and_vitals):
    lab_id, _vital_id = lab_and_vitals
    client = make_client(LAB_SCOPE)
    for requested in ("system/Observation.rs", "system/*.rs", "system/Observation.read"):
        resp = request_token(http, client, requested)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        body = resp.get_json()
        assert all(f"category={LAB}" in w for w in body["scope"].split()), body["scope"]
        r = http.get("/fhir/Observation", headers=bearer(body["access_token"]))
        assert r.status_code == 200 and r.get_json()["total"] == 1, requested
        assert r.get_json()["entry"][0]["resource"]["id"] == lab_id


def test_granular_registration_refuses_other_restriction(http, make_client):
    client = make_client(LAB_SCOPE)
    assert_invalid_scope(request_token(http, client, f"system/Observation.rs?category={VITALS}"))
    assert_invalid_scope(request_token(http, client, "system/Observation.c"))


def test_granular_requested_on_unrestricted_registration(http, make_client, lab_and_vitals):
    lab_id, vital_id = lab_and_vitals
    client = make_client("system/Observation.rs")
    assert granted(http, client, LAB_SCOPE) == {LAB_SCOPE}
    h = client.headers(LAB_SCOPE)
    r = http.get("/fhir/Observation", headers=h)
    assert r.get_json()["total"] == 1
    assert http.get(f"/fhir/Observation/{vital_id}", headers=h).status_code == 404
    assert http.get(f"/fhir/Observation/{lab_id}", headers=h).status_code == 200


def test_granular_create_outside_restriction_forbidden(http, make_client, admin):
    scope = f"system/Observation.crs?category={LAB}"
    h = make_client(scope).headers(scope)
    before = http.get("/fhir/Observation", headers=admin.headers()).get_json()["total"]
    assert_forbidden(http.post("/fhir/Observation", json=observation(VITALS, 70.0), headers=h))
    assert http.get("/fhir/Observation", headers=admin.headers()).get_json()["total"] == before
    r = http.post("/fhir/Observation", json=observation(LAB, 6.0), headers=h)
    assert r.status_code == 201, r.get_data(as_text=True)
    assert http.get("/fhir/Observation", headers=admin.headers()).get_json()["total"] == before + 1


def test_granular_update_cannot_move_resource_out_of_restriction(http, make_client, admin, lab_and_vitals):
    lab_id, vital_id = lab_and_vitals
    scope = f"system/Observation.rus?category={LAB}"
    h = make_client(scope).headers(scope)
    lab = http.get(f"/fhir/Observation/{lab_id}", headers=admin.headers()).get_json()
    vital = http.get(f"/fhir/Observation/{vital_id}", headers=admin.headers()).get_json()
    # Re-labelling a lab result as vital signs would move it out of the client's own restriction.
    moved = {**lab, "category": vital["category"]}
    assert_forbidden(http.put(f"/fhir/Observation/{lab_id}", json=moved, headers=h))
    # Overwriting a vital-signs observation the client cannot see is refused as well.
    relabelled = {**vital, "category": lab["category"]}
    assert http.put(f"/fhir/Observation/{vital_id}", json=relabelled, headers=h).status_code in (403, 404)
    assert http.get(f"/fhir/Observation/{lab_id}", headers=admin.headers()).get_json() == lab
    assert http.get(f"/fhir/Observation/{vital_id}", headers=admin.headers()).get_json() == vital


def test_granular_delete_does_not_reveal_hidden_resources(http, make_client, admin, lab_and_vitals):
    """A restricted client must not be able to tell a hidden resource from a missing one."""
    _lab_id, vital_id = lab_and_vitals
    scope = f"system/Observation.rds?category={LAB}"
    h = make_client(scope).headers(scope)
    assert http.get(f"/fhir/Observation/{vital_id}", headers=h).status_code == 404  # hidden from this client
    hidden = http.delete(f"/fhir/Observation/{vital_id}", headers=h)
    missing = http.delete("/fhir/Observation/no-such-observation", headers=h)
    # the hidden resource is untouched either way
    r = http.get(f"/fhir/Observation/{vital_id}", headers=admin.headers())
    assert r.status_code == 200 and r.get_json()["meta"]["versionId"] == "1"
    assert hidden.status_code == missing.status_code, (hidden.status_code, missing.status_code)


def test_granular_restriction_applies_to_earlier_versions(http, make_client, admin, lab_and_vitals):
    """A version whose content is outside the restriction stays invisible, even after the resource
    was later changed to match it (v1 is vital-signs data the client was never allowed to see)."""
    lab_id, vital_id = lab_and_vitals
    lab = http.get(f"/fhir/Observation/{lab_id}", headers=admin.headers()).get_json()
    vital = http.get(f"/fhir/Observation/{vital_id}", headers=admin.headers()).get_json()
    r = http.put(f"/fhir/Observation/{vital_id}", json={**vital, "category": lab["category"]}, headers=admin.headers())
    assert r.status_code == 200 and r.get_json()["meta"]["versionId"] == "2"
    h = make_client(LAB_SCOPE).headers(LAB_SCOPE)
    # the current version (now laboratory) is visible
    assert http.get(f"/fhir/Observation/{vital_id}", headers=h).status_code == 200
    # ...but version 1 (vital-signs) is not, neither by vread nor through any history
    r = http.get(f"/fhir/Observation/{vital_id}/_history/1", headers=h)
    assert r.status_code == 404, r.get_data(as_text=True)
    for path in (f"/fhir/Observation/{vital_id}/_history", "/fhir/Observation/_history"):
        r = http.get(path, headers=h)
        assert r.status_code in (200, 404)
        if r.status_code == 200:
            cats = [c["code"] for e in r.get_json().get("entry", []) if "resource" in e
                    for cat in e["resource"].get("category", []) for c in cat.get("coding", [])]
            assert "vital-signs" not in cats, path


# ---------------------------------------------------------------- one AuditEvent per /fhir request
def test_every_fhir_request_writes_one_audit_event(http, make_client, admin, svc, existing):
    admin_h = admin.headers()
    s_only = make_client("system/Patient.s").headers("system/Patient.s")
    cases = [
        ("GET", "/fhir/Patient", admin_h, None, 200),
        ("GET", f"/fhir/Patient/{existing['id']}", admin_h, None, 200),
        ("POST", "/fhir/Patient", admin_h, patient("Audited"), 201),
        ("GET", "/fhir/Patient/no-such-id", admin_h, None, 404),
        ("GET", "/fhir/Patient", {}, None, 401),
        ("GET", "/fhir/Patient", {"Authorization": "Bearer nope"}, None, 401),
        ("GET", f"/fhir/Patient/{existing['id']}", s_only, None, 403),
        ("POST", "/fhir/Patient", s_only, patient("Denied"), 403),
        ("POST", "/fhir/AuditEvent", admin_h, {"resourceType": "AuditEvent"}, 405),
        ("GET", "/fhir/metadata", {}, None, 200),
        ("GET", "/fhir/.well-known/smart-configuration", {}, None, 200),
    ]
    for method, path, headers, body, status in cases:
        before = audit_count(svc)
        r = http.open(path, method=method, headers=headers, json=body)
        assert r.status_code == status, (method, path, r.get_data(as_text=True))
        assert audit_count(svc) == before + 1, (method, path, status)


@pytest.mark.parametrize("kind", ["401", "403", "404"])
def test_failed_request_audit_event_records_failure(http, make_client, admin, auditor, svc, kind):
    admin_h = admin.headers()
    auditor_h = auditor.headers()
    s_only = make_client("system/Patient.s").headers("system/Patient.s")
    request = {"401": ({}, "/fhir/Patient"), "403": (s_only, "/fhir/Patient/x1"),
               "404": (admin_h, "/fhir/Patient/x1")}[kind]
    r = http.get(request[1], headers=request[0])
    assert r.status_code == int(kind)
    event = http.get(f"/fhir/AuditEvent/{latest_audit_id(svc)}", headers=auditor_h).get_json()
    assert event["resourceType"] == "AuditEvent"
    assert event["outcome"] == "4"  # minor failure: the request was refused
