"""The portal without a browser (Flask test client): it signs in through /auth/authorize like
any SMART app, every data access goes through the audited FHIR API as the portal's client, every
form needs the CSRF token, the session cookie is Secure behind TLS, pages need a sign-in, and
signing out revokes the token."""

from __future__ import annotations

from typing import Any

from tests.conftest import BackendClient
from tests.functional.smart.conftest import PASSWORD

from .conftest import sign_in


def test_pages_need_a_sign_in(http: Any, patient: str) -> None:
    for path in ("/portal/record", "/portal/access", "/portal/sharing", "/portal/download",
                 "/portal/download/record.json"):
        resp = http.get(path)
        assert resp.status_code == 302 and resp.headers["Location"].endswith("/portal/"), path


def test_signed_in_pages_use_the_audited_api_and_show_only_the_patient(http: Any, patient: str, app: Any,
                                                                       make_client: Any) -> None:
    sign_in(http)
    record = http.get("/portal/record")
    html = record.get_data(as_text=True)
    assert record.status_code == 200 and "Pia Portal" in html and "Other" not in html
    assert "<polyline" in html and "3 values" in html  # the heart-rate trend
    assert "script" not in html.lower()  # no script at all: the CSP needs no exception
    assert "unsafe-inline" not in record.headers["Content-Security-Policy"]
    auditor = make_client("system/AuditEvent.rs", default_scope="system/AuditEvent.rs",
                          settings={"auditor": True, "purposes": ["HOPERAT"]})
    events = http.get("/fhir/AuditEvent?agent=Device/fhirserver-portal&_count=50", headers=auditor.headers()).get_json()
    subtypes = {e["resource"]["subtype"][0]["code"] for e in events.get("entry", [])}
    assert "$everything" in subtypes or "operation" in subtypes, subtypes  # it read through the FHIR API


def test_the_sign_in_session_carries_no_authority_to_the_fhir_api(http: Any, patient: str) -> None:
    """The FHIR API authenticates by bearer token alone: a signed-in browser's session cookie,
    sent along to /fhir (as a cross-site page can make it be sent), is neither honoured nor
    touched, and the portal session goes on working afterwards."""
    sign_in(http)
    assert http.get("/portal/record").status_code == 200
    for method, path in (("GET", f"/fhir/Patient/{patient}"), ("GET", "/fhir/Observation"),
                         ("POST", "/fhir/Observation"), ("DELETE", f"/fhir/Patient/{patient}")):
        resp = http.open(path, method=method, json={"resourceType": "Observation"} if method == "POST" else None)
        assert resp.status_code == 401, (method, path, resp.status_code)
        assert resp.get_json()["resourceType"] == "OperationOutcome"
        assert "Set-Cookie" not in resp.headers, (method, path)
    record = http.get("/portal/record")
    assert record.status_code == 200 and "Pia Portal" in record.get_data(as_text=True)


def test_every_form_needs_the_csrf_token(http: Any, patient: str, app: Any) -> None:
    sign_in(http)
    posts = sorted(r.rule for r in app.url_map.iter_rules() if r.rule.startswith("/portal/") and "POST" in r.methods)
    assert len(posts) >= 12, posts  # every state-changing form of the portal
    for path in posts:
        for token in (None, "forged"):
            resp = http.post(path, data={"key": "purpose-HRESCH", "patient": patient, "understood": "yes",
                                         **({"csrf": token} if token else {})})
            assert resp.status_code == 400 and "CSRF" in resp.get_data(as_text=True), (path, token)
    assert http.get("/portal/record").status_code == 200  # still signed in: nothing was changed
    # the switcher accepts only the user's own patients: another id is a 404, as in the API
    page = http.get("/portal/record").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert http.post("/portal/switch", data={"csrf": csrf, "patient": "someone-else"}).status_code == 404
    assert "Pia Portal" in http.get("/portal/record").get_data(as_text=True)


