"""Interoperability: the reference Python SMART client (`fhirclient` on PyPI) performs a
standalone patient launch against a real HTTP server and reads the patient. Nothing in the
server knows about this client: it discovers the endpoints from the CapabilityStatement, sends
its default scopes plus `launch/patient`, uses PKCE S256 and a public client id."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
from werkzeug.serving import make_server

from fhirserver.app import create_app
from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_app_client, register_backend_client
from fhirserver.users.registry import create_user
from tests.conftest import make_settings
from tests.smart.browser import FormParser

fhirclient = pytest.importorskip("fhirclient.client")

PASSWORD = "violet-harbor-lantern-92"
REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the test reads the redirect itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    app = create_app(replace(make_settings(tmp_path), base_url=base))
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, app
    finally:
        server.shutdown()
        app.extensions["fhirserver"].engine.dispose()


def _fields(html: str) -> list[tuple[str, str, str, bool]]:
    parser = FormParser()
    parser.feed(html)
    return parser.fields


def _hidden(html: str) -> list[tuple[str, str]]:
    return [(n, v) for n, t, v, _ in _fields(html) if t == "hidden"]


def test_python_fhirclient_standalone_patient_launch(live: tuple[str, Any]) -> None:
    base, app = live
    svc = app.extensions["fhirserver"]
    # A patient, created over the API by a backend client.
    key = generate_key("ES384")
    backend = register_backend_client(svc.engine, "loader", "system/*.cruds", jwks=public_jwks(key))
    root = base.removesuffix("/fhir")
    tok = requests.post(f"{root}/auth/token", data=token_request_form(key, backend.client_id, f"{root}/auth/token",
                                                                      "system/*.cruds"), timeout=10).json()
    created = requests.post(f"{base}/Patient", json={"resourceType": "Patient", "name": [{"family": "Interop",
                                                                                           "given": ["Ada"]}]},
                            headers={"Authorization": f"Bearer {tok['access_token']}"}, timeout=10)
    assert created.status_code == 201
    pid = created.json()["id"]
    create_user(svc.engine, svc.keys, "ada", PASSWORD, f"Patient/{pid}")
    app_rec, _ = register_app_client(svc.engine, "fhirclient.py", "launch/patient user/*.* patient/*.read openid "
                                     "profile fhirUser", [REDIRECT], "none")

    smart = fhirclient.FHIRClient(settings={"app_id": app_rec.client_id, "api_base": base,
                                            "redirect_uri": REDIRECT})
    smart.wants_patient = True
    authorize_url = smart.authorize_url
    assert authorize_url.startswith(f"{root}/auth/authorize?")

    # The user's browser: sign in, approve, follow the redirect back to the app.
    browser = requests.Session()
    page = browser.get(authorize_url, timeout=10)
    assert page.status_code == 200 and 'name="password"' in page.text
    page = browser.post(f"{root}/auth/authorize", data=[*_hidden(page.text), ("username", "ada"),
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
