"""The SMART Backend Services token endpoint (/auth/token) and bearer-token checks on /fhir.

Everything goes through HTTP: client assertions are built with joserfc (or by hand, for forged
algorithms), posted form-encoded to /auth/token, and the resulting tokens are used on /fhir.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import func, select, update

from fhirserver.app import create_app
from fhirserver.auth.assertion import client_assertion, generate_key, public_jwks
from fhirserver.auth.clients import register_backend_client, set_disabled
from fhirserver.db.schema import access_record, access_token
from tests.conftest import make_settings
from tests.support.tokens import SCOPE, assert_refused, form, post_token

# ---------------------------------------------------------------- helpers






def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def standard_claims(client_id: str, token_url: str, lifetime_s: int = 240) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + lifetime_s, "iat": now,
            "jti": uuid.uuid4().hex}


def sign_with(key: Any, alg: str, claims: dict[str, Any], kid: str | None) -> str:
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    return jwt.encode(header, claims, key, algorithms=[alg])


def audit_count(svc: Any) -> int:
    with svc.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(access_record)).scalar_one()


def token_for(http: Any, client: Any, scope: str = SCOPE) -> str:
    resp = post_token(http, form(client_assertion(client.key, client.client_id, client.token_url), scope))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["access_token"]


def assert_invalid_token_401(resp: Any) -> None:
    assert resp.status_code == 401, resp.get_data(as_text=True)
    www = resp.headers.get("WWW-Authenticate", "")
    assert www.startswith("Bearer"), www
    assert 'error="invalid_token"' in www, www
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"


# ---------------------------------------------------------------- a local JWKS server
class JwksServer:
    """A real HTTP server on 127.0.0.1 serving JWKS documents by path (mutable at runtime)."""

    def __init__(self) -> None:
        self.documents: dict[str, dict[str, Any]] = {}
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                doc = outer.documents.get(self.path)
                if doc is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                payload = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[JwksServer]:
    # Never route the loopback fetch through a proxy configured in the environment.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = JwksServer()
    server.start()
    yield server
    server.stop()


# ---------------------------------------------------------------- successful issuance
@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_assertion_accepted_and_token_works(http, make_client, settings, alg):
    client = make_client(SCOPE, alg=alg)
    resp = post_token(http, form(client_assertion(client.key, client.client_id, settings.token_url)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == settings.access_token_lifetime
    assert body["scope"] == SCOPE
    assert body["access_token"]
    assert resp.headers.get("Cache-Control") == "no-store"

    r = http.get("/fhir/Patient", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["resourceType"] == "Bundle"


# ---------------------------------------------------------------- refused assertions
def test_rs256_assertion_refused(http, make_client, settings):
    client = make_client(SCOPE, alg="RS384")
    # Same registered RSA key, but the non-allowed RS256 algorithm.
    private = {k: v for k, v in client.key.as_dict(private=True).items() if k != "alg"}
    rs256_key = RSAKey.import_key(private)
    assertion = sign_with(rs256_key, "RS256", standard_claims(client.client_id, settings.token_url), client.key.kid)
    assert_refused(post_token(http, form(assertion)))


def test_hs256_assertion_refused(http, make_client, settings):
    client = make_client(SCOPE, alg="RS384")
    # Algorithm confusion: HMAC keyed with the client's public key (PEM and JSON forms).
    public_pem = client.key.as_pem(private=False)
    public_json = json.dumps(client.key.as_dict(private=False)).encode()
    for secret in (public_pem, public_json, b"shared-secret"):
        claims = standard_claims(client.client_id, settings.token_url)
        assertion = hand_signed_hs256(secret, {"alg": "HS256", "typ": "JWT", "kid": client.key.kid}, claims)
        assert_refused(post_token(http, form(assertion)))


def test_alg_none_assertion_refused(http, make_client, settings):
    client = make_client(SCOPE)
    claims = standard_claims(client.client_id, settings.token_url)
    assertion = f"{b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64url(json.dumps(claims).encode())}."
    assert_refused(post_token(http, form(assertion)))


@pytest.mark.parametrize("reuse_kid", [False, True], ids=["foreign-kid", "registered-kid"])
def test_assertion_signed_by_unregistered_key_refused(http, make_client, settings, reuse_kid):
    client = make_client(SCOPE)
    kid = client.key.kid if reuse_kid else None
    stranger = generate_key("ES384", kid=kid)
    assertion = client_assertion(stranger, client.client_id, settings.token_url)
    assert_refused(post_token(http, form(assertion)))


def test_assertion_signed_by_another_clients_key_refused(http, make_client, settings):
    victim = make_client(SCOPE)
    attacker = make_client("system/Patient.r")
    assertion = client_assertion(attacker.key, victim.client_id, settings.token_url)
    assert_refused(post_token(http, form(assertion)))


@pytest.mark.parametrize("aud", ["http://testserver/fhir", "https://other.example/auth/token", ""])
def test_wrong_audience_refused(http, make_client, settings, aud):
    assert aud != settings.token_url
    client = make_client(SCOPE)
    assertion = client_assertion(client.key, client.client_id, settings.token_url, aud=aud)
    assert_refused(post_token(http, form(assertion)))


def test_iss_different_from_sub_refused(http, make_client, settings):
    client = make_client(SCOPE)
    other = make_client(SCOPE)
    assertion = client_assertion(client.key, client.client_id, settings.token_url, iss=other.client_id)
    assert_refused(post_token(http, form(assertion)))


def test_expired_assertion_refused(http, make_client, settings):
    client = make_client(SCOPE)
    now = int(time.time())
    assertion = client_assertion(client.key, client.client_id, settings.token_url, exp=now - 600, iat=now - 900)
    assert_refused(post_token(http, form(assertion)))


@pytest.mark.parametrize("extra_s", [60, 600, 24 * 3600])
def test_assertion_exp_beyond_five_minutes_refused(http, make_client, settings, extra_s):
    client = make_client(SCOPE)
    lifetime = settings.client_assertion_max_lifetime + extra_s
    assertion = client_assertion(client.key, client.client_id, settings.token_url, lifetime_s=lifetime)
    assert_refused(post_token(http, form(assertion)))


def test_missing_jti_refused(http, make_client, settings):
    client = make_client(SCOPE)
    claims = standard_claims(client.client_id, settings.token_url)
    del claims["jti"]
    assertion = sign_with(client.key, "ES384", claims, client.key.kid)
    assert_refused(post_token(http, form(assertion)))


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp"])
def test_missing_required_claim_refused(http, make_client, settings, claim):
    client = make_client(SCOPE)
    claims = standard_claims(client.client_id, settings.token_url)
    del claims[claim]
    assertion = sign_with(client.key, "ES384", claims, client.key.kid)
    assert_refused(post_token(http, form(assertion)))


def test_not_yet_valid_assertion_refused(http, make_client, settings):
    client = make_client(SCOPE)
    claims = standard_claims(client.client_id, settings.token_url)
    claims["nbf"] = int(time.time()) + 3600
    assertion = sign_with(client.key, "ES384", claims, client.key.kid)
    assert_refused(post_token(http, form(assertion)))


def test_replayed_jti_refused(http, make_client, settings):
    client = make_client(SCOPE)
    assertion = client_assertion(client.key, client.client_id, settings.token_url)
    first = post_token(http, form(assertion))
    assert first.status_code == 200, first.get_data(as_text=True)
    assert_refused(post_token(http, form(assertion)))
    # A fresh assertion reusing the jti is a replay too.
    jti = jwt.decode(assertion, client.key, algorithms=["ES384"]).claims["jti"]
    again = client_assertion(client.key, client.client_id, settings.token_url, jti=jti)
    assert_refused(post_token(http, form(again)))


def test_unknown_client_refused(http, settings):
    key = generate_key("ES384")
    assertion = client_assertion(key, "no-such-client", settings.token_url)
    assert_refused(post_token(http, form(assertion)))


def test_disabled_client_refused(http, make_client, svc, settings):
    client = make_client(SCOPE)
    assert set_disabled(svc.engine, client.client_id)
    assertion = client_assertion(client.key, client.client_id, settings.token_url)
    assert_refused(post_token(http, form(assertion)))
    # Re-enabling restores access (the refusal was due to the disabled flag only).
    assert set_disabled(svc.engine, client.client_id, False)
    resp = post_token(http, form(client_assertion(client.key, client.client_id, settings.token_url)))
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_password_grant_refused(http, make_client, settings):
    client = make_client(SCOPE)
    data = form(client_assertion(client.key, client.client_id, settings.token_url), grant_type="password",
                username="admin", password="admin")
    assert_refused(post_token(http, data), {"unsupported_grant_type", "unauthorized_client", "invalid_grant",
                                            "invalid_request"})


def test_missing_client_assertion_refused(http, make_client, settings):
    make_client(SCOPE)
    assert_refused(post_token(http, form(None)))
    assert_refused(post_token(http, form("")))


def test_wrong_assertion_type_refused(http, make_client, settings):
    client = make_client(SCOPE)
    data = form(client_assertion(client.key, client.client_id, settings.token_url),
                client_assertion_type="urn:ietf:params:oauth:client-assertion-type:saml2-bearer")
    assert_refused(post_token(http, data))


def test_garbage_assertion_refused(http):
    for junk in ("not-a-jwt", "a.b.c", "e30.e30.", "...."):
        assert_refused(post_token(http, form(junk)))


def test_token_endpoint_requires_post(http):
    resp = http.get("/auth/token")
    assert resp.status_code == 405
    assert "access_token" not in resp.get_data(as_text=True)


# ---------------------------------------------------------------- JWKS URL clients
def test_jwks_url_client(http, svc, settings, jwks_server):
    key = generate_key("ES384")
    jwks_server.documents["/good.json"] = public_jwks(key)
    rec = register_backend_client(svc.engine, "jwks url client", SCOPE, jwks_uri=jwks_server.url("/good.json"))
    resp = post_token(http, form(client_assertion(key, rec.client_id, settings.token_url)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert jwks_server.hits.get("/good.json", 0) >= 1
    token = resp.get_json()["access_token"]
    assert http.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_jwks_url_serving_a_different_key_refused(http, svc, settings, jwks_server):
    key = generate_key("ES384")
    other = generate_key("ES384")
    jwks_server.documents["/other.json"] = public_jwks(other)
    rec = register_backend_client(svc.engine, "jwks url client", SCOPE, jwks_uri=jwks_server.url("/other.json"))
    assert_refused(post_token(http, form(client_assertion(key, rec.client_id, settings.token_url))))
    assert jwks_server.hits.get("/other.json", 0) >= 1
    # Same kid as the signing key, different key material: still refused.
    impostor = generate_key("ES384", kid=key.kid)
    jwks_server.documents["/impostor.json"] = public_jwks(impostor)
    rec2 = register_backend_client(svc.engine, "jwks url client 2", SCOPE, jwks_uri=jwks_server.url("/impostor.json"))
    assert_refused(post_token(http, form(client_assertion(key, rec2.client_id, settings.token_url))))


def test_jwks_url_unreachable_refused(http, svc, settings, jwks_server):
    key = generate_key("ES384")
    rec = register_backend_client(svc.engine, "jwks url client", SCOPE, jwks_uri=jwks_server.url("/missing.json"))
    assert_refused(post_token(http, form(client_assertion(key, rec.client_id, settings.token_url))))


# ---------------------------------------------------------------- token use on /fhir
def test_disabling_client_invalidates_issued_token(http, make_client, svc):
    client = make_client(SCOPE)
    token = token_for(http, client)
    headers = {"Authorization": f"Bearer {token}"}
    assert http.get("/fhir/Patient", headers=headers).status_code == 200
    assert set_disabled(svc.engine, client.client_id)
    assert_invalid_token_401(http.get("/fhir/Patient", headers=headers))
    assert_invalid_token_401(http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=headers))


def test_expired_access_token_refused(http, make_client, svc):
    client = make_client(SCOPE)
    token = token_for(http, client)
    headers = {"Authorization": f"Bearer {token}"}
    assert http.get("/fhir/Patient", headers=headers).status_code == 200
    past = (int(time.time()) - 1) * 1_000_000
    with svc.engine.begin() as conn:
        n = conn.execute(update(access_token).where(access_token.c.client_id == client.client_id)
                         .values(expires_us=past)).rowcount
    assert n == 1
    assert_invalid_token_401(http.get("/fhir/Patient", headers=headers))


def test_access_token_expires_after_its_lifetime(tmp_path):
    settings = make_settings(tmp_path, access_token_lifetime=1)
    app = create_app(settings)
    try:
        http = app.test_client()
        svc = app.extensions["fhirserver"]
        key = generate_key("ES384")
        rec = register_backend_client(svc.engine, "short lived", SCOPE, jwks=public_jwks(key))
        resp = post_token(http, form(client_assertion(key, rec.client_id, settings.token_url)))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        body = resp.get_json()
        assert body["expires_in"] == 1
        headers = {"Authorization": f"Bearer {body['access_token']}"}
        time.sleep(1.2)
        assert_invalid_token_401(http.get("/fhir/Patient", headers=headers))
    finally:
        app.extensions["fhirserver"].engine.dispose()


def test_missing_authorization_header(http):
    r = http.get("/fhir/Patient")
    assert r.status_code == 401
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    body = r.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"


@pytest.mark.parametrize("value", ["Bearer ", "Bearer", "Bearer not-a-real-token", "Bearer " + "x" * 600])
def test_garbage_bearer_token(http, admin, value):
    admin.token(SCOPE)  # a real token exists; the garbage one must not match it
    r = http.get("/fhir/Patient", headers={"Authorization": value})
    assert r.status_code == 401
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert r.get_json()["resourceType"] == "OperationOutcome"


def test_basic_scheme_refused(http, admin):
    token = admin.token(SCOPE)
    for value in (f"Basic {base64.b64encode(f'{admin.client_id}:x'.encode()).decode()}", f"Basic {token}",
                  f"Token {token}", token):
        r = http.get("/fhir/Patient", headers={"Authorization": value})
        assert r.status_code == 401, value
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert r.get_json()["resourceType"] == "OperationOutcome"


def test_token_hash_is_not_a_token(http, admin, svc):
    token = admin.token(SCOPE)
    with svc.engine.connect() as conn:
        stored = conn.execute(select(access_token.c.token_hash)).scalars().all()
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    for h in stored:
        assert_invalid_token_401(http.get("/fhir/Patient", headers={"Authorization": f"Bearer {h}"}))


# ---------------------------------------------------------------- discovery
def test_public_endpoints_need_no_token(http):
    r = http.get("/fhir/metadata")
    assert r.status_code == 200
    assert r.get_json()["resourceType"] == "CapabilityStatement"
    r = http.get("/fhir/.well-known/smart-configuration")
    assert r.status_code == 200
    conf = r.get_json()
    assert conf["token_endpoint"].endswith("/auth/token")
    assert "private_key_jwt" in conf["token_endpoint_auth_methods_supported"]
    assert "client_credentials" in conf["grant_types_supported"]


def test_smart_configuration_token_endpoint_is_the_real_one(http, make_client, settings):
    conf = http.get("/fhir/.well-known/smart-configuration").get_json()
    assert conf["token_endpoint"] == settings.token_url
    assert set(conf.get("token_endpoint_auth_signing_alg_values_supported", [])) <= {"RS384", "ES384"}
    client = make_client(SCOPE)
    path = conf["token_endpoint"].removeprefix("http://testserver")
    resp = http.post(path, data=form(client_assertion(client.key, client.client_id, conf["token_endpoint"])))
    assert resp.status_code == 200, resp.get_data(as_text=True)


# ---------------------------------------------------------------- auditing and caching of the token endpoint
def test_every_token_request_is_audited(http, make_client, svc, settings):
    client = make_client(SCOPE)
    good = form(client_assertion(client.key, client.client_id, settings.token_url))
    cases = [
        (good, 200),
        (good, None),  # replay
        (form(client_assertion(generate_key(), client.client_id, settings.token_url)), None),
        (form(client_assertion(client.key, client.client_id, settings.token_url), grant_type="password"), None),
        (form(None), None),
        (form("garbage"), None),
        (form(client_assertion(client.key, client.client_id, settings.token_url), scope="foo"), None),
    ]
    for data, status in cases:
        before = audit_count(svc)
        resp = post_token(http, data)
        if status == 200:
            assert resp.status_code == 200, resp.get_data(as_text=True)
        else:
            assert resp.status_code in (400, 401), resp.get_data(as_text=True)
        assert audit_count(svc) == before + 1, (data.get("grant_type"), resp.status_code)


def test_token_endpoint_audit_events_record_outcome(http, make_client, svc, settings, auditor):
    client = make_client(SCOPE)
    ok = post_token(http, form(client_assertion(client.key, client.client_id, settings.token_url)))
    assert ok.status_code == 200
    bad = post_token(http, form(client_assertion(generate_key(), client.client_id, settings.token_url)))
    assert bad.status_code in (400, 401)
    with svc.engine.connect() as conn:
        ids = conn.execute(select(access_record.c.id).order_by(access_record.c.pk.desc()).limit(2)).scalars().all()
    refused_id, issued_id = ids
    h = auditor.headers()
    issued = http.get(f"/fhir/AuditEvent/{issued_id}", headers=h).get_json()
    refused = http.get(f"/fhir/AuditEvent/{refused_id}", headers=h).get_json()
    assert issued["outcome"] == "0"
    assert refused["outcome"] != "0"
    assert ok.get_json()["access_token"] not in json.dumps(issued)


@pytest.mark.parametrize("good", [True, False])
def test_token_responses_not_cacheable(http, make_client, settings, good):
    client = make_client(SCOPE)
    key = client.key if good else generate_key()
    resp = post_token(http, form(client_assertion(key, client.client_id, settings.token_url)))
    if good:
        assert resp.status_code == 200, resp.get_data(as_text=True)
    else:
        assert resp.status_code in (400, 401) and "access_token" not in resp.get_json()
    assert resp.headers.get("Cache-Control") == "no-store"
    assert resp.headers.get("Pragma") == "no-cache"


def test_ec_key_with_rs384_header_refused(http, make_client, settings):
    """The header alg must match the registered key type: an EC key cannot validate RS384."""
    client = make_client(SCOPE)
    rsa = generate_key("RS384", kid=client.key.kid)
    assertion = client_assertion(rsa, client.client_id, settings.token_url)
    assert_refused(post_token(http, form(assertion)))
    assert isinstance(client.key, ECKey)
