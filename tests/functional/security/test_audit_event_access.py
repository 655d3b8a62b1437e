"""Reading the audit trail is an auditor's act (docs/security.md, issue "Security fixes" item 1).

AuditEvents name every patient a request touched and carry the searches clients ran (names,
birth dates, identifiers). A wildcard scope never grants them, only an explicit AuditEvent scope on
a client registered as an auditor, under an operations/audit purpose; a patient reads the events
about themselves. Query values and details are redacted for everyone but an auditor holding the
explicit permission to see them.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from fhirserver.auth.assertion import generate_key, load_private_key, public_jwks, token_request_form
from fhirserver.auth.clients import register_backend_client
from fhirserver.demo import ensure_demo_client, load_demo
from tests.conftest import make_settings
from tests.functional.consent.harness import ConsentServer, start
from tests.support.apps import fresh_app

SEARCH = {"name": "Devendra", "birthdate": "1961-07-14", "identifier": "urn:ssn|123-45-6789"}
SECRETS = ("Devendra", "1961-07-14", "123-45-6789")


def queries(event: dict[str, Any]) -> list[list[tuple[str, str]]]:
    return [parse_qsl(base64.b64decode(e["query"]).decode(), keep_blank_values=True)
            for e in event.get("entity", []) if "query" in e]


def events_of(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "AuditEvent"]


def forbidden(resp: Any) -> None:
    assert resp.status_code == 403, resp.get_data(as_text=True)[:300]
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    text = json.dumps(body)
    assert not any(s in text for s in SECRETS)


class Demo:
    """`serve --demo`'s data and clients, in process."""

    def __init__(self, tmp: Path) -> None:
        self.settings = make_settings(tmp)
        self.app = fresh_app(self.settings)
        self.svc = self.app.extensions["fhirserver"]
        self.http = self.app.test_client()
        load_demo(self.svc)
        self.key = load_private_key(ensure_demo_client(self.svc))

    def headers(self, client_id: str, scope: str = "system/*.rs", key: Any = None, **extra: str) -> dict[str, str]:
        form = token_request_form(key or self.key, client_id, self.settings.token_url, scope)
        resp = self.http.post("/auth/token", data=form)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["scope"] == scope
        return {"Authorization": f"Bearer {resp.get_json()['access_token']}", **extra}

    def client(self, scopes: str, **settings: Any) -> tuple[str, Any]:
        key = generate_key("ES384")
        rec = register_backend_client(self.svc.engine, f"security test {len(settings)}-{time.monotonic_ns()}", scopes,
                                      jwks=public_jwks(key), settings=settings)
        return rec.client_id, key

    def clinician_search(self) -> str:
        """The hostile-client pass's repro: demo-backend searches by name, birth date and SSN."""
        resp = self.http.get("/fhir/Patient", query_string=SEARCH, headers=self.headers("demo-backend"))
        assert resp.status_code == 200
        return resp.headers["X-Request-Id"]

    def event_of(self, headers: dict[str, str], request_id: str) -> dict[str, Any]:
        resp = self.http.get("/fhir/AuditEvent", query_string={"_count": "1000"}, headers=headers)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        found = [ev for ev in events_of(resp.get_json())
                 if any(e.get("what", {}).get("identifier", {}).get("value") == request_id for e in ev["entity"])]
        assert len(found) == 1
        return found[0]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    yield d
    d.svc.engine.dispose()


def test_demo_repro_research_client_sees_no_audit_events(demo: Demo) -> None:
    demo.clinician_search()
    research = demo.headers("demo-research")
    forbidden(demo.http.get("/fhir/AuditEvent", query_string={"_count": "1000"}, headers=research))
    forbidden(demo.http.get("/fhir/AuditEvent", query_string={"patient": "demo-alice"}, headers=research))
    # asking for the AuditEvent scope by name does not help a client that is not an auditor
    explicit = demo.headers("demo-research", "system/AuditEvent.rs")
    forbidden(demo.http.get("/fhir/AuditEvent", query_string={"patient": "demo-alice"}, headers=explicit))
    # nor do includes, _has or a bulk export
    resp = demo.http.get("/fhir/Patient", query_string={"_revinclude": "AuditEvent:patient"}, headers=research)
    assert resp.status_code == 200
    assert not events_of(resp.get_json()) and not any(s in resp.get_data(as_text=True) for s in SECRETS)
    resp = demo.http.get("/fhir/Patient", query_string={"_has:AuditEvent:patient:outcome": "0"}, headers=research)
    assert resp.status_code == 403 or resp.get_json()["total"] == 0
    kick = demo.http.get("/fhir/$export", query_string={"_type": "AuditEvent"},
                         headers={**research, "Prefer": "respond-async"})
    assert kick.status_code in (400, 403), kick.get_data(as_text=True)


@pytest.mark.parametrize("client_id", ["demo-backend", "demo-consent-office", "demo-break-glass"])
def test_wildcard_scopes_never_grant_audit_events(demo: Demo, client_id: str) -> None:
    event_id = demo.event_of(demo.headers("demo-auditor", "system/AuditEvent.rs"), demo.clinician_search())["id"]
    h = demo.headers(client_id, "system/*.rs")
    forbidden(demo.http.get("/fhir/AuditEvent", headers=h))
    forbidden(demo.http.get(f"/fhir/AuditEvent/{event_id}", headers=h))
    resp = demo.http.get("/fhir/Patient", query_string={"_revinclude": "AuditEvent:entity"}, headers=h)
    assert resp.status_code == 200 and not events_of(resp.get_json())


