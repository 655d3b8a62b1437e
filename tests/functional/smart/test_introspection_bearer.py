"""Token introspection by a resource server that authenticates with its own Bearer token (RFC 7662
section 2.1; SMART suggests a backend-services token): allowed for a backend client registered
with `--introspect-any`, refused (401 invalid_client) for every other bearer."""

from __future__ import annotations

from typing import Any

from fhirserver.auth.clients import set_disabled
from tests.conftest import BackendClient
from tests.functional.smart.conftest import Smart


def _introspect(http: Any, bearer: str | None, token: str) -> Any:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return http.post("/auth/introspect", data={"token": token}, headers=headers)


def test_resource_server_introspects_with_its_own_bearer_token(http: Any, make_client: Any, admin: BackendClient,
                                                               smart: Smart) -> None:
    rs = make_client("system/Patient.rs", settings={"introspect_any": True})
    rs_token = rs.token("system/Patient.rs")
    target = admin.token("system/*.cruds")
    r = _introspect(http, rs_token, target)
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["active"] is True and body["client_id"] == admin.client_id and body["scope"] == "system/*.cruds"
    # an app user's token too (the resource server serves apps)
    client_id, _ = smart.app_client()
    username, _ = smart.user(f"Patient/{smart.patient('Introspected')}")
    user_token = smart.tokens(client_id, "openid fhirUser launch/patient patient/*.rs", username)["access_token"]
    assert _introspect(http, rs_token, user_token).get_json()["active"] is True
    # an unknown token is simply inactive
    assert _introspect(http, rs_token, "no-such-token").get_json() == {"active": False}


def test_other_bearers_are_refused(http: Any, make_client: Any, admin: BackendClient, smart: Smart) -> None:
    target = admin.token("system/*.cruds")
    plain = make_client("system/Patient.rs")  # not registered as a resource server
    for bearer in (plain.token("system/Patient.rs"), admin.token("system/*.cruds"), "forged-token", None):
        r = _introspect(http, bearer, target)
        assert r.status_code == 401 and r.get_json()["error"] == "invalid_client", (bearer, r.get_data(as_text=True))
    # a user's (app) token never authenticates a resource server, even the resource server's own app
    client_id, _ = smart.app_client()
    username, _ = smart.user(f"Patient/{smart.patient('Bearerapp')}")
    user_token = smart.tokens(client_id, "openid fhirUser launch/patient patient/*.rs", username)["access_token"]
    assert _introspect(http, user_token, target).status_code == 401
    # a disabled resource server's token stops working at once
    rs = make_client("system/Patient.rs", settings={"introspect_any": True})
    rs_token = rs.token("system/Patient.rs")
    assert _introspect(http, rs_token, target).status_code == 200
    set_disabled(http.application.extensions["fhirserver"].engine, rs.client_id, True)
    assert _introspect(http, rs_token, target).status_code == 401
