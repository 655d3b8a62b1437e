"""A server harness for Bulk export and exchange tests: tokens, kick-off, polling, file download."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fhirserver.auth.assertion import generate_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from tests.conftest import BASE, make_settings
from tests.support.apps import fresh_app

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


class Server:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.svc = app.extensions["fhirserver"]
        self.http = app.test_client()
        self._keys: dict[str, tuple[str, Any]] = {}

    def token(self, scopes: str = "system/*.cruds", name: str = "main", settings: dict[str, Any] | None = None) -> str:
        if name not in self._keys:
            key = generate_key("ES384")
            rec = register_backend_client(self.svc.engine, f"bulk {name}", scopes, jwks=public_jwks(key),
                                          settings=settings)
            self._keys[name] = (rec.client_id, key)
        client_id, key = self._keys[name]
        form = token_request_form(key, client_id, self.svc.settings.token_url, scopes)
        resp = self.http.post("/auth/token", data=form)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return str(resp.get_json()["access_token"])

    def h(self, token: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", **extra}

    def create(self, token: str, body: dict[str, Any]) -> str:
        resp = self.http.post(f"/fhir/{body['resourceType']}", json=body, headers=self.h(token))
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return str(resp.get_json()["id"])

    def kickoff(self, token: str, path: str = "$export", **params: str) -> Any:
        return self.http.get(f"/fhir/{path}", query_string=params, headers=self.h(token, **ASYNC))

    def wait(self, token: str, status_url: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        local = _local(status_url)
        while time.monotonic() < deadline:
            resp = self.http.get(local, headers=self.h(token))
            if resp.status_code != 202:
                return resp
            assert resp.headers.get("Retry-After") and resp.headers.get("X-Progress")
            time.sleep(0.2)
        raise AssertionError("export did not finish")

    def files(self, token: str, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for item in manifest["output"]:
            resp = self.http.get(_local(item["url"]), headers=self.h(token))
            assert resp.status_code == 200, resp.get_data(as_text=True)
            assert resp.headers["Content-Type"].startswith("application/fhir+ndjson")
            lines = [json.loads(line) for line in resp.get_data(as_text=True).splitlines()]
            assert len(lines) == item["count"]
            assert all(r["resourceType"] == item["type"] for r in lines)
            out.setdefault(item["type"], []).extend(lines)
        return out

    def searchable(self, token: str, rtype: str, **params: str) -> set[str]:
        resp = self.http.get(f"/fhir/{rtype}", query_string={"_count": "1000", **params}, headers=self.h(token))
        assert resp.status_code == 200
        return {e["resource"]["id"] for e in resp.get_json().get("entry", [])}


def _local(url: str) -> str:
    parts = urlsplit(url)
    assert url.startswith(BASE)
    return f"{parts.path}?{parts.query}"


def _app(tmp_path: Path, **settings: Any) -> Any:
    return fresh_app(make_settings(tmp_path), **settings)


def client_token(srv: Server, name: str, scopes: str = "system/*.cruds", **settings: Any) -> str:
    """A backend client registered with client settings (consent exemption, purposes, pseudonyms)."""
    key = generate_key("ES384")
    rec = register_backend_client(srv.svc.engine, name, scopes, jwks=public_jwks(key), settings=settings)
    resp = srv.http.post("/auth/token", data=token_request_form(key, rec.client_id, srv.svc.settings.token_url, scopes))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return str(resp.get_json()["access_token"])
