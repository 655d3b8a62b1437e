"""A tiny SMART app served by `fhirserver serve --demo` at /demo-app/, so a new user can watch a
standalone or EHR launch end to end in a browser: sign in as a demo user, approve, and see the
token response and the patient record the app could then read.

It is a real OAuth client of this server (public client `demo-smart-app`, PKCE S256): it holds
its PKCE verifier and state in its own part of the signed session and exchanges the code at
/auth/token like any other app. It is only registered in demo mode.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from urllib.parse import urlencode

from flask import Blueprint, current_app, redirect, render_template, request, session
from flask.typing import ResponseReturnValue

DEMO_APP_ID = "demo-smart-app"
DEMO_APP_SCOPES = ("openid fhirUser launch launch/patient offline_access patient/*.rs patient/*.cruds "
                   "user/*.rs patient/Observation.rs patient/*.read user/*.read")


def make_demo_app_blueprint() -> Blueprint:
    bp = Blueprint("demo_app", __name__, url_prefix="/demo-app", template_folder="templates")

    def _root() -> str:
        return str(current_app.extensions["fhirserver"].settings.public_root)

    @bp.get("/")
    def home() -> str:
        return render_template("demo_app.html", result=None, error=None)

    @bp.get("/launch")
    def launch() -> ResponseReturnValue:
        settings = current_app.extensions["fhirserver"].settings
        verifier = secrets.token_urlsafe(48)
        state = secrets.token_urlsafe(16)
        session["demo_app"] = {"verifier": verifier, "state": state}
        scope = request.args.get("scope") or "openid fhirUser launch/patient patient/*.rs offline_access"
        params = {"response_type": "code", "client_id": DEMO_APP_ID, "redirect_uri": f"{_root()}/demo-app/callback",
                  "scope": scope, "state": state, "aud": settings.fhir_base,
                  "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                  .rstrip(b"=").decode(), "code_challenge_method": "S256"}
        if request.args.get("launch"):  # EHR launch: the launch URL carries iss and launch
            params["launch"] = request.args["launch"]
            params["scope"] = "launch " + scope
        return redirect(f"{_root()}/auth/authorize?{urlencode(params)}")

    @bp.get("/callback")
    def callback() -> str:
        pending = session.pop("demo_app", None)
        if request.args.get("error"):
            return render_template("demo_app.html", result=None,
                                   error=f"{request.args['error']}: {request.args.get('error_description', '')}")
        if not pending or request.args.get("state") != pending["state"]:
            return render_template("demo_app.html", result=None, error="state mismatch: start again")
        client = current_app.test_client()  # the app calls the token endpoint like any client
        resp = client.post("/auth/token", data={
            "grant_type": "authorization_code", "code": request.args.get("code", ""), "client_id": DEMO_APP_ID,
            "redirect_uri": f"{_root()}/demo-app/callback", "code_verifier": pending["verifier"]})
        token = resp.get_json(silent=True) or {}
        shown = {k: (v[:12] + "…" if k in ("access_token", "refresh_token", "id_token") else v) for k, v in token.items()}
        record = None
        if token.get("patient") and token.get("access_token"):
            read = client.get(f"/fhir/Patient/{token['patient']}",
                              headers={"Authorization": f"Bearer {token['access_token']}"})
            record = read.get_data(as_text=True)
        return render_template("demo_app.html", error=None,
                               result={"token": json.dumps(shown, indent=2), "patient": record})

    return bp