def test_sharing_writes_consents_through_the_api_and_withdrawal_is_one_post(http: Any, patient: str,
                                                                            admin: BackendClient) -> None:
    sign_in(http)
    page = http.get("/portal/sharing").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    review = http.post("/portal/sharing", data={"csrf": csrf, "purpose-HRESCH": "allow", "purpose-HRESCH-until": "2030-01-01"})
    assert "Researchers (only de-identified data) will receive your data until 2030-01-01." in review.get_data(as_text=True)
    saved = http.post("/portal/sharing/save", data={"csrf": csrf, "key": "purpose-HRESCH",
                                                    "purpose-HRESCH-allowed": "allow", "purpose-HRESCH-until": "2030-01-01"})
    assert saved.status_code == 302
    consents = http.get(f"/fhir/Consent?patient={patient}", headers=admin.headers()).get_json()["entry"]
    body = consents[0]["resource"]
    assert body["status"] == "active" and body["provision"]["type"] == "permit"
    assert body["provision"]["purpose"][0]["code"] == "HRESCH" and body["provision"]["period"]["end"] == "2030-01-01"
    assert http.post("/portal/sharing/withdraw", data={"csrf": csrf, "key": "purpose-HRESCH"}).status_code == 302
    again = http.get(f"/fhir/Consent/{body['id']}", headers=admin.headers()).get_json()
    assert again["status"] == "inactive"


def test_the_session_cookie_is_secure_behind_tls_and_sign_out_revokes(http: Any, patient: str) -> None:
    resp = http.get("/portal/login", headers={"X-Forwarded-Proto": "https"})
    cookie = resp.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    plain = http.get("/portal/login").headers["Set-Cookie"]
    assert "Secure" not in plain and "HttpOnly" in plain
    sign_in(http)
    saved = {c.key: c.value for c in http._cookies.values()}  # noqa: SLF001 - the browser's copy of the cookie
    page = http.get("/portal/record").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert http.post("/portal/logout", data={"csrf": csrf}).status_code == 302
    for name, value in saved.items():  # replay the cookie from before signing out: the token is dead
        http.set_cookie(name, value)
    stale = http.get("/portal/record")
    assert stale.status_code == 302 and "sign-in has ended" in stale.headers["Location"].replace("+", " ")


def test_the_health_summary_prints_and_downloads_as_pdf(http: Any, patient: str) -> None:
    from io import BytesIO

    from pypdf import PdfReader

    sign_in(http)
    page = http.get("/portal/summary")
    assert page.status_code == 200 and "Pia Portal" in page.get_data(as_text=True)
    pdf = http.get("/portal/summary.pdf")
    assert pdf.status_code == 200, pdf.get_data(as_text=True)[:2000]
    assert pdf.mimetype == "application/pdf" and "attachment" in pdf.headers["Content-Disposition"]
    text = "".join(p.extract_text() for p in PdfReader(BytesIO(pdf.get_data())).pages)
    assert "Pia Portal" in text and "Heart rate" in text and "Other" not in text


