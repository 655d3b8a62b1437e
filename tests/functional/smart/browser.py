"""A minimal "browser" for the SMART login and approval pages: it reads the HTML forms the
server renders and submits them, like a user (no knowledge of server internals)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit


class FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: list[tuple[str, str, str, bool]] = []  # (name, type, value, checked)
        self.error: str | None = None
        self._in_error = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("input", "button") and a.get("name"):
            self.fields.append((a["name"], a.get("type", "text"), a.get("value", ""), "checked" in a))
        if a.get("role") == "alert":
            self._in_error = True

    def handle_data(self, data: str) -> None:
        if self._in_error and data.strip():
            self.error = (self.error or "") + data.strip()

    def handle_endtag(self, tag: str) -> None:
        self._in_error = False


@dataclass
class Page:
    status: int
    html: str
    location: str | None
    fields: list[tuple[str, str, str, bool]] = field(default_factory=list)
    error: str | None = None

    def names(self) -> set[str]:
        return {f[0] for f in self.fields}

    def hidden(self) -> dict[str, str]:
        return {n: v for n, t, v, _ in self.fields if t == "hidden"}

    def options(self, name: str) -> list[str]:
        return [v for n, t, v, _ in self.fields if n == name and t in ("checkbox", "radio")]


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def page_of(resp: Any) -> Page:
    html = resp.get_data(as_text=True)
    parser = FormParser()
    parser.feed(html)
    return Page(resp.status_code, html, resp.headers.get("Location"), parser.fields, parser.error)


class Browser:
    """Drives /auth/authorize through the Flask test client (cookies kept by the client)."""

    def __init__(self, http: Any) -> None:
        self.http = http
        self.page: Page | None = None

    def open(self, params: dict[str, str]) -> Page:
        self.page = page_of(self.http.get("/auth/authorize?" + urlencode(params)))
        return self.page

    def submit(self, **values: Any) -> Page:
        assert self.page is not None
        form: list[tuple[str, str]] = list(self.page.hidden().items())
        for name, value in values.items():
            if isinstance(value, (list, tuple)):
                form.extend((name, v) for v in value)
            else:
                form.append((name, value))
        self.page = page_of(self.http.post("/auth/authorize", data=urlencode(form),
                                           content_type="application/x-www-form-urlencoded"))
        return self.page

    def login(self, username: str, password: str) -> Page:
        return self.submit(username=username, password=password)

    def approve(self, scopes: list[str] | None = None, patient: str | None = None) -> Page:
        assert self.page is not None
        ticked = scopes if scopes is not None else self.page.options("scope")
        extra: dict[str, Any] = {"scope": ticked, "approve": "1"}
        if patient is not None:
            extra["patient"] = patient
        elif "patient" in self.page.names():
            radios = self.page.options("patient")
            if radios:
                extra["patient"] = radios[0]
        return self.submit(**extra)


def redirect_params(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
