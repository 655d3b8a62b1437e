"""CORS for browser SMART apps, through HTTP: preflight and actual responses on /fhir, the token,
introspection and revocation endpoints for the registered apps' origins and the configured ones;
`*` only on public discovery documents; never credentials; nothing for other origins."""

from __future__ import annotations

from typing import Any

import pytest

from fhirserver import cors
from fhirserver.auth.clients import set_disabled
from tests.functional.smart.conftest import Smart

APP_ORIGIN = "https://app.example.org"  # the origin of the smart fixture's REDIRECT
PREFLIGHT = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization, prefer"}


@pytest.fixture(autouse=True)
def no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cors, "CORS_CACHE_SECONDS", 0.0)  # see registry changes at once


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/Patient/123", "/fhir", "/auth/token", "/auth/introspect",
                                  "/auth/revoke"])
def test_preflight_from_a_registered_app(http: Any, smart: Smart, path: str) -> None:
    smart.app_client()
    r = http.options(path, headers={"Origin": APP_ORIGIN, **PREFLIGHT})
    assert r.status_code in (200, 204)
    assert r.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "prefer", "if-match", "if-none-exist", "x-purpose-of-use"} <= allowed
    assert "PATCH" in r.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in r.headers
    assert "Origin" in r.headers.get("Vary", "")


def test_actual_request_exposes_headers_without_credentials(http: Any, smart: Smart, admin: Any) -> None:
    smart.app_client()
    h = {**admin.headers(), "Origin": APP_ORIGIN}
    r = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Cors"}]}, headers=h)
    assert r.status_code == 201
    assert r.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    exposed = {x.strip() for x in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "ETag", "Content-Location", "X-Request-Id"} <= exposed
    assert "Access-Control-Allow-Credentials" not in r.headers
    token = http.post("/auth/token", data={"grant_type": "client_credentials"}, headers={"Origin": APP_ORIGIN})
    assert token.headers["Access-Control-Allow-Origin"] == APP_ORIGIN  # the error is readable by the app too


def test_unknown_origin_gets_no_cors_headers(http: Any, smart: Smart, admin: Any) -> None:
    smart.app_client()
    evil = "https://evil.example.net"
    pre = http.options("/fhir/Patient", headers={"Origin": evil, **PREFLIGHT})
    assert "Access-Control-Allow-Origin" not in pre.headers and "Access-Control-Allow-Methods" not in pre.headers
    r = http.get("/fhir/Patient", headers={**admin.headers(), "Origin": evil})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    # a look-alike of an allowed origin is another origin
    for other in ("http://app.example.org", "https://app.example.org:8443", "https://app.example.org.evil.net"):
        assert "Access-Control-Allow-Origin" not in http.get("/fhir/Patient", headers={
            **admin.headers(), "Origin": other}).headers


@pytest.mark.parametrize("path", ["/fhir/metadata", "/fhir/.well-known/smart-configuration",
                                  "/.well-known/openid-configuration", "/auth/jwks"])
def test_public_discovery_documents_allow_any_origin(http: Any, path: str) -> None:
    r = http.get(path, headers={"Origin": "https://anyone.example"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in r.headers
    pre = http.options(path, headers={"Origin": "https://anyone.example", **PREFLIGHT})
    assert pre.headers["Access-Control-Allow-Origin"] == "*"


def test_disabling_the_app_withdraws_its_origin(http: Any, smart: Smart) -> None:
    client_id, _ = smart.app_client()
    assert http.options("/fhir/Patient", headers={"Origin": APP_ORIGIN, **PREFLIGHT}).headers.get(
        "Access-Control-Allow-Origin") == APP_ORIGIN
    set_disabled(smart.app.extensions["fhirserver"].engine, client_id, True)
    assert "Access-Control-Allow-Origin" not in http.options("/fhir/Patient", headers={
        "Origin": APP_ORIGIN, **PREFLIGHT}).headers


def test_configured_origins(tmp_path: Any) -> None:
    from tests.conftest import make_settings
    from tests.support.apps import fresh_app

    app = fresh_app(make_settings(tmp_path), cors_origins="https://portal.example.org, http://localhost:3000")
    http = app.test_client()
    for origin in ("https://portal.example.org", "http://localhost:3000"):
        r = http.options("/fhir/Patient", headers={"Origin": origin, **PREFLIGHT})
        assert r.headers.get("Access-Control-Allow-Origin") == origin
    assert "Access-Control-Allow-Origin" not in http.options("/fhir/Patient", headers={
        "Origin": "https://other.example.org", **PREFLIGHT}).headers
