"""SMART App Launch refusals, each driven through the real HTTP flow: PKCE, redirect URIs, code
and refresh-token reuse (and the family revocation they trigger), audience, revocation, disabled
users and clients, lockout, CSRF, denial, launches, unknown scopes."""

from __future__ import annotations

from typing import Any

import pytest

from fhirserver.auth.clients import set_disabled
from fhirserver.users.registry import set_disabled as disable_user
from tests.conftest import raw_db
from tests.functional.smart.browser import Browser, pkce_pair, redirect_params
from tests.functional.smart.conftest import PASSWORD, REDIRECT, Smart

SCOPE = "openid fhirUser launch/patient patient/*.rs offline_access"


@pytest.fixture
def setup(smart: Smart) -> dict[str, Any]:
    pid = smart.patient()
    user, _ = smart.user(f"Patient/{pid}")
    client_id, _ = smart.app_client()
    return {"pid": pid, "user": user, "client": client_id}


def _redirect_error(smart: Smart, client_id: str, **params: Any) -> dict[str, str]:
    verifier, challenge = pkce_pair()
    query = smart.authorize_params(client_id, params.pop("scope", SCOPE), challenge, "st", **params)
    for key, value in params.items():
        if value is None:
            query.pop(key, None)
    page = Browser(smart.http).open(query)
    assert page.status == 302, page.html
    got = redirect_params(page.location or "")
    assert page.location and page.location.startswith(REDIRECT) and got["state"] == "st"
    return got


def test_pkce_is_mandatory_and_s256_only(smart: Smart, setup: dict[str, Any]) -> None:
    assert _redirect_error(smart, setup["client"], code_challenge=None, code_challenge_method=None)["error"] == \
        "invalid_request"
    assert _redirect_error(smart, setup["client"], code_challenge_method="plain")["error"] == "invalid_request"
    flow = smart.authorize(setup["client"], SCOPE, setup["user"])
    wrong = smart.exchange(setup["client"], flow, code_verifier=pkce_pair()[0])
    assert wrong.status_code == 400 and wrong.get_json()["error"] == "invalid_grant"
    flow = smart.authorize(setup["client"], SCOPE, setup["user"])
    absent = smart.exchange(setup["client"], flow, code_verifier=None)
    assert absent.status_code == 400 and absent.get_json()["error"] == "invalid_request"


def test_redirect_uri_must_match_exactly(smart: Smart, setup: dict[str, Any]) -> None:
    for uri in (REDIRECT + "/", REDIRECT + "?x=1", "https://evil.example/callback"):
        verifier, challenge = pkce_pair()
        params = smart.authorize_params(setup["client"], SCOPE, challenge, "s")
        params["redirect_uri"] = uri
        page = Browser(smart.http).open(params)
        assert page.status == 400 and page.location is None, uri  # an error page, never a redirect
    flow = smart.authorize(setup["client"], SCOPE, setup["user"])
    resp = smart.exchange(setup["client"], flow, redirect_uri=REDIRECT + "/other")
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_grant"


def test_code_reuse_fails_and_revokes_the_first_tokens(smart: Smart, setup: dict[str, Any]) -> None:
    flow = smart.authorize(setup["client"], SCOPE, setup["user"])
    first = smart.exchange(setup["client"], flow)
    assert first.status_code == 200
    tok = first.get_json()
    assert smart.get(f"/fhir/Patient/{setup['pid']}", tok["access_token"]).status_code == 200
    second = smart.exchange(setup["client"], flow)
    assert second.status_code == 400 and second.get_json()["error"] == "invalid_grant"
    assert smart.get(f"/fhir/Patient/{setup['pid']}", tok["access_token"]).status_code == 401
    assert smart.refresh(setup["client"], tok["refresh_token"]).status_code == 400


def test_expired_code(smart: Smart, setup: dict[str, Any], settings: Any) -> None:
    flow = smart.authorize(setup["client"], SCOPE, setup["user"])
    with raw_db(settings) as cx:
        cx.execute("UPDATE authorization_code SET expires_us = 0")
    resp = smart.exchange(setup["client"], flow)
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_grant"


