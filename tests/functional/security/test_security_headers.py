"""HTTP security headers on every response: nosniff and no-referrer everywhere, no-store where
patient data or tokens travel, HSTS when served over TLS (directly or via the counted proxies),
a CSP with frame-ancestors 'none' on HTML pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import BackendClient, make_settings
from tests.support.apps import fresh_app


def test_api_responses(http: Any, admin: BackendClient) -> None:
    for resp in (http.get("/fhir/Patient", headers=admin.headers()), http.get("/fhir/Patient/nope", headers=admin.headers()),
                 http.get("/fhir/metadata"), http.post("/auth/token", data={"grant_type": "client_credentials"})):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "no-store" in resp.headers["Cache-Control"]
        assert "Strict-Transport-Security" not in resp.headers  # plain http
    assert http.get("/healthz").headers["X-Content-Type-Options"] == "nosniff"


def test_html_pages_cannot_be_framed(http: Any) -> None:
    page = http.get("/auth/authorize?response_type=code")  # an error page: HTML
    assert page.mimetype == "text/html"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"


def test_hsts_over_tls_behind_a_counted_proxy(tmp_path: Path) -> None:
    app = fresh_app(make_settings(tmp_path), proxy_hops=1)
    http = app.test_client()
    tls = http.get("/fhir/metadata", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.0.0.1"})
    assert tls.headers["Strict-Transport-Security"].startswith("max-age=")
    assert "Strict-Transport-Security" not in http.get("/fhir/metadata").headers
    direct = fresh_app(make_settings(tmp_path / "direct")).test_client()  # no proxy counted: the header is ignored
    assert "Strict-Transport-Security" not in direct.get("/fhir/metadata", headers={"X-Forwarded-Proto": "https"}).headers
