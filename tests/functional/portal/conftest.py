"""The portal's test server: portal on, one patient user (pia) with heart-rate values, and a
signed-in test client (through /auth/authorize like any SMART app)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from fhirserver.users.registry import create_user
from tests.conftest import BackendClient, make_settings
from tests.functional.smart.browser import Browser, redirect_params
from tests.functional.smart.conftest import PASSWORD


@pytest.fixture
def settings(tmp_path: Any, db_url: str):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path, db_url, portal=True, proxy_hops=1)


@pytest.fixture
def patient(http: Any, admin: BackendClient, app: Any) -> str:
    h = admin.headers()
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Portal", "given": ["Pia"]}]},
                    headers=h).get_json()["id"]
    http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Other"}]}, headers=h)
    for value in (70, 74, 71):
        assert http.post("/fhir/Observation", headers=h, json={
            "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "effectiveDateTime": f"2025-0{value - 69}-01", "valueQuantity": {"value": value, "unit": "/min"}}
        ).status_code == 201
    svc = app.extensions["fhirserver"]
    create_user(svc.engine, svc.keys, "pia", PASSWORD, f"Patient/{pid}")
    return str(pid)


def sign_in(http: Any) -> None:
    start = http.get("/portal/login")
    assert start.status_code == 302
    browser = Browser(http)
    page = browser.open(dict(redirect_params(start.headers["Location"])))
    page = browser.login("pia", PASSWORD)
    page = browser.approve()
    assert page.status == 302, page.html
    callback = urlsplit(page.location or "")
    assert callback.path == "/portal/callback"
    done = http.get(f"{callback.path}?{callback.query}")
    assert done.status_code == 302 and done.headers["Location"].endswith("/portal/record"), done.get_data(as_text=True)


def csrf_of(http: Any, path: str = "/portal/record") -> str:
    page = http.get(path).get_data(as_text=True)
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
