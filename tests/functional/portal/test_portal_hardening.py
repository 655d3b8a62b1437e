"""The portal's forms against the red team's inputs (issue 29, items 6-9): a correction never erases
what the form leaves empty or does not show; two-step sign-in is bound to the secret the server
issued, a replacement needs the current factor, and a confirmation code works once; malformed
entries are a 400 page, never a 502; sharing keys are the choices the page offered."""

from __future__ import annotations

import time
from typing import Any

import pyotp
import pytest

from fhirserver.auth.tokens import issue_token
from fhirserver.portal import CLIENT_ID
from fhirserver.users.registry import get_user
from tests.conftest import BackendClient

from .conftest import csrf_of, sign_in

RICH = {"name": [{"use": "official", "text": "Pia Portal", "family": "Portal", "given": ["Pia"], "prefix": ["Dr"]},
                 {"use": "maiden", "family": "Berg"}],
        "telecom": [{"system": "phone", "value": "+47 1111", "use": "home"},
                    {"system": "phone", "value": "+47 2222", "use": "mobile"},
                    {"system": "email", "value": "pia@example.org"}],
        "address": [{"use": "home", "line": ["Elm Road 1", "Flat 3"], "city": "Oslo", "district": "Frogner",
                     "postalCode": "0150", "country": "NO"}],
        "gender": "female", "birthDate": "1970-02-03"}


def rich_patient(http: Any, admin: BackendClient, pid: str) -> dict[str, Any]:
    body = {"resourceType": "Patient", "id": pid, **RICH}
    assert http.put(f"/fhir/Patient/{pid}", json=body, headers=admin.headers()).status_code == 200
    return dict(http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json())


def stored(http: Any, admin: BackendClient, pid: str) -> dict[str, Any]:
    return dict(http.get(f"/fhir/Patient/{pid}", headers=admin.headers()).get_json())


# ------------------------------------------------------------------ item 6: corrections
def test_an_empty_correction_changes_nothing(http: Any, patient: str, admin: BackendClient) -> None:
    before = rich_patient(http, admin, patient)
    sign_in(http)
    csrf = csrf_of(http, "/portal/corrections")
    assert http.post("/portal/corrections/details", data={"csrf": csrf}).status_code == 302
    # the form sent back exactly as shown is no change either
    page = http.get("/portal/corrections").get_data(as_text=True)
    shown = {k: page.split(f'name="{k}" value="', 1)[1].split('"', 1)[0]
             for k in ("given", "family", "phone", "line", "city", "postal")}
    assert http.post("/portal/corrections/details", data={"csrf": csrf, **shown}).status_code == 302
    after = stored(http, admin, patient)
    assert after == before  # not even a new version


def test_a_correction_changes_only_what_it_names(http: Any, patient: str, admin: BackendClient) -> None:
    rich_patient(http, admin, patient)
    sign_in(http)
    csrf = csrf_of(http, "/portal/corrections")
    resp = http.post("/portal/corrections/details", data={"csrf": csrf, "city": "Bergen", "family": "Portal-Berg"})
    assert resp.status_code == 302
    after = stored(http, admin, patient)
    assert after["meta"]["versionId"] == "3"
    assert after["name"][0] == {"use": "official", "text": "Pia Portal-Berg", "family": "Portal-Berg",
                                "given": ["Pia"], "prefix": ["Dr"]}
    assert after["name"][1] == RICH["name"][1]
    assert after["telecom"] == RICH["telecom"]  # both phones and the email stay
    assert after["address"] == [{**RICH["address"][0], "city": "Bergen"}]  # two lines, district, country kept
    assert (after["gender"], after["birthDate"]) == ("female", "1970-02-03")
    resp = http.post("/portal/corrections/details", data={"csrf": csrf, "phone": "+47 3333"})
    assert [t["value"] for t in stored(http, admin, patient)["telecom"]] == ["+47 3333", "+47 2222", "pia@example.org"]


# ------------------------------------------------------------------ item 7: two-step sign-in
def account(http: Any, app: Any, patient: str) -> dict[str, str]:
    """The portal's own user token (an account-manager client), as its sign-in issues it."""
    svc = app.extensions["fhirserver"]
    with svc.engine.begin() as conn:
        token, _ = issue_token(conn, CLIENT_ID, "openid fhirUser", 600, {"fhirUser": f"Patient/{patient}"})
    return {"Authorization": f"Bearer {token}"}


def code(secret: str, steps_ahead: int = 0) -> str:
    return str(pyotp.TOTP(secret).at(time.time() + 30 * steps_ahead))


def test_enrolment_keeps_only_the_secret_the_server_issued(http: Any, patient: str, app: Any) -> None:
    h = account(http, app, patient)
    chosen = pyotp.random_base32()
    forged = http.post("/auth/account/totp/confirm", json={"secret": chosen, "code": code(chosen)}, headers=h)
    assert forged.status_code == 400 and not get_user(app.extensions["fhirserver"].engine, "pia").totp  # type: ignore[union-attr]
    issued = http.post("/auth/account/totp", headers=h).get_json()["secret"]
    # a secret of the client's choosing is ignored even while one is pending: its code does not match
    assert http.post("/auth/account/totp/confirm", json={"secret": chosen, "code": code(chosen)},
                     headers=h).status_code == 400
    first = code(issued)
    assert http.post("/auth/account/totp/confirm", json={"code": first}, headers=h).status_code == 200
    assert get_user(app.extensions["fhirserver"].engine, "pia").totp  # type: ignore[union-attr]
    # the same confirmation once more: nothing is pending any more
    again = http.post("/auth/account/totp/confirm", json={"code": first}, headers=h)
    assert again.status_code == 400 and "start again" in again.get_json()["error_description"]


