from __future__ import annotations

from tests.functional.smart.conftest import Smart


def test_public_app_patient_standalone(smart: Smart) -> None:
    pid = smart.patient()
    user, _ = smart.user(f"Patient/{pid}")
    client_id, _ = smart.app_client()
    tok = smart.tokens(client_id, "openid fhirUser launch/patient patient/*.rs offline_access", user)
    assert tok["patient"] == pid
    assert "id_token" in tok and "refresh_token" in tok
    resp = smart.get(f"/fhir/Patient/{pid}", tok["access_token"])
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_behind_a_tls_proxy_the_forwarded_scheme_is_trusted_only_when_configured(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """OAuth refuses plain http except on loopback; behind a TLS-terminating proxy (proxy_hops)
    the forwarded https scheme is what counts, and without the setting it is ignored."""
    from dataclasses import replace

    from fhirserver.app import create_app
    from tests.conftest import make_settings

    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "fhir.example.org"}
    form = {"grant_type": "client_credentials", "client_id": "nobody"}
    for hops, expected in ((0, "insecure_transport"), (1, "invalid_client")):
        app = create_app(replace(make_settings(tmp_path / str(hops)), proxy_hops=hops))
        client = app.test_client()
        resp = client.post("/auth/token", data=form, headers=headers, base_url="http://10.0.0.5")
        assert resp.get_json()["error"] == expected, resp.get_json()
        app.extensions["fhirserver"].engine.dispose()


def test_guardian_user_scope_reaches_linked_children_only(smart: Smart) -> None:
    """A RelatedPerson user (guardian) with `user/` scopes reads the patients linked to them and
    nobody else; searches show only their records."""
    child1, child2, stranger = smart.patient("ChildOne"), smart.patient("ChildTwo"), smart.patient("Stranger")
    for pid in (child1, child2, stranger):
        smart.observation(pid)
    user, _ = smart.user("RelatedPerson/parent-1", links=((child1, "guardian"), (child2, "guardian")))
    client_id, _ = smart.app_client()
    tok = smart.tokens(client_id, "openid fhirUser user/*.rs", user)
    assert "patient" not in tok
    access = tok["access_token"]
    assert smart.get(f"/fhir/Patient/{child1}", access).status_code == 200
    assert smart.get(f"/fhir/Patient/{child2}", access).status_code == 200
    assert smart.get(f"/fhir/Patient/{stranger}", access).status_code == 404
    bundle = smart.get("/fhir/Observation", access).get_json()
    subjects = {e["resource"]["subject"]["reference"] for e in bundle["entry"]}
    assert subjects == {f"Patient/{child1}", f"Patient/{child2}"} and bundle["total"] == 2
