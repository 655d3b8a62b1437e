"""The portal's side of OAuth and the FHIR API: it is a public SMART client of this server (PKCE
S256), signs the user in through /auth/authorize, and then calls only the FHIR API with the
user's token -- in process, through the whole WSGI stack (authenticate, authorize, consent,
audit), exactly as an HTTP request would; there is no other way into the data.

The token lives in the signed session cookie (HttpOnly, SameSite=Lax, Secure behind TLS) sealed
with AES-256-GCM under the `portal-session` data key, so the cookie reveals nothing even to the
browser holding it. Signing out revokes it at /auth/revoke.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flask import current_app, session
from werkzeug.test import TestResponse

from ..crypto.cipher import DecryptionError, open_sealed, seal
from ..services import Services, current_services
from .record import name_of

CLIENT_ID = "fhirserver-portal"
# user-level scopes: a guardian's token reaches every child linked to them (the portal switches
# between them), a patient's only themselves; launch/patient picks the one shown first
AMENDABLE = ("Observation", "Condition", "AllergyIntolerance", "Immunization", "MedicationRequest", "Procedure")
SCOPES = ("openid fhirUser launch/patient user/*.rs user/Consent.cruds user/AuditEvent.rs user/Patient.u "
          + " ".join(f"user/{t}.u" for t in AMENDABLE))
KEY_SCOPE = "portal-session"
_AAD = b"fhirserver-portal-token"


def _cipher() -> AESGCM:
    return AESGCM(current_services().keys.ensure(KEY_SCOPE)[1])


def redirect_uri() -> str:
    return f"{current_services().settings.public_root}/portal/callback"


def begin_sign_in() -> str:
    """The authorize URL; the PKCE verifier and state wait in the session."""
    verifier, state = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    session["portal_pending"] = {"verifier": verifier, "state": state}
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    params = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": redirect_uri(), "scope": SCOPES,
              "state": state, "aud": current_services().settings.fhir_base, "code_challenge": challenge,
              "code_challenge_method": "S256"}
    return f"{current_services().settings.public_root}/auth/authorize?{urlencode(params)}"


def finish_sign_in(code: str, state: str) -> str | None:
    """Exchange the code (None on success, else what went wrong)."""
    pending = session.pop("portal_pending", None)
    if not pending or not secrets.compare_digest(state, pending["state"]):
        return "The sign-in was not started here (or took too long). Please sign in again."
    resp = current_app.test_client().post("/auth/token", data={
        "grant_type": "authorization_code", "code": code, "client_id": CLIENT_ID,
        "redirect_uri": redirect_uri(), "code_verifier": pending["verifier"]})
    token = resp.get_json(silent=True) or {}
    if resp.status_code != 200 or not token.get("access_token") or not token.get("patient"):
        return "The sign-in did not complete. Please sign in again."
    sealed = seal(_cipher(), token["access_token"].encode(), _AAD)
    session["portal"] = {"token": base64.b64encode(sealed).decode(), "patient": token["patient"],
                         "expires": time.time() + int(token.get("expires_in", 300)),
                         "warning": token.get("fhirserver_warning")}
    session["portal_csrf"] = secrets.token_urlsafe(24)
    api = Api.current()
    if api is None:
        return "The sign-in did not complete. Please sign in again."
    # whose records this user may see: themselves and the children linked to them as guardian
    people = api.all_pages("Patient", _count="50", _elements="name")
    session["portal"] = {**session["portal"], "patients": [[p["id"], name_of(p)] for p in people]}
    return None


def switch(patient: str) -> bool:
    """Show another of the user's patients (a guardian's child); False if it is not one of them."""
    state = session.get("portal") or {}
    if patient not in [p[0] for p in state.get("patients", [])]:
        return False
    session["portal"] = {**state, "patient": patient}
    return True


class SignedOut(Exception):
    """The token was refused (expired, revoked, the account suspended): sign in again."""


@dataclass
class Reply:
    status: int
    body: dict[str, Any]


class Api:
    """The signed-in user's FHIR API (None from `current()` when nobody is signed in)."""

    def __init__(self, token: str, patient: str) -> None:
        self.token = token
        self.patient = patient

    @classmethod
    def current(cls) -> Api | None:
        state = session.get("portal")
        if not state or state.get("expires", 0) < time.time():
            return None
        try:
            token = open_sealed(_cipher(), base64.b64decode(state["token"]), _AAD).decode()
        except (DecryptionError, ValueError, KeyError):
            return None
        return cls(token, str(state["patient"]))

    def raw(self, path: str, headers: dict[str, str] | None = None) -> TestResponse:
        """A GET whose answer is not a JSON resource (export status, NDJSON files): the response."""
        resp = current_app.test_client().get(path, headers={"Authorization": f"Bearer {self.token}", **(headers or {})})
        if resp.status_code == 401:
            raise SignedOut()
        return resp

    def _call(self, method: str, path: str, body: object = None, pairs: list[tuple[str, str]] | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/fhir+json"}
        url = f"/fhir/{path}" + (f"?{urlencode(pairs)}" if pairs else "")
        resp = current_app.test_client().open(url, method=method, headers=headers,
                                              json=body if body is not None else None)
        if resp.status_code == 401:
            raise SignedOut()
        try:
            data = json.loads(resp.get_data() or b"{}")
        except ValueError:
            data = {}
        return Reply(resp.status_code, data if isinstance(data, dict) else {})

    def get(self, path: str, pairs: list[tuple[str, str]] | None = None, **params: str) -> Reply:
        return self._call("GET", path, pairs=[*(pairs or []), *params.items()])

    def post(self, path: str, body: dict[str, Any]) -> Reply:
        return self._call("POST", path, body)

    def put(self, path: str, body: dict[str, Any]) -> Reply:
        return self._call("PUT", path, body)

    def all_pages(self, path: str, limit: int = 20, **params: str) -> list[dict[str, Any]]:
        """Every entry of a search (following `next` links, at most `limit` pages)."""
        entries: list[dict[str, Any]] = []
        reply = self.get(path, list(params.items()))
        for _ in range(limit):
            if reply.status != 200:
                break
            entries += [e["resource"] for e in reply.body.get("entry", []) if "resource" in e]
            nxt = next((lk["url"] for lk in reply.body.get("link", []) if lk.get("relation") == "next"), None)
            if not nxt:
                break
            parts = urlsplit(nxt)
            reply = self.get(parts.path.split("/fhir/", 1)[1], parse_qsl(parts.query))
        return entries

    def account(self, method: str, path: str = "", body: dict[str, Any] | None = None) -> Reply:
        """The user's own account (/auth/account): two-step sign-in, password, authorizations."""
        resp = current_app.test_client().open(f"/auth/account{path}", method=method, json=body,
                                              headers={"Authorization": f"Bearer {self.token}"})
        if resp.status_code in (401, 403):
            raise SignedOut()
        data = resp.get_json(silent=True)
        return Reply(resp.status_code, data if isinstance(data, dict) else {})

    def revoke(self) -> None:
        current_app.test_client().post("/auth/revoke", data={"token": self.token, "client_id": CLIENT_ID})


def csrf_token() -> str:
    if "portal_csrf" not in session:
        session["portal_csrf"] = secrets.token_urlsafe(24)
    return str(session["portal_csrf"])


def csrf_ok(value: str | None) -> bool:
    return bool(value) and secrets.compare_digest(str(value), str(session.get("portal_csrf", "")))


def ensure_client(svc: Services) -> None:
    """Register the portal as a public SMART app of this server (once), with this deployment's
    callback URL (kept current if the public URL changed)."""
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    from ..auth.clients import get_client, register_app_client
    from ..db.schema import client

    callback = f"{svc.settings.public_root}/portal/callback"
    existing = get_client(svc.engine, CLIENT_ID)
    settings = {"account_manager": True, "token_endpoint_auth_method": "none"}  # may call /auth/account
    if existing is None:
        try:
            register_app_client(svc.engine, "Patient privacy portal", SCOPES, [callback], "none", client_id=CLIENT_ID,
                                settings={"account_manager": True})
        except IntegrityError:  # another process (a gunicorn worker starting beside this one) was first
            if get_client(svc.engine, CLIENT_ID) is None:
                raise
    elif existing.redirect_uris != [callback] or existing.scopes != SCOPES or existing.settings != settings:
        with svc.engine.begin() as conn:
            conn.execute(update(client).where(client.c.client_id == CLIENT_ID).values(
                redirect_uris=json.dumps([callback]), scopes=SCOPES, settings=json.dumps(settings)))