def test_replacing_the_second_factor_needs_it(http: Any, patient: str, app: Any) -> None:
    h = account(http, app, patient)
    issued = http.post("/auth/account/totp", headers=h).get_json()["secret"]
    assert http.post("/auth/account/totp/confirm", json={"code": code(issued)}, headers=h).status_code == 200
    # a hijacked session cannot swap the authenticator: no code, a wrong one, or the used one
    for current in ("", "000000", code(issued)):
        resp = http.post("/auth/account/totp", json={"current_code": current}, headers=h)
        assert resp.status_code == 400, current
        assert "secret" not in resp.get_json()
    fresh = code(issued, steps_ahead=1)  # the next step: not used yet
    replaced = http.post("/auth/account/totp", json={"current_code": fresh}, headers=h)
    assert replaced.status_code == 200 and replaced.get_json()["secret"] != issued
    # that code is used up: it cannot start another replacement
    assert http.post("/auth/account/totp", json={"current_code": fresh}, headers=h).status_code == 400


def test_the_portal_page_asks_for_the_current_code(http: Any, patient: str, app: Any) -> None:
    sign_in(http)  # before two-step sign-in is on (the test browser signs in with a password only)
    h = account(http, app, patient)
    issued = http.post("/auth/account/totp", headers=h).get_json()["secret"]
    assert http.post("/auth/account/totp/confirm", json={"code": code(issued)}, headers=h).status_code == 200
    csrf = csrf_of(http, "/portal/security")
    page = http.post("/portal/security/totp", data={"csrf": csrf, "current_code": "123456"}).get_data(as_text=True)
    assert 'id="error"' in page and "needed to replace it" in page and "totp-secret" not in page
    page = http.post("/portal/security/totp", data={"csrf": csrf, "current_code": code(issued, 1)}).get_data(as_text=True)
    assert "totp-secret" in page and 'name="secret"' not in page  # the key is shown, never posted back


# ------------------------------------------------------------------ items 8 and 9: bad input
@pytest.mark.parametrize("suffix", ["/_history/1", "?_elements=id", "/../Patient", "/$everything"])
def test_a_malformed_entry_is_a_400_page(http: Any, patient: str, admin: BackendClient, suffix: str) -> None:
    sign_in(http)
    csrf = csrf_of(http, "/portal/corrections")
    obs = http.get(f"/fhir/Observation?patient={patient}", headers=admin.headers()).get_json()["entry"][0]["resource"]
    resp = http.post("/portal/corrections/flag", data={"csrf": csrf, "entry": f"Observation/{obs['id']}{suffix}",
                                                       "note": "wrong"})
    assert resp.status_code == 400
    assert "note" not in http.get(f"/fhir/Observation/{obs['id']}", headers=admin.headers()).get_json()


def test_an_entry_of_someone_else_is_a_404(http: Any, patient: str, admin: BackendClient) -> None:
    other = http.post("/fhir/Observation", headers=admin.headers(), json={
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/someone-else"}}).get_json()["id"]
    sign_in(http)
    csrf = csrf_of(http, "/portal/corrections")
    assert http.post("/portal/corrections/flag", data={"csrf": csrf, "entry": f"Observation/{other}",
                                                       "note": "x"}).status_code == 404


@pytest.mark.parametrize("key", ["org-'<x>", "org-unknown-org", "purpose-NOPE", "label-XYZ"])
def test_sharing_keys_are_the_offered_choices(http: Any, patient: str, admin: BackendClient, key: str) -> None:
    sign_in(http)
    csrf = csrf_of(http, "/portal/sharing")
    resp = http.post("/portal/sharing/save", data={"csrf": csrf, "key": ["purpose-HRESCH", key],
                                                   "purpose-HRESCH-allowed": "allow", f"{key}-allowed": "deny"})
    assert resp.status_code == 400
    consents = http.get(f"/fhir/Consent?patient={patient}", headers=admin.headers()).get_json()
    assert consents["total"] == 0  # not even the valid choice sent with it


# ------------------------------------------------------------------ the PDF in Chinese (operations)
def test_the_chinese_health_summary_pdf_carries_its_headings(http: Any, patient: str) -> None:
    """With Pango and a CJK font (scripts/ensure_pango.sh, the Dockerfile), a zh-CN summary prints
    its Chinese headings: read back from the PDF's text, not empty boxes."""
    from io import BytesIO

    from pypdf import PdfReader

    sign_in(http)
    assert http.get("/portal/summary?lang=zh-CN").status_code == 200  # the choice is kept for the session
    pdf = http.get("/portal/summary.pdf")
    assert pdf.status_code == 200, pdf.get_data(as_text=True)[:500]
    text = "".join(p.extract_text() for p in PdfReader(BytesIO(pdf.get_data())).pages)
    for heading in ("健康摘要", "患者", "姓名", "出生日期", "趋势"):
        assert heading in text, (heading, text[:400])
    assert "Pia Portal" in text
