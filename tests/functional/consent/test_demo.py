"""The demo data shows the consent rules: an opt-out patient, a research opt-in, a sensitive HIV
result, a minor with a guardian, and break-the-glass / research / back-office clients."""

from __future__ import annotations

from pathlib import Path

from fhirserver.auth.assertion import load_private_key, token_request_form
from fhirserver.demo import ensure_demo_client, load_demo
from tests.conftest import make_settings
from tests.support.apps import fresh_app


def test_demo_consents(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    app = fresh_app(settings)
    svc = app.extensions["fhirserver"]
    http = app.test_client()
    try:
        assert load_demo(svc) > 0
        key_path = ensure_demo_client(svc)
        key = load_private_key(key_path)

        def headers(client_id: str, **extra: str) -> dict[str, str]:
            resp = http.post("/auth/token", data=token_request_form(key, client_id, settings.token_url, "system/*.rs"))
            assert resp.status_code == 200, resp.get_data(as_text=True)
            return {"Authorization": f"Bearer {resp.get_json()['access_token']}", **extra}

        def total(h: dict[str, str], query: str) -> int:
            return http.get(f"/fhir/{query}", headers=h).get_json()["total"]

        treat = headers("demo-backend")
        assert http.get("/fhir/Patient/demo-dev", headers=treat).status_code == 200  # treatment: permitted
        assert total(treat, "Patient") == 4 and total(treat, "Observation") == 80
        assert total(treat, "Observation?subject=Patient/demo-alice") == 20  # the HIV result is hidden
        assert total(treat, "Observation?code=http://loinc.org|7918-6") == 0
        research = headers("demo-research")
        assert total(research, "Patient") == 1 and total(research, "Observation?subject=Patient/demo-bob") == 20
        other_org = headers("demo-break-glass")
        assert http.get("/fhir/Patient/demo-dev", headers=other_org).status_code == 404  # opted out of demo-ed
        glass = headers("demo-break-glass", **{"X-Purpose-Of-Use": "ETREAT", "X-Break-Glass-Reason": "demo"})
        assert http.get("/fhir/Patient/demo-dev", headers=glass).status_code == 200
        office = headers("demo-consent-office")
        assert total(office, "Observation?code=http://loinc.org|7918-6") == 1
    finally:
        svc.engine.dispose()
