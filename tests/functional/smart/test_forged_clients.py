"""Refused client authentications at the OAuth endpoints raise alerts (issue 29, operations): the
red team sent 40 requests to /auth/revoke and /auth/introspect claiming another client's id and
nothing noticed. Each refusal is counted under the claimed id and under the caller's address;
a burst is one `auth-failure-burst` alert per counter and minute. The claimed client may be the
victim of the forgery: the alert names it, the audit record does not make it the actor, and its
penalty stays untouched."""

from __future__ import annotations

from typing import Any

from fhirserver.consent.alerts import list_alerts
from tests.conftest import AUDITOR_SETTINGS


def test_forged_client_ids_at_revoke_and_introspect_raise_one_alert_per_counter(
        http: Any, make_client: Any, app: Any, settings: Any) -> None:
    svc = app.extensions["fhirserver"]
    victim = make_client("system/Patient.rs")
    statuses = set()
    for i in range(40):
        path = "/auth/revoke" if i % 2 else "/auth/introspect"
        resp = http.post(path, data={"token": "x" * 40, "client_id": victim.client_id,
                                     "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                                     "client_assertion": "forged.assertion.value"})
        statuses.add((resp.status_code, resp.get_json()["error"]))
    assert statuses == {(401, "invalid_client")} or {s[1] for s in statuses} == {"invalid_client"}, statuses
    alerts = list_alerts(svc.engine, kind="auth-failure-burst")
    assert sorted(a.detail["counted_by"] for a in alerts) == ["auth-address", "auth-client"]
    by_client = next(a for a in alerts if a.detail["counted_by"] == "auth-client")
    assert by_client.detail["claimed_client"] == victim.client_id and by_client.detail["claimed_client_registered"]
    assert by_client.client_id == victim.client_id and by_client.detail["failures"] == settings.denial_burst_threshold
    # the victim is named, not blamed: no penalty, and its own tokens still work
    assert svc.penalties.level_of("client", victim.client_id) == "none"
    assert http.get("/fhir/Patient", headers=victim.headers("system/Patient.rs")).status_code == 200
    # the audit records of the refusals name no client as the one who acted
    auditor = make_client("system/AuditEvent.rs", settings=AUDITOR_SETTINGS, default_scope="system/AuditEvent.rs")
    events = http.get("/fhir/AuditEvent?outcome=4&_count=100", headers=auditor.headers()).get_json()
    refused = [e["resource"] for e in events.get("entry", []) if "not authenticated" in e["resource"].get("outcomeDesc", "")]
    assert len(refused) >= 40
    for event in refused:
        assert not any(victim.client_id in str(a.get("who", {})) for a in event.get("agent", []))


def test_unknown_client_ids_are_counted_by_address(http: Any, app: Any) -> None:
    svc = app.extensions["fhirserver"]
    for i in range(25):
        http.post("/auth/revoke", data={"token": "x", "client_id": f"nobody-{i}", "client_secret": "guess"})
    alerts = list_alerts(svc.engine, kind="auth-failure-burst")
    assert [a.detail["counted_by"] for a in alerts] == ["auth-address"]
    assert alerts[0].client_id is None and alerts[0].detail["claimed_client_registered"] is False