def test_wrong_audience(smart: Smart, setup: dict[str, Any]) -> None:
    got = _redirect_error(smart, setup["client"], aud="https://other-server.example/fhir")
    assert got["error"] == "invalid_request" and "aud" in got.get("error_description", "")


def test_refresh_rotation_reuse_and_scope_escalation(smart: Smart, setup: dict[str, Any]) -> None:
    tok = smart.tokens(setup["client"], SCOPE, setup["user"])
    first = smart.refresh(setup["client"], tok["refresh_token"])
    assert first.status_code == 200
    new = first.get_json()
    assert new["refresh_token"] != tok["refresh_token"] and new["patient"] == setup["pid"]
    narrower = smart.refresh(setup["client"], new["refresh_token"], scope="launch/patient patient/*.rs offline_access")
    assert narrower.status_code == 200 and "openid" not in narrower.get_json()["scope"].split()
    latest = narrower.get_json()
    escalate = smart.refresh(setup["client"], latest["refresh_token"], scope=SCOPE + " patient/*.cruds")
    assert escalate.status_code == 400 and escalate.get_json()["error"] == "invalid_scope"
    # reusing a rotated refresh token revokes the whole family, including the newest tokens
    reuse = smart.refresh(setup["client"], tok["refresh_token"])
    assert reuse.status_code == 400 and reuse.get_json()["error"] == "invalid_grant"
    assert smart.get(f"/fhir/Patient/{setup['pid']}", latest["access_token"]).status_code == 401
    assert smart.refresh(setup["client"], latest["refresh_token"]).status_code == 400


def test_revoked_token_is_refused(smart: Smart, setup: dict[str, Any]) -> None:
    tok = smart.tokens(setup["client"], SCOPE, setup["user"])
    resp = smart.http.post("/auth/revoke", data={"token": tok["access_token"], "client_id": setup["client"]})
    assert resp.status_code == 200
    denied = smart.get(f"/fhir/Patient/{setup['pid']}", tok["access_token"])
    assert denied.status_code == 401 and "Bearer" in denied.headers["WWW-Authenticate"]
    intro = smart.http.post("/auth/introspect", data={"token": tok["access_token"], "client_id": setup["client"]})
    assert intro.get_json() == {"active": False}
    # revoking the refresh token ends the grant: its access tokens too
    tok2 = smart.tokens(setup["client"], SCOPE, setup["user"])
    smart.http.post("/auth/revoke", data={"token": tok2["refresh_token"], "token_type_hint": "refresh_token",
                                          "client_id": setup["client"]})
    assert smart.get(f"/fhir/Patient/{setup['pid']}", tok2["access_token"]).status_code == 401


def test_disabled_user(smart: Smart, setup: dict[str, Any]) -> None:
    tok = smart.tokens(setup["client"], SCOPE, setup["user"])
    disable_user(smart.svc.engine, setup["user"])
    assert smart.get(f"/fhir/Patient/{setup['pid']}", tok["access_token"]).status_code == 401
    assert smart.refresh(setup["client"], tok["refresh_token"]).status_code == 400
    browser, flow = smart.start(setup["client"], SCOPE)
    page = browser.login(setup["user"], PASSWORD)
    assert page.status == 401 and "approve" not in page.names() and page.error


def test_disabled_client(smart: Smart, setup: dict[str, Any]) -> None:
    tok = smart.tokens(setup["client"], SCOPE, setup["user"])
    set_disabled(smart.svc.engine, setup["client"])
    assert smart.get(f"/fhir/Patient/{setup['pid']}", tok["access_token"]).status_code == 401
    assert smart.refresh(setup["client"], tok["refresh_token"]).status_code in (400, 401)
    got = _redirect_error(smart, setup["client"])
    assert got["error"] == "unauthorized_client"


