"""Interoperability: the reference Python SMART client (`fhirclient` on PyPI) performs a
standalone patient launch against a real HTTP server and reads the patient. Nothing in the
server knows about this client: it discovers the endpoints from the CapabilityStatement, sends
its default scopes plus `launch/patient`, uses PKCE S256 and a public client id."""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from tests.functional.smart.browser import FormParser
from tests.functional.smart.conftest import PASSWORD, seed_live

fhirclient = pytest.importorskip("fhirclient.client")

REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the test reads the redirect itself


def _fields(html: str) -> list[tuple[str, str, str, bool]]:
    parser = FormParser()
    parser.feed(html)
    return parser.fields


def _hidden(html: str) -> list[tuple[str, str]]:
    return [(n, v) for n, t, v, _ in _fields(html) if t == "hidden"]


def test_python_fhirclient_standalone_patient_launch(live: tuple[str, Any]) -> None:
    base, app = live
    pid, username, client_id = seed_live(base, app, "launch/patient user/*.* patient/*.read openid profile fhirUser",
                                         REDIRECT)
    root = base.removesuffix("/fhir")
    smart = fhirclient.FHIRClient(settings={"app_id": client_id, "api_base": base,
                                            "redirect_uri": REDIRECT})
    smart.wants_patient = True
    authorize_url = smart.authorize_url
    assert authorize_url.startswith(f"{root}/auth/authorize?")

    # The user's browser: sign in, approve, follow the redirect back to the app.
    browser = requests.Session()
    page = browser.get(authorize_url, timeout=10)
    assert page.status_code == 200 and 'name="password"' in page.text
    page = browser.post(f"{root}/auth/authorize", data=[*_hidden(page.text), ("username", username),
                                                        ("password", PASSWORD)], timeout=10)
    assert 'name="approve"' in page.text, page.text
    scopes = [v for n, t, v, checked in _fields(page.text) if n == "scope" and checked]
    done = browser.post(f"{root}/auth/authorize", data=[*_hidden(page.text), *[("scope", s) for s in scopes],
                                                        ("approve", "1")], allow_redirects=False, timeout=10)
    assert done.status_code == 302
    callback = urljoin(REDIRECT, done.headers["Location"])

    smart.handle_callback(callback)
    assert smart.ready and smart.patient_id == pid
    patient = smart.patient
    assert patient is not None and patient.id == pid
    assert patient.name[0].family == "Interop"
    # The granted scope was narrowed to what the app was registered for; v1 `user/*.*` works.
    obs = requests.get(f"{base}/Observation?patient={pid}", headers={"Authorization": f"Bearer {smart.server.auth.access_token}"},
                       timeout=10)
    assert obs.status_code == 200 and obs.json()["type"] == "searchset"
