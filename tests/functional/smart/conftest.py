"""Fixtures for SMART App Launch tests: patients created over the FHIR API, users and apps
registered through the same functions the CLI uses, and a helper that runs the whole browser
flow (authorize -> login -> [TOTP] -> approve -> code -> token)."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyotp
import pytest
from werkzeug.serving import make_server

from fhirserver.auth.clients import register_app_client
from fhirserver.users.registry import create_user, link_patient
from tests.conftest import BASE, make_settings
from tests.functional.smart.browser import Browser, Page, pkce_pair, redirect_params
from tests.support.apps import fresh_app

PASSWORD = "violet-harbor-lantern-92"
REDIRECT = "https://app.example.org/callback"
APP_SCOPES = ("openid fhirUser profile launch launch/patient offline_access online_access "
              "patient/*.cruds user/*.cruds patient/*.read patient/*.write user/*.read user/*.write")
_n = itertools.count()


@dataclass
class Flow:
    """The outcome of one authorization request."""

    page: Page
    verifier: str
    state: str
    code: str | None = None
    error: str | None = None


class Smart:
    def __init__(self, app: Any, http: Any, admin: Any) -> None:
        self.app = app
        self.http = http
        self.admin = admin
        self.svc = app.extensions["fhirserver"]

    # -- data
    def patient(self, family: str = "Doe", **extra: Any) -> str:
        body = {"resourceType": "Patient", "name": [{"family": family, "given": ["Pat"]}], **extra}
        resp = self.http.post("/fhir/Patient", json=body, headers=self.admin.headers())
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return resp.get_json()["id"]

    def observation(self, patient: str, code: str = "8867-4", category: str = "vital-signs") -> str:
        body = {"resourceType": "Observation", "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": category}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": f"Patient/{patient}"}, "valueQuantity": {"value": 70, "unit": "/min"}}
        resp = self.http.post("/fhir/Observation", json=body, headers=self.admin.headers())
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return resp.get_json()["id"]

    def user(self, fhir_user: str, totp: bool = False, links: tuple[tuple[str, str], ...] = ()) -> tuple[str, str | None]:
        name = f"user{next(_n)}"
        _rec, secret = create_user(self.svc.engine, self.svc.keys, name, PASSWORD, fhir_user, totp=totp)
        for patient, rel in links:
            link_patient(self.svc.engine, name, f"Patient/{patient}", rel)
        return name, secret

    def app_client(self, scopes: str = APP_SCOPES, method: str = "none", **kw: Any) -> tuple[str, str | None]:
        rec, secret = register_app_client(self.svc.engine, f"App {next(_n)}", scopes, [REDIRECT], method, **kw)
        return rec.client_id, secret

    # -- flow
    def authorize_params(self, client_id: str, scope: str, challenge: str, state: str, **extra: str) -> dict[str, str]:
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": scope,
                  "state": state, "aud": BASE, "code_challenge": challenge, "code_challenge_method": "S256"}
        params.update(extra)
        return {k: v for k, v in params.items() if v is not None}

    def start(self, client_id: str, scope: str, **extra: str) -> tuple[Browser, Flow]:
        verifier, challenge = pkce_pair()
        state = f"s{next(_n)}"
        browser = Browser(self.http)
        page = browser.open(self.authorize_params(client_id, scope, challenge, state, **extra))
        return browser, Flow(page, verifier, state)

    def authorize(self, client_id: str, scope: str, username: str, totp_secret: str | None = None,
                  patient: str | None = None, scopes: list[str] | None = None, **extra: str) -> Flow:
        browser, flow = self.start(client_id, scope, **extra)
        assert flow.page.status == 200, flow.page.html
        page = flow.page
        if "password" in page.names():  # else: still signed in from an earlier flow (same browser)
            page = browser.login(username, PASSWORD)
            if totp_secret is not None:
                assert "totp" in page.names(), page.html
                page = browser.submit(totp=pyotp.TOTP(totp_secret).now())
        assert "approve" in page.names(), page.html
        page = browser.approve(scopes=scopes, patient=patient)
        flow.page = page
        assert page.status == 302, page.html
        got = redirect_params(page.location or "")
        assert got.get("state") == flow.state
        flow.code, flow.error = got.get("code"), got.get("error")
        return flow

    def exchange(self, client_id: str, flow: Flow, secret: str | None = None, **override: str) -> Any:
        form = {"grant_type": "authorization_code", "code": flow.code or "", "redirect_uri": REDIRECT,
                "code_verifier": flow.verifier, "client_id": client_id}
        form.update(override)
        form = {k: v for k, v in form.items() if v is not None}
        kw: dict[str, Any] = {}
        if secret is not None:
            form.pop("client_id", None)
            kw["auth"] = (client_id, secret)
        return self.http.post("/auth/token", data=form, **kw)

    def tokens(self, client_id: str, scope: str, username: str, **kw: Any) -> dict[str, Any]:
        flow = self.authorize(client_id, scope, username, **kw)
        resp = self.exchange(client_id, flow)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp.get_json()

    def refresh(self, client_id: str, refresh_token: str, secret: str | None = None, **extra: str) -> Any:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id, **extra}
        kw: dict[str, Any] = {}
        if secret is not None:
            form.pop("client_id")
            kw["auth"] = (client_id, secret)
        return self.http.post("/auth/token", data=form, **kw)

    def get(self, path: str, token: str, **kw: Any) -> Any:
        return self.http.get(path, headers={"Authorization": f"Bearer {token}"}, **kw)


@pytest.fixture
def smart(app, http, admin) -> Smart:  # type: ignore[no-untyped-def]
    return Smart(app, http, admin)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A real HTTP server (werkzeug, threaded) on a free port; yields (FHIR base URL, app)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    app = fresh_app(make_settings(tmp_path), base_url=base)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, app
    finally:
        server.shutdown()
        app.extensions["fhirserver"].engine.dispose()


def seed_live(base: str, app: Any, app_scopes: str, redirect: str, family: str = "Interop") -> tuple[str, str, str]:
    """On a live server: a Patient created over HTTP by a backend client, a user who is that
    patient, and a public app. Returns (patient id, username, app client_id)."""
    import requests

    from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
    from fhirserver.auth.clients import register_backend_client

    svc = app.extensions["fhirserver"]
    key = generate_key("ES384")
    backend = register_backend_client(svc.engine, "loader", "system/*.cruds", jwks=public_jwks(key))
    token_url = f"{base.removesuffix('/fhir')}/auth/token"
    tok = requests.post(token_url, data=token_request_form(key, backend.client_id, token_url, "system/*.cruds"),
                        timeout=10).json()
    created = requests.post(f"{base}/Patient", json={"resourceType": "Patient",
                                                     "name": [{"family": family, "given": ["Ada"]}]},
                            headers={"Authorization": f"Bearer {tok['access_token']}"}, timeout=10)
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    username = f"user{next(_n)}"
    create_user(svc.engine, svc.keys, username, PASSWORD, f"Patient/{pid}")
    rec, _ = register_app_client(svc.engine, "interop app", app_scopes, [redirect], "none")
    return pid, username, rec.client_id
