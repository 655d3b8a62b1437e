"""The per-request authentication and authorization fast paths keep their security properties:
the token lookup (raw SQL, never cached) sees a revocation, an expiry or a disabled client on the
very next request, and a v2 scope restriction compiled once per (query, type) grants exactly
what compiling it per request granted (and nothing for a restriction it cannot evaluate)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from fhirserver.auth.scopes import parse_resource_scope
from fhirserver.auth.tokens import lookup_token, token_hash
from fhirserver.db.engine import read_connection
from fhirserver.db.schema import access_token, resource
from fhirserver.db.schema import client as client_table
from fhirserver.pipeline.authorize import Authorizer

CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
LAB_SCOPE = f"system/Observation.rs?category={CAT}|laboratory"


def observation(category: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": CAT, "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}}


def test_revocation_expiry_and_disabling_apply_to_the_next_request(http, svc, make_client) -> None:  # type: ignore[no-untyped-def]
    for change in ("revoke", "expire", "disable"):
        client = make_client("system/*.rs")
        h = client.headers("system/*.rs")
        token = h["Authorization"].split()[1]
        assert http.get("/fhir/Patient", headers=h).status_code == 200
        info, _ = lookup_token(svc.engine, token)
        assert info is not None and info.client_id == client.client_id and info.scope == "system/*.rs"
        with read_connection(svc.engine) as conn:  # the admin API's form: through an open connection
            assert lookup_token(conn, token)[0] == info
        with svc.engine.begin() as conn:  # straight in the database: nothing else is told
            if change == "disable":  # (`client disable` also revokes the tokens; this checks the flag itself)
                conn.execute(update(client_table).where(client_table.c.client_id == client.client_id)
                             .values(disabled=True))
            else:
                values = {"revoked": True} if change == "revoke" else {"expires_us": 1}
                conn.execute(update(access_token).where(access_token.c.token_hash == token_hash(token)).values(**values))
        resp = http.get("/fhir/Patient", headers=h)
        assert resp.status_code == 401, change
        expected = {"revoke": "token revoked", "expire": "token expired", "disable": "client disabled"}[change]
        assert lookup_token(svc.engine, token) == (None, expected)
    assert lookup_token(svc.engine, "no-such-token") == (None, "unknown token")
    assert lookup_token(svc.engine, "x" * 513) == (None, "malformed token")


def test_granular_restriction_is_compiled_once_and_still_enforced(http, svc, admin, make_client) -> None:  # type: ignore[no-untyped-def]
    lab = http.post("/fhir/Observation", json=observation("laboratory"), headers=admin.headers()).get_json()["id"]
    vital = http.post("/fhir/Observation", json=observation("vital-signs"), headers=admin.headers()).get_json()["id"]
    h = make_client(LAB_SCOPE).headers(LAB_SCOPE)
    for _ in range(3):  # the second and third requests use the cached predicates
        assert http.get(f"/fhir/Observation/{lab}", headers=h).status_code == 200
        assert http.get(f"/fhir/Observation/{vital}", headers=h).status_code == 404
        assert [e["resource"]["id"] for e in http.get("/fhir/Observation", headers=h).get_json()["entry"]] == [lab]


def test_restriction_cache_keys_and_exclusions(svc) -> None:  # type: ignore[no-untyped-def]
    authz = Authorizer(svc.params, svc.compiler, svc.types)
    query = parse_resource_scope(LAB_SCOPE).query
    first = authz._restriction(query, "Observation", resource)
    assert first is not None and authz._restriction(query, "Observation", resource) is first
    alias = resource.alias()  # an alias (chains, includes) gets predicates over itself, uncached
    assert authz._restriction(query, "Observation", alias) is not authz._restriction(query, "Observation", alias)
    for uncached in ("date=ap2020-01-01", "subject:Patient.name=smith"):
        assert authz._restriction(uncached, "Observation", resource) is not None
        assert (uncached, "Observation") not in authz._restrictions
    assert authz._restriction("nonsense-param=1", "Observation", resource) is None  # fails closed
    assert authz._restriction("nonsense-param=1", "Observation", resource) is None
