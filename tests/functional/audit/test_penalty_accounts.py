"""Penalties land on the person, not on the app they use (issue 29, item 5).

A SMART app is one client shared by everyone who signs in to it. The red team's patient sent
bursts of denied requests through the demo app: the app was suspended and every user of it locked
out, while the patient's own account was never touched. Denial bursts (and refused transfers) of a
user-level token now count against the user; the app earns points of its own only when several of
its users misbehave, and an app is never suspended automatically: an operator is asked to.
"""

from __future__ import annotations

from typing import Any

import pytest

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import get_client, register_app_client, register_backend_client
from fhirserver.auth.tokens import issue_token
from fhirserver.consent.alerts import list_alerts
from fhirserver.users.registry import create_user, get_user
from tests.conftest import make_settings
from tests.support.apps import fresh_app

PATIENTS = ["pa", "pb", "pc", "pd"]


@pytest.fixture
def shared(tmp_path: Any):  # type: ignore[no-untyped-def]
    """An app people sign in to, four patients with one Observation each, and the admin's headers."""
    # one burst (2 points) is a suspension: the policy the test needs, not the default
    settings = make_settings(tmp_path, denial_burst_threshold=3, penalty_policy="warn:1,limit:2,suspend:2")
    app = fresh_app(settings)
    svc = app.extensions["fhirserver"]
    http = app.test_client()
    rec, _secret = register_app_client(svc.engine, "shared viewer", "user/*.cruds", ["https://viewer.example/cb"])
    admin = register_backend_client(svc.engine, "loader", "system/*.cruds", jwks=public_jwks(generate_key("ES384")))
    with svc.engine.begin() as conn:
        admin_token, _ = issue_token(conn, admin.client_id, "system/*.cruds", 3600, {})
    for pid in PATIENTS:
        assert http.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid},
                        headers={"Authorization": f"Bearer {admin_token}"}).status_code in (200, 201)
        obs = {"resourceType": "Observation", "id": f"{pid}-o", "status": "final", "code": {"text": "x"},
               "subject": {"reference": f"Patient/{pid}"}}
        assert http.put(f"/fhir/Observation/{pid}-o", json=obs,
                        headers={"Authorization": f"Bearer {admin_token}"}).status_code in (200, 201)
    yield app, svc, http, rec.client_id
    svc.engine.dispose()


def user_headers(svc: Any, client_id: str, pid: str) -> dict[str, str]:
    """A signed-in patient's token for the shared app (as the SMART launch issues it)."""
    create_user(svc.engine, svc.keys, f"user-{pid}", "a long enough passphrase 7", f"Patient/{pid}")
    with svc.engine.begin() as conn:
        token, _ = issue_token(conn, client_id, "user/*.cruds", 3600, {"fhirUser": f"Patient/{pid}"})
    return {"Authorization": f"Bearer {token}"}


def burst(http: Any, headers: dict[str, str], other: str) -> None:
    """Three denied requests within a minute: reads and patches of another patient's Observation."""
    assert http.get(f"/fhir/Observation/{other}-o", headers=headers).status_code == 404
    for _ in range(2):
        r = http.patch(f"/fhir/Observation/{other}-o", json=[{"op": "test", "path": "/status", "value": "final"}],
                       headers={**headers, "Content-Type": "application/json-patch+json"})
        assert r.status_code == 404


def test_one_users_burst_suspends_that_user_and_not_the_app(shared: Any) -> None:
    _app, svc, http, client_id = shared
    alice = user_headers(svc, client_id, "pa")
    doctor = user_headers(svc, client_id, "pc")
    burst(http, alice, "pb")
    assert svc.penalties.level_of("user", "Patient/pa") == "suspend"
    assert get_user(svc.engine, "user-pa").disabled  # type: ignore[union-attr]
    assert http.get("/fhir/Observation/pa-o", headers=alice).status_code == 401  # her tokens revoked
    # the app and everyone else who uses it are untouched
    assert svc.penalties.level_of("client", client_id) == "none"
    assert not get_client(svc.engine, client_id).disabled  # type: ignore[union-attr]
    assert http.get("/fhir/Observation/pc-o", headers=doctor).status_code == 200
    burst_alert = next(a for a in list_alerts(svc.engine, kind="denial-burst", client_id=client_id))
    assert burst_alert.detail["account"] == "Patient/pa" and burst_alert.detail["account_kind"] == "user"


def test_an_app_whose_users_misbehave_is_limited_and_an_operator_asked_to_suspend(shared: Any) -> None:
    _app, svc, http, client_id = shared
    for pid, other in (("pa", "pb"), ("pb", "pc"), ("pc", "pd")):
        burst(http, user_headers(svc, client_id, pid), other)
    # three users' bursts make the app's own points (6 >= suspend), yet a shared app is only limited
    assert svc.penalties.level_of("client", client_id) == "limit"
    assert not get_client(svc.engine, client_id).disabled  # type: ignore[union-attr]
    asked = [a for a in list_alerts(svc.engine, kind="penalty", client_id=client_id) if "operator_needed" in a.detail]
    assert len(asked) == 1 and "fhirserver client disable" in asked[0].detail["operator_needed"]
    # the fourth patient, who did nothing, still uses the app (within the limit's rate)
    assert http.get("/fhir/Observation/pd-o", headers=user_headers(svc, client_id, "pd")).status_code == 200


def test_a_backend_clients_own_burst_still_counts_against_it(tmp_path: Any) -> None:
    """No user behind the token: the client is the account, and may be suspended automatically."""
    settings = make_settings(tmp_path, denial_burst_threshold=3, penalty_policy="warn:1,limit:2,suspend:2")
    app = fresh_app(settings)
    svc = app.extensions["fhirserver"]
    http = app.test_client()
    try:
        key = generate_key("ES384")
        rec = register_backend_client(svc.engine, "noisy", "system/Patient.rs", jwks=public_jwks(key))
        form = token_request_form(key, rec.client_id, settings.token_url, "system/Patient.rs")
        headers = {"Authorization": f"Bearer {http.post('/auth/token', data=form).get_json()['access_token']}"}
        for _ in range(3):
            assert http.get("/fhir/Observation", headers=headers).status_code == 403
        assert svc.penalties.level_of("client", rec.client_id) == "suspend"
        assert get_client(svc.engine, rec.client_id).disabled  # type: ignore[union-attr]
    finally:
        svc.engine.dispose()