def test_lockout_after_failures(smart: Smart, setup: dict[str, Any]) -> None:
    browser, _flow = smart.start(setup["client"], SCOPE)
    for _ in range(5):
        page = browser.login(setup["user"], "wrong-password-123")
        assert page.status == 401 and "approve" not in page.names()
    page = browser.login(setup["user"], PASSWORD)  # right password, but locked now
    assert page.status == 401 and "approve" not in page.names()
    assert page.error and "password" in page.error  # the same neutral message


def test_csrf_and_deny(smart: Smart, setup: dict[str, Any]) -> None:
    browser, _flow = smart.start(setup["client"], SCOPE)
    page = browser.login(setup["user"], PASSWORD)
    assert "approve" in page.names()
    hidden = page.hidden()
    forged = smart.http.post("/auth/authorize", data={"txn": hidden["txn"], "csrf_token": "forged", "approve": "1",
                                                      "scope": "patient/*.rs"})
    assert forged.status_code == 403 and "Location" not in forged.headers
    missing = smart.http.post("/auth/authorize", data={"txn": hidden["txn"], "approve": "1"})
    assert missing.status_code == 403
    page = browser.submit(deny="1")
    assert page.status == 302 and redirect_params(page.location or "")["error"] == "access_denied"


def test_launch_misuse(smart: Smart, setup: dict[str, Any]) -> None:
    from fhirserver.smart.launch import new_launch

    other_client, _ = smart.app_client()
    made = new_launch(smart.svc, setup["client"], f"Patient/{setup['pid']}")
    assert _redirect_error(smart, setup["client"], launch=made.launch)["error"] == "invalid_request"  # no `launch` scope
    made = new_launch(smart.svc, setup["client"], f"Patient/{setup['pid']}")
    assert _redirect_error(smart, other_client, launch=made.launch, scope="launch " + SCOPE)["error"] == \
        "invalid_request"  # bound to another client
    made = new_launch(smart.svc, setup["client"], f"Patient/{setup['pid']}")
    ok = smart.authorize(setup["client"], "launch " + SCOPE, setup["user"], launch=made.launch)
    assert ok.code
    again = _redirect_error(smart, setup["client"], launch=made.launch, scope="launch " + SCOPE)
    assert again["error"] == "invalid_request"  # single use


def test_unknown_scopes_are_never_granted(smart: Smart, setup: dict[str, Any]) -> None:
    tok = smart.tokens(setup["client"], "launch/patient patient/Foo.rs patient/Observation.xyz "
                                        "patient/Observation.rs system/*.cruds", setup["user"])
    granted = tok["scope"].split()
    assert granted == ["patient/Observation.rs", "launch/patient"] or set(granted) == {"patient/Observation.rs",
                                                                                      "launch/patient"}


def test_token_events_are_audited(smart: Smart, setup: dict[str, Any], settings: Any, auditor: Any) -> None:
    def events() -> int:
        with raw_db(settings) as cx:
            return int(cx.execute("SELECT count(*) FROM access_record").fetchone()[0])

    start = events()
    tok = smart.tokens(setup["client"], SCOPE, setup["user"])
    after_flow = events()
    assert after_flow - start == 3  # login, authorization decision, token issuance
    smart.http.post("/auth/introspect", data={"token": tok["access_token"], "client_id": setup["client"]})
    smart.http.post("/auth/revoke", data={"token": tok["access_token"], "client_id": setup["client"]})
    smart.exchange(setup["client"], type("F", (), {"code": "bogus", "verifier": pkce_pair()[0]})())
    assert events() - after_flow == 3  # introspection, revocation, refused token request
    bundle = smart.http.get("/fhir/AuditEvent", query_string={"_count": "50", "_sort": "-date"},
                            headers=auditor.headers()).get_json()
    descs = [e["resource"].get("outcomeDesc", "") for e in bundle["entry"]]
    assert any(d.startswith("token refused") for d in descs)
    assert any(d.startswith("token introspected") for d in descs)
    assert any(d.startswith("token revoked") for d in descs)
    assert any(d.startswith("authorization code issued") for d in descs)
    assert any(d.startswith("ok: login succeeded") for d in descs)
