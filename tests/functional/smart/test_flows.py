"""End-to-end SMART App Launch flows beyond the public-app smoke test: confidential apps (client
secret, private_key_jwt), TOTP sign-in, a practitioner choosing a patient, an EHR launch, and
what the tokens carry (id_token verified against /auth/jwks, introspection, discovery)."""

from __future__ import annotations

import json
from typing import Any

import pyotp
from joserfc import jwt
from joserfc.jwk import KeySet

from fhirserver.auth.assertion import client_assertion, generate_key, public_jwks
from fhirserver.smart.launch import new_launch
from tests.conftest import BASE
from tests.functional.smart.conftest import PASSWORD, Smart

SCOPE = "openid fhirUser launch/patient patient/*.rs offline_access"


def test_confidential_app_with_client_secret(smart: Smart) -> None:
    pid = smart.patient()
    user, _ = smart.user(f"Patient/{pid}")
    client_id, secret = smart.app_client(method="client_secret_basic")
    assert secret
    flow = smart.authorize(client_id, SCOPE, user)
    without = smart.exchange(client_id, flow)  # no secret: a confidential client must authenticate
    assert without.status_code == 401 and without.get_json()["error"] == "invalid_client"
    wrong = smart.exchange(client_id, flow, secret="not-the-secret")
    assert wrong.status_code == 401
    ok = smart.exchange(client_id, flow, secret=secret)  # HTTP Basic
    assert ok.status_code == 200, ok.get_data(as_text=True)
    tok = ok.get_json()
    # client_secret_post works as well, for the refresh
    refreshed = smart.http.post("/auth/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                     "client_secret": secret, "refresh_token": tok["refresh_token"]})
    assert refreshed.status_code == 200 and refreshed.get_json()["patient"] == pid


def test_confidential_app_with_private_key_jwt(smart: Smart, settings: Any) -> None:
    pid = smart.patient()
    user, _ = smart.user(f"Patient/{pid}")
    key = generate_key("RS384")
    client_id, _ = smart.app_client(method="private_key_jwt", jwks=public_jwks(key))
    flow = smart.authorize(client_id, SCOPE, user)
    form = {"grant_type": "authorization_code", "code": flow.code, "redirect_uri": "https://app.example.org/callback",
            "code_verifier": flow.verifier,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": client_assertion(key, client_id, settings.token_url)}
    resp = smart.http.post("/auth/token", data=form)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["patient"] == pid


def test_totp_sign_in(smart: Smart) -> None:
    pid = smart.patient()
    user, secret = smart.user(f"Patient/{pid}", totp=True)
    assert secret
    client_id, _ = smart.app_client()
    browser, _flow = smart.start(client_id, SCOPE)
    page = browser.login(user, PASSWORD)
    assert "totp" in page.names() and "approve" not in page.names()
    page = browser.submit(totp="000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
    assert page.status == 401 and "totp" in page.names()  # wrong code: asked again
    code = pyotp.TOTP(secret).now()
    page = browser.submit(totp=code)
    assert "approve" in page.names(), page.html
    tok = smart.tokens(client_id, SCOPE, user, totp_secret=None)  # same browser: still signed in
    assert tok["patient"] == pid


def test_practitioner_chooses_a_patient(smart: Smart) -> None:
    pids = [smart.patient("Pickme"), smart.patient("Other")]
    user, _ = smart.user("Practitioner/doc-1")
    client_id, _ = smart.app_client()
    browser, _flow = smart.start(client_id, SCOPE)
    page = browser.login(user, PASSWORD)
    assert "patient" in page.names() and page.options("patient") == []  # a free field, not radios
    bad = browser.approve(patient="no-such-patient")
    assert bad.status == 400 and "patient" in bad.names()
    page = browser.approve(patient=pids[0])
    assert page.status == 302
    from tests.functional.smart.browser import redirect_params

    code = redirect_params(page.location or "")["code"]
    flow = type("Flow", (), {"code": code, "verifier": _flow.verifier})()
    tok = smart.exchange(client_id, flow).get_json()  # type: ignore[arg-type]
    assert tok["patient"] == pids[0] and tok["need_patient_banner"] is True
    assert smart.get(f"/fhir/Patient/{pids[1]}", tok["access_token"]).status_code == 404


def test_ehr_launch_sets_the_context(smart: Smart) -> None:
    pid = smart.patient("Launched")
    user, _ = smart.user("Practitioner/doc-2")
    client_id, _ = smart.app_client()
    made = new_launch(smart.svc, client_id, f"Patient/{pid}", "Encounter/enc-1", user)
    browser, flow = smart.start(client_id, "launch " + SCOPE, launch=made.launch)
    page = browser.login(user, PASSWORD)
    assert "approve" in page.names() and "patient" not in page.names()  # no picker: the launch decides
    flow.page = browser.approve()
    from tests.functional.smart.browser import redirect_params

    flow.code = redirect_params(flow.page.location or "")["code"]
    tok = smart.exchange(client_id, flow).get_json()
    assert tok["patient"] == pid and tok["encounter"] == "enc-1" and tok["need_patient_banner"] is False
    assert "launch" in tok["scope"].split()
    # a launch made for another user cannot be completed by this one
    other, _ = smart.user("Practitioner/doc-3")
    made = new_launch(smart.svc, client_id, f"Patient/{pid}", None, other)
    browser, _ = smart.start(client_id, "launch " + SCOPE, launch=made.launch)
    assert browser.page is not None and browser.page.status == 403  # still signed in as `user`


def test_id_token_introspection_and_discovery(smart: Smart) -> None:
    pid = smart.patient()
    user, _ = smart.user(f"Patient/{pid}")
    client_id, _ = smart.app_client()
    tok = smart.tokens(client_id, SCOPE, user, nonce="n-123")
    discovery = smart.http.get("/.well-known/openid-configuration").get_json()
    keys = KeySet.import_key_set(smart.http.get(discovery["jwks_uri"].split("testserver", 1)[1]).get_json())
    claims = jwt.decode(tok["id_token"], keys, algorithms=["RS256"]).claims
    assert claims["iss"] == discovery["issuer"] == BASE.removesuffix("/fhir")
    assert claims["aud"] in (client_id, [client_id]) and claims["nonce"] == "n-123"
    assert claims["fhirUser"] == f"{BASE}/Patient/{pid}" and claims["sub"]
    intro = smart.http.post("/auth/introspect", data={"token": tok["access_token"], "client_id": client_id}).get_json()
    assert intro["active"] is True and intro["patient"] == pid and intro["client_id"] == client_id
    assert intro["fhirUser"] == f"{BASE}/Patient/{pid}" and set(intro["scope"].split()) == set(tok["scope"].split())
    other_client, _ = smart.app_client()  # another client may not learn about this token
    assert smart.http.post("/auth/introspect", data={"token": tok["access_token"],
                                                     "client_id": other_client}).get_json() == {"active": False}


def test_smart_configuration_lists_everything(smart: Smart) -> None:
    conf = smart.http.get("/fhir/.well-known/smart-configuration").get_json()
    for field in ("authorization_endpoint", "token_endpoint", "token_endpoint_auth_methods_supported",
                  "grant_types_supported", "registration_endpoint", "scopes_supported", "response_types_supported",
                  "introspection_endpoint", "revocation_endpoint"):
        assert conf.get(field), field
    assert conf["code_challenge_methods_supported"] == ["S256"]
    # every served type (the registry, issue 14) in every context, and nothing that is not served
    served = smart.svc.types.names()
    for rtype in served:
        for context in ("patient", "user", "system"):
            assert {f"{context}/{rtype}.rs", f"{context}/{rtype}.cruds"} <= set(conf["scopes_supported"]), rtype
    named = {s.split("/", 1)[1].split(".", 1)[0] for s in conf["scopes_supported"]
             if s.startswith(("patient/", "user/", "system/"))}
    assert named == {*served, "*"}
    for cap in ("launch-ehr", "launch-standalone", "client-public", "client-confidential-symmetric",
                "client-confidential-asymmetric", "context-ehr-patient", "context-standalone-patient",
                "permission-offline", "permission-patient", "permission-user", "permission-v1", "permission-v2",
                "sso-openid-connect", "authorize-post"):
        assert cap in conf["capabilities"], cap
    for endpoint in ("authorization_endpoint", "token_endpoint", "introspection_endpoint", "revocation_endpoint"):
        path = conf[endpoint].split("testserver", 1)[1]
        assert smart.http.open(path, method="OPTIONS").status_code != 404, endpoint
    assert json.loads(smart.http.get("/api/openapi.json").get_data())["paths"]
