"""HTTP security headers on every response (one small after-request hook; the rules are few and
the auth pages already set their own CSP).

- `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` everywhere;
- `Cache-Control: no-store` on the API and the auth endpoints (patient data, tokens) unless the
  handler chose a policy itself;
- `Strict-Transport-Security` when the request arrived over TLS (directly, or through the
  proxies counted by `FHIRSERVER_PROXY_HOPS`, which make `request.is_secure` true);
- on HTML, a restrictive CSP with `frame-ancestors 'none'` and `X-Frame-Options: DENY` when the
  page did not set its own.
"""

from __future__ import annotations

from flask import Flask, Response, request

HTML_CSP = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"
HSTS = "max-age=31536000; includeSubDomains"
SENSITIVE_PREFIXES = ("/fhir", "/auth/", "/api/")


def install(app: Flask) -> None:
    @app.after_request
    def headers(resp: Response) -> Response:
        h = resp.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith(SENSITIVE_PREFIXES) and "Cache-Control" not in h:
            h["Cache-Control"] = "no-store"
        if request.is_secure:
            h.setdefault("Strict-Transport-Security", HSTS)
        if resp.mimetype == "text/html":
            h.setdefault("Content-Security-Policy", HTML_CSP)
            h.setdefault("X-Frame-Options", "DENY")
        return resp
