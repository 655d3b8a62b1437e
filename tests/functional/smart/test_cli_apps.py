"""The CLI side of SMART App Launch: registering apps (public, secret, JWKS) and creating EHR
launches, then using them over HTTP exactly as printed."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fhirserver.app import create_app
from fhirserver.auth.assertion import generate_key, public_jwks
from tests.conftest import BASE, make_settings
from tests.support.cli import cli, ok

REDIRECT = "https://app.example.org/cb"
SCOPES = "openid fhirUser launch launch/patient patient/*.rs"


def test_register_app_kinds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    public_id = ok(cli("client", "register", "--name", "Portal", "--redirect-uri", REDIRECT, "--public",
                       "--launch-url", "https://app.example.org/launch", "--scopes", SCOPES, data_dir=data)).strip()
    secret_out = ok(cli("client", "register", "--name", "Clinic app", "--redirect-uri", REDIRECT, "--secret",
                        "--scopes", SCOPES, data_dir=data)).splitlines()
    assert secret_out[1].startswith("client_secret: ") and len(secret_out[1]) > 40
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(generate_key("RS384"))))
    ok(cli("client", "register", "--name", "Key app", "--redirect-uri", REDIRECT, "--jwks-file", str(jwks),
           "--scopes", SCOPES, data_dir=data))
    listed = {c["client_id"]: c for c in json.loads(ok(cli("client", "list", "--json", data_dir=data)))}
    assert listed[public_id]["kind"] == "app"
    # the secret is shown once and never stored in clear
    db = (data / "fhirserver.sqlite3").read_bytes()
    assert secret_out[1].split(": ", 1)[1].encode() not in db
    for bad in (["--public", "--secret"], []):  # exactly one kind of client authentication
        args = ["client", "register", "--name", "Bad", "--redirect-uri", REDIRECT, "--scopes", SCOPES, *bad]
        assert cli(*args, data_dir=data).returncode != 0
    refused = cli("client", "register", "--name", "Bad", "--redirect-uri", "https://x.example/cb#frag", "--public",
                  "--scopes", SCOPES, data_dir=data)
    assert refused.returncode != 0 and "fragment" in refused.stderr
    assert cli("client", "register", "--name", "Bad", "--public", "--scopes", SCOPES, data_dir=data).returncode != 0


def test_launch_create_prints_the_launch_url(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    data = settings.data_dir
    env = {"FHIRSERVER_BASE_URL": BASE}
    client_id = ok(cli("client", "register", "--name", "EHR app", "--redirect-uri", REDIRECT, "--public",
                       "--launch-url", "https://app.example.org/launch?x=1", "--scopes", SCOPES, data_dir=data,
                       **env)).strip()
    assert cli("launch", "create", "--client", client_id, "--patient", "Patient/ghost", data_dir=data,
               **env).returncode != 0
    app = create_app(settings)
    http = app.test_client()
    svc = app.extensions["fhirserver"]
    from tests.conftest import register_backend_client, token_request_form

    key = generate_key("ES384")
    backend = register_backend_client(svc.engine, "seed", "system/*.cruds", jwks=public_jwks(key))
    tok = http.post("/auth/token", data=token_request_form(key, backend.client_id, settings.token_url,
                                                            "system/*.cruds")).get_json()["access_token"]
    pid = http.post("/fhir/Patient", json={"resourceType": "Patient"},
                    headers={"Authorization": f"Bearer {tok}"}).get_json()["id"]
    url = ok(cli("launch", "create", "--client", client_id, "--patient", f"Patient/{pid}", data_dir=data,
                 **env)).strip()
    parts = urlsplit(url)
    assert url.startswith("https://app.example.org/launch?x=1&")
    query = parse_qs(parts.query)
    assert query["iss"] == [BASE] and len(query["launch"][0]) > 20
    app.extensions["fhirserver"].engine.dispose()