def test_wildcard_scope_of_an_auditor_client_does_not_grant_them_either(demo: Demo) -> None:
    client_id, key = demo.client("system/*.rs", auditor=True, purposes=["HOPERAT"])
    forbidden(demo.http.get("/fhir/AuditEvent", headers=demo.headers(client_id, "system/*.rs", key)))
    resp = demo.http.get("/fhir/AuditEvent", headers=demo.headers(client_id, "system/AuditEvent.rs", key))
    assert resp.status_code == 200 and events_of(resp.get_json())


@pytest.mark.parametrize("purposes,header,allowed", [
    (["HRESCH"], None, False),  # research purpose: never
    (["TREAT", "HOPERAT"], None, False),  # default purpose treatment
    (["TREAT", "HOPERAT"], "HOPERAT", True),  # operations, asked for
    (["HCOMPL"], None, True),  # compliance audit
])
def test_audit_events_are_read_only_for_operations_purposes(demo: Demo, purposes: list[str], header: str | None,
                                                            allowed: bool) -> None:
    demo.clinician_search()
    client_id, key = demo.client("system/AuditEvent.rs", auditor=True, purposes=purposes)
    extra = {"X-Purpose-Of-Use": header} if header else {}
    resp = demo.http.get("/fhir/AuditEvent", headers=demo.headers(client_id, "system/AuditEvent.rs", key, **extra))
    if allowed:
        assert resp.status_code == 200 and events_of(resp.get_json())
    else:
        forbidden(resp)


def test_auditor_without_the_values_permission_sees_queries_redacted(demo: Demo) -> None:
    request_id = demo.clinician_search()
    client_id, key = demo.client("system/AuditEvent.rs", auditor=True, purposes=["HOPERAT"])
    h = demo.headers(client_id, "system/AuditEvent.rs", key)
    event = demo.event_of(h, request_id)
    assert queries(event) == [[("name", "redacted"), ("birthdate", "redacted"), ("identifier", "redacted")]]
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "REDACTED",
            "display": "redacted"} in event["meta"]["security"]
    single = demo.http.get(f"/fhir/AuditEvent/{event['id']}", headers=h)
    assert single.status_code == 200 and not any(s in single.get_data(as_text=True) for s in SECRETS)
    assert queries(single.get_json()) == queries(event)
    # the auditor permitted to see values gets the search as it was run
    full = demo.event_of(demo.headers("demo-auditor", "system/AuditEvent.rs"), request_id)
    assert queries(full) == [list(SEARCH.items())]
    assert "security" not in full["meta"]


def test_bulk_export_of_audit_events_is_redacted_too(demo: Demo) -> None:
    demo.clinician_search()
    client_id, key = demo.client("system/AuditEvent.rs", auditor=True, purposes=["HOPERAT"])
    h = demo.headers(client_id, "system/AuditEvent.rs", key)
    kick = demo.http.get("/fhir/$export", query_string={"_type": "AuditEvent"}, headers={**h, "Prefer": "respond-async"})
    assert kick.status_code == 202, kick.get_data(as_text=True)
    status = urlsplit(kick.headers["Content-Location"])
    deadline = time.monotonic() + 30
    while True:
        resp = demo.http.get(f"{status.path}?{status.query}", headers=h)
        if resp.status_code != 202:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert resp.status_code == 200
    lines: list[dict[str, Any]] = []
    for item in resp.get_json()["output"]:
        url = urlsplit(item["url"])
        data = demo.http.get(f"{url.path}?{url.query}", headers=h).get_data()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        lines += [json.loads(line) for line in data.splitlines() if line.strip()]
    with_query = [ev for ev in lines if queries(ev)]
    assert with_query and all(v == "redacted" for ev in with_query for q in queries(ev) for k, v in q
                              if k in ("name", "birthdate", "identifier"))
    assert not any(s in json.dumps(lines) for s in SECRETS)


def test_patient_reads_own_events_with_query_values_redacted(tmp_path: Path) -> None:
    srv: ConsentServer = start(tmp_path)
    try:
        treat = srv.backend()
        search = srv.get(treat, "/fhir/Observation?subject=Patient/pa&code=http://loinc.org|29463-7")
        assert search.status_code == 200 and search.get_json()["total"] >= 1
        request_id = search.headers["X-Request-Id"]
        me = srv.user("Patient/pa", "patient/AuditEvent.rs", patient="pa")
        events = events_of(srv.bundle(me, "/fhir/AuditEvent?_count=1000"))
        mine = [ev for ev in events
                if any(e.get("what", {}).get("identifier", {}).get("value") == request_id for e in ev["entity"])]
        assert len(mine) == 1
        assert queries(mine[0]) == [[("subject", "redacted"), ("code", "redacted")]]
        # a wildcard scope does not reach the audit trail, not even a patient's own events
        wildcard = srv.user("Patient/pa", "patient/*.rs", patient="pa")
        forbidden(srv.get(wildcard, "/fhir/AuditEvent"))
    finally:
        srv.svc.engine.dispose()
