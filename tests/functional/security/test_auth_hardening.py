"""Token endpoint and sign-in session hardening (issue "Security fixes" items 8, 9) and dangling
transaction references (item 11), through HTTP."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from fhirserver.auth.assertion import client_assertion
from fhirserver.auth.clients import register_app_client, set_disabled
from tests.conftest import BASE, BackendClient, make_settings
from tests.support.apps import fresh_app
from tests.support.tokens import assert_refused, form, post_token

SCOPE = "system/*.cruds"
REDIRECT = "https://app.example.org/callback"


# ---------------------------------------------------------------- 9: token endpoint
@pytest.mark.parametrize("disabled", [False, True])
def test_assertion_for_one_client_with_another_client_id_is_refused(http: Any, make_client: Any, settings: Any,
                                                                    svc: Any, disabled: bool) -> None:
    a, b = make_client(SCOPE), make_client(SCOPE)
    if disabled:
        set_disabled(svc.engine, b.client_id, True)
    assertion = client_assertion(a.key, a.client_id, settings.token_url)
    assert_refused(post_token(http, form(assertion, client_id=b.client_id)))
    # the same client's own id alongside its assertion is fine
    ok = post_token(http, form(client_assertion(a.key, a.client_id, settings.token_url), client_id=a.client_id))
    assert ok.status_code == 200, ok.get_data(as_text=True)


@pytest.mark.parametrize("aud,accepted", [
    ("token", True),
    (["token"], True),
    (["token", "https://other.example.org/token"], False),
    (["https://other.example.org/token", "token"], False),
    (["https://other.example.org/token"], False),
    ([], False),
])
def test_assertion_audience_is_the_token_url_alone(http: Any, make_client: Any, settings: Any, aud: Any,
                                                   accepted: bool) -> None:
    client: BackendClient = make_client(SCOPE)
    value = [settings.token_url if a == "token" else a for a in aud] if isinstance(aud, list) else settings.token_url
    resp = post_token(http, form(client_assertion(client.key, client.client_id, settings.token_url, aud=value)))
    if accepted:
        assert resp.status_code == 200, resp.get_data(as_text=True)
    else:
        assert_refused(resp)


# ---------------------------------------------------------------- 8: session cookie behind TLS
def _session_cookie(http: Any, client_id: str, **headers: str) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": "openid launch/patient",
              "state": "s1", "aud": BASE, "code_challenge": "E9Melhoe2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
              "code_challenge_method": "S256"}
    resp = http.get("/auth/authorize", query_string=params, headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    cookies = [v for k, v in resp.headers.items() if k.lower() == "set-cookie" and v.startswith("fhirserver_session=")]
    assert len(cookies) == 1, resp.headers
    return str(cookies[0])


def _app(tmp_path: Path, **settings: Any) -> Any:
    settings = dataclasses.replace(make_settings(tmp_path), **settings)
    return fresh_app(settings)


def test_session_cookie_is_secure_behind_a_tls_proxy(tmp_path: Path) -> None:
    app = _app(tmp_path, proxy_hops=1)
    try:
        svc = app.extensions["fhirserver"]
        rec, _ = register_app_client(svc.engine, "cookie app", "openid launch/patient patient/*.rs", [REDIRECT], "none")
        http = app.test_client()
        cookie = _session_cookie(http, rec.client_id, **{"X-Forwarded-Proto": "https"})
        attributes = [a.strip().lower() for a in cookie.split(";")]
        assert "secure" in attributes and "httponly" in attributes and "samesite=lax" in attributes
        plain = _session_cookie(app.test_client(), rec.client_id)  # plain http, no proxy: no Secure
        assert "secure" not in [a.strip().lower() for a in plain.split(";")]
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_forwarded_proto_is_ignored_without_proxy_hops(tmp_path: Path) -> None:
    app = _app(tmp_path)
    try:
        svc = app.extensions["fhirserver"]
        rec, _ = register_app_client(svc.engine, "cookie app", "openid launch/patient patient/*.rs", [REDIRECT], "none")
        cookie = _session_cookie(app.test_client(), rec.client_id, **{"X-Forwarded-Proto": "https"})
        assert "secure" not in [a.strip().lower() for a in cookie.split(";")]
    finally:
        app.extensions["fhirserver"].engine.dispose()


# ---------------------------------------------------------------- 11: dangling urn:uuid references
def test_transaction_with_an_unresolved_urn_uuid_reference_is_refused(http: Any, admin: BackendClient) -> None:
    h = admin.headers()
    total = http.get("/fhir/Observation", query_string={"_summary": "count"}, headers=h).get_json()["total"]
    patient_urn, missing = "urn:uuid:11111111-1111-4111-8111-111111111111", "urn:uuid:22222222-2222-4222-8222-222222222222"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient_urn, "resource": {"resourceType": "Patient", "name": [{"family": "Urn"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": patient_urn}, "performer": [{"reference": missing}]},
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    resp = http.post("/fhir", json=bundle, headers=h)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome" and missing in body["issue"][0]["diagnostics"]
    assert http.get("/fhir/Patient", query_string={"family": "Urn"}, headers=h).get_json()["total"] == 0
    assert http.get("/fhir/Observation", query_string={"_summary": "count"}, headers=h).get_json()["total"] == total
    # resolved, the same transaction commits with the reference rewritten
    bundle["entry"][1]["resource"].pop("performer")
    resp = http.post("/fhir", json=bundle, headers=h)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    location = resp.get_json()["entry"][1]["response"]["location"].split("/_history")[0]
    stored = http.get(f"/fhir/Observation/{location.rsplit('/', 1)[1]}", headers=h).get_json()
    assert stored["subject"]["reference"].startswith("Patient/") and "urn:uuid" not in str(stored)
