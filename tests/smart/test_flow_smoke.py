from __future__ import annotations

from tests.smart.conftest import Smart


def test_public_app_patient_standalone(smart: Smart) -> None:
    pid = smart.patient()
    user, _ = smart.user(f"Patient/{pid}")
    client_id, _ = smart.app_client()
    tok = smart.tokens(client_id, "openid fhirUser launch/patient patient/*.rs offline_access", user)
    assert tok["patient"] == pid
    assert "id_token" in tok and "refresh_token" in tok
    resp = smart.get(f"/fhir/Patient/{pid}", tok["access_token"])
    assert resp.status_code == 200, resp.get_data(as_text=True)
