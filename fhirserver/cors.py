"""CORS for browser SMART apps (docs/smart.md, "Browser apps").

Allowed origins: the origins of the registered apps' redirect URIs (a browser app runs where it
is redirected back to) plus `FHIRSERVER_CORS_ORIGINS`. They are read from the client registry,
at most `CORS_CACHE_SECONDS` old, so an app registered on any instance works everywhere within
that time. Public discovery documents (`/.well-known/*`, `/fhir/metadata`, `/auth/jwks`) answer
any origin with `*`. Credentials are never allowed: tokens travel in the Authorization header,
never in cookies, so no response carries `Access-Control-Allow-Credentials`.

Not flask-cors: its origin list is fixed when the app is built, and these origins come from the
client registry, which changes while the server runs (and on other instances).
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

from flask import Flask, Response, request
from sqlalchemy import Engine, select

from .db.engine import read_connection
from .db.schema import client
from .fhir.interaction import is_fhir_path

CORS_CACHE_SECONDS = 30.0
ALLOW_HEADERS = "Authorization, Content-Type, Accept, Prefer, If-Match, If-None-Match, If-None-Exist, " \
                "If-Modified-Since, X-Purpose-Of-Use, X-Request-Id"
EXPOSE_HEADERS = "Location, ETag, Content-Location, Last-Modified, X-Request-Id, X-Progress, Retry-After"
ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE"
PUBLIC_PREFIXES = ("/.well-known/", "/fhir/.well-known/")
PUBLIC_PATHS = frozenset({"/fhir/metadata", "/auth/jwks"})
API = ("/fhir", "/auth/token", "/auth/introspect", "/auth/revoke")


def origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{parts.hostname.lower()}{port}"


class AllowedOrigins:
    def __init__(self, engine: Engine, configured: str) -> None:
        self.engine = engine
        self.configured = {o for o in (origin_of(x.strip()) for x in configured.split(",") if x.strip()) if o}
        self._lock = threading.Lock()
        self._cached: tuple[float, frozenset[str]] = (0.0, frozenset())

    def current(self) -> frozenset[str]:
        with self._lock:
            if time.monotonic() - self._cached[0] < CORS_CACHE_SECONDS:
                return self._cached[1]
        with read_connection(self.engine) as conn:
            rows = conn.execute(select(client.c.redirect_uris).where(client.c.disabled.is_(False),
                                                                     client.c.redirect_uris.is_not(None))).scalars()
            found = {o for raw in rows for o in (origin_of(u) for u in json.loads(raw or "[]")) if o}
        allowed = frozenset(found | self.configured)
        with self._lock:
            self._cached = (time.monotonic(), allowed)
        return allowed


def _scope(path: str) -> str | None:
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return "public"
    if is_fhir_path(path) or path in API[1:]:
        return "api"
    return None


def install(app: Flask, allowed: AllowedOrigins) -> None:
    @app.before_request
    def preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        scope = _scope(request.path)
        if scope is None:
            return None
        resp = Response(status=204)
        origin = request.headers.get("Origin", "")
        if scope == "public" or origin in allowed.current():
            resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            resp.headers["Access-Control-Max-Age"] = "600"
        return resp  # headers for the allowed; a refused origin gets none and the browser stops

    @app.after_request
    def headers(resp: Response) -> Response:
        scope = _scope(request.path)
        origin = request.headers.get("Origin")
        if scope is None or not origin:
            return resp
        if scope == "public":
            resp.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in allowed.current():
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers.add("Vary", "Origin")
        else:
            return resp
        resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        return resp