def test_corrections_go_through_the_api_as_amendments(http: Any, patient: str, admin: BackendClient) -> None:
    sign_in(http)
    page = http.get("/portal/corrections").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert 'value="Pia"' in page and "Heart rate" in page
    saved = http.post("/portal/corrections/details", data={"csrf": csrf, "given": "Pia Maria", "family": "Portal",
                                                           "phone": "+1 555 0100", "line": "1 Elm Road", "city": "Oslo",
                                                           "postal": "0150"})
    assert saved.status_code == 302, saved.get_data(as_text=True)
    body = http.get(f"/fhir/Patient/{patient}", headers=admin.headers()).get_json()
    assert body["name"][0]["given"] == ["Pia", "Maria"] and body["address"][0]["city"] == "Oslo"
    assert body["telecom"][0]["value"] == "+1 555 0100" and body["meta"]["versionId"] == "2"
    obs = http.get(f"/fhir/Observation?patient={patient}", headers=admin.headers()).get_json()["entry"][0]["resource"]
    flagged = http.post("/portal/corrections/flag", data={"csrf": csrf, "entry": f"Observation/{obs['id']}",
                                                          "note": "I was not there that day"})
    assert flagged.status_code == 302
    after = http.get(f"/fhir/Observation/{obs['id']}", headers=admin.headers()).get_json()
    assert after["note"][-1]["text"] == "Patient reports: I was not there that day"
    assert any(t.get("code") == "patient-amended" for t in after["meta"].get("tag", []))  # for the care team
    # an entry that is not the user's: 404 from the API, nothing changed
    other = http.post("/fhir/Observation", headers=admin.headers(), json={
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/someone-else"}}).get_json()["id"]
    refused = http.post("/portal/corrections/flag", data={"csrf": csrf, "entry": f"Observation/{other}", "note": "x"})
    assert refused.status_code in (404, 502)
    assert "note" not in http.get(f"/fhir/Observation/{other}", headers=admin.headers()).get_json()


def test_the_account_api_serves_only_the_portal_and_changes_are_audited(http: Any, patient: str, app: Any,
                                                                        make_client: Any) -> None:
    from fhirserver.auth.tokens import issue_token
    from fhirserver.users.registry import get_user

    svc = app.extensions["fhirserver"]
    # an ordinary app the user approved may read their data, never change how they sign in
    other_app = make_client("user/*.rs", default_scope="user/*.rs")
    with svc.engine.begin() as conn:
        token, _exp = issue_token(conn, other_app.client_id, "user/*.rs", 600, {"fhirUser": f"Patient/{patient}"})
    for method, path in (("GET", ""), ("POST", "/totp"), ("POST", "/password")):
        resp = http.open(f"/auth/account{path}", method=method, json={"current": PASSWORD, "new": "x" * 20},
                         headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 403, (path, resp.get_data(as_text=True))
    assert http.get("/auth/account").status_code == 403  # no token at all
    sign_in(http)
    page = http.get("/portal/security").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert "Patient privacy portal" in page and "Off" in page
    wrong = http.post("/portal/security/password", data={"csrf": csrf, "current": "not it", "new": "x" * 20})
    assert "current password is not right" in wrong.get_data(as_text=True)
    weak = http.post("/portal/security/password", data={"csrf": csrf, "current": PASSWORD, "new": "password1234"})
    assert "too weak" in weak.get_data(as_text=True) or "at least" in weak.get_data(as_text=True)
    new = "cobalt-meadow-quartz-51 river"
    changed = http.post("/portal/security/password", data={"csrf": csrf, "current": PASSWORD, "new": new})
    assert changed.status_code == 302
    from fhirserver.users.login import verify_login

    assert get_user(svc.engine, "pia") is not None
    assert verify_login(svc.engine, "pia", new).ok and not verify_login(svc.engine, "pia", PASSWORD).ok
    # the portal's own authorization is listed; revoking it ends the session
    family = page.split('name="id" value="', 1)[1].split('"', 1)[0]
    assert http.post("/portal/security/revoke", data={"csrf": csrf, "id": "not-mine"}).status_code == 404
    assert http.post("/portal/security/revoke", data={"csrf": csrf, "id": family}).status_code == 302
    assert http.get("/portal/record").status_code == 302
    auditor = make_client("system/AuditEvent.rs", default_scope="system/AuditEvent.rs",
                          settings={"auditor": True, "purposes": ["HOPERAT"]})
    events = http.get("/fhir/AuditEvent?subtype=password-change,authorization-revoke&_count=20",
                      headers=auditor.headers()).get_json()
    outcomes = sorted((e["resource"]["subtype"][0]["code"], e["resource"]["outcome"]) for e in events["entry"])
    assert outcomes == [("authorization-revoke", "0"), ("password-change", "0"), ("password-change", "4"),
                        ("password-change", "4")]


def test_an_erasure_request_is_filed_decided_by_an_administrator_and_seen(http: Any, patient: str, app: Any,
                                                                          settings: Any, admin: BackendClient) -> None:
    import json as _json

    from click.testing import CliRunner

    from fhirserver.cli import main
    from tests.functional.exchange.test_load import cli_env

    # only the patient (or a linked user) may ask; an administrator's client is refused
    assert http.post(f"/fhir/Patient/{patient}/$erasure-request", json={"resourceType": "Parameters"},
                     headers=admin.headers()).status_code == 403
    sign_in(http)
    page = http.get("/portal/erasure").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert "No requests." in page
    assert http.post("/portal/erasure", data={"csrf": csrf, "reason": "moving away"}).status_code == 400  # unconfirmed
    assert http.post("/portal/erasure", data={"csrf": csrf, "reason": "moving away", "understood": "yes"}).status_code == 302
    assert "pending" in http.get("/portal/erasure").get_data(as_text=True)
    assert http.post("/portal/erasure", data={"csrf": csrf, "understood": "yes"}).status_code == 409  # one at a time
    env = cli_env(settings)
    listed = CliRunner().invoke(main, ["erasure", "list", "--status", "pending", "--json"], env=env)
    rows = _json.loads(listed.stdout)
    assert [r["patient"] for r in rows] == [patient] and rows[0]["reason"] == "moving away"
    refused = CliRunner().invoke(main, ["erasure", "refuse", rows[0]["id"], "--note", "kept 10 years by law"], env=env)
    assert refused.exit_code == 0, refused.output
    page = http.get("/portal/erasure").get_data(as_text=True)
    assert "refused" in page and "kept 10 years by law" in page
    # asked again, approved: the patient is erased (the portal session ends with them)
    assert http.post("/portal/erasure", data={"csrf": csrf, "understood": "yes"}).status_code == 302
    pending = _json.loads(CliRunner().invoke(main, ["erasure", "list", "--status", "pending", "--json"], env=env).stdout)
    approved = CliRunner().invoke(main, ["erasure", "approve", pending[0]["id"]], env=env)
    assert approved.exit_code == 0 and "approved" in approved.stdout and "erased" in approved.stdout
    assert http.get(f"/fhir/Patient/{patient}", headers=admin.headers()).status_code == 410
    again = CliRunner().invoke(main, ["erasure", "approve", pending[0]["id"]], env=env)
    assert again.exit_code == 1 and "approved already" in again.output
    everything = _json.loads(CliRunner().invoke(main, ["erasure", "list", "--json"], env=env).stdout)
    assert all(r["patient"] != patient for r in everything)  # renamed to the pseudonym


def test_ndjson_download_through_the_patient_level_export(http: Any, patient: str) -> None:
    import json as _json
    import time

    sign_in(http)
    page = http.get("/portal/download").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert http.post("/portal/download/ndjson", data={"csrf": csrf}).status_code == 302
    deadline = time.monotonic() + 30
    while 'id="export-files"' not in page:
        assert time.monotonic() < deadline, page
        time.sleep(0.2)
        page = http.get("/portal/download").get_data(as_text=True)
    links = [p.split('"', 1)[0] for p in page.split('href="/portal/download/ndjson/')[1:]]
    assert links
    seen = set()
    for n in links:
        resp = http.get(f"/portal/download/ndjson/{n}")
        assert resp.status_code == 200 and resp.mimetype == "application/fhir+ndjson"
        for line in resp.get_data(as_text=True).splitlines():
            res = _json.loads(line)
            seen.add(res["resourceType"])
            assert res["id"] == patient if res["resourceType"] == "Patient" else \
                res["subject"]["reference"] == f"Patient/{patient}"
    assert {"Patient", "Observation"} <= seen
    assert http.get("/portal/download/ndjson/99").status_code == 404


def test_blocking_an_organization_stops_its_clients_and_unblocking_restores(http: Any, patient: str,
                                                                            admin: BackendClient,
                                                                            make_client: Any) -> None:
    org = http.post("/fhir/Organization", json={"resourceType": "Organization", "name": "Acme Clinic"},
                    headers=admin.headers()).get_json()["id"]
    acme = make_client("system/Patient.rs", default_scope="system/Patient.rs", organization=f"Organization/{org}")
    # the organization is named in her record (it performed a test): the portal offers to block it
    assert http.post("/fhir/Observation", headers=admin.headers(), json={
        "resourceType": "Observation", "status": "final", "code": {"text": "lipids"},
        "subject": {"reference": f"Patient/{patient}"},
        "performer": [{"reference": f"Organization/{org}", "display": "Acme Clinic"}]}).status_code == 201
    assert http.get(f"/fhir/Patient/{patient}", headers=acme.headers()).status_code == 200
    sign_in(http)
    page = http.get("/portal/sharing").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert "Acme Clinic" in page
    review = http.post("/portal/sharing", data={"csrf": csrf, "block": f"Organization/{org}"}).get_data(as_text=True)
    assert "Acme Clinic will no longer receive your data." in review
    assert http.post("/portal/sharing", data={"csrf": csrf, "block": "Organization/nope"}).status_code == 404
    saved = http.post("/portal/sharing/save", data={"csrf": csrf, "key": f"org-{org}", f"org-{org}-allowed": "deny"})
    assert saved.status_code == 302
    assert http.get(f"/fhir/Patient/{patient}", headers=acme.headers()).status_code == 404  # its next request
    assert http.get(f"/fhir/Patient/{patient}", headers=admin.headers()).status_code == 200  # others unaffected
    page = http.get("/portal/sharing").get_data(as_text=True)
    assert "Blocked: Acme Clinic" in page
    assert http.post("/portal/sharing/withdraw", data={"csrf": csrf, "key": f"org-{org}"}).status_code == 302
    assert http.get(f"/fhir/Patient/{patient}", headers=acme.headers()).status_code == 200
