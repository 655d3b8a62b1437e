"""Every route reads stored data through the request's access gate (docs/architecture.md, "The
access gate"): each key of the route table is driven over HTTP, and every read of stored content
made while it is served is recorded with the guard state it ran in. A read outside the gate and
the named system paths raises `UnboundRead` (the request answers 500); a handler deliberately
broken to read around the gate is caught on every route."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Connection

from fhirserver.access import AccessGate
from fhirserver.db import guard
from fhirserver.pipeline import routes
from fhirserver.pipeline.context import RequestContext, Result
from tests.conftest import BASE, BackendClient
from tests.functional.smart.conftest import APP_SCOPES, Smart

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
JSON_PATCH = "application/json-patch+json"
SYSTEM_PATHS = {"$erase": {"system:$erase"}, "$proof": {"system:$proof"}}


def _local(url: str) -> str:
    parts = urlsplit(url)
    assert url.startswith(BASE), url
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


@dataclass
class World:
    """The data and the callers the routes are driven with."""

    smart: Smart
    admin: BackendClient
    auditor: BackendClient
    eraser: BackendClient
    patient: str = ""
    doomed: str = ""
    observation: str = ""
    spare: str = ""
    patient_token: str = ""
    urls: dict[str, str] = field(default_factory=dict)
    subscriber: BackendClient | None = None
    subscription: str = ""
    websocket: str = ""
    code_system: str = "http://example.org/cs/gate"
    value_set: str = "http://example.org/vs/gate"

    def h(self, **extra: str) -> dict[str, str]:
        return self.admin.headers(**extra)


@pytest.fixture
def world(app: Any, http: Any, admin: BackendClient, auditor: BackendClient,
          make_client: Callable[..., BackendClient]) -> World:
    smart = Smart(app, http, admin)
    w = World(smart, admin, auditor, make_client("system/*.cruds", settings={"admin": True}))
    w.patient = smart.patient("Gate")
    w.doomed = smart.patient("Doomed")
    w.observation = smart.observation(w.patient)
    w.spare = smart.observation(w.patient, code="29463-7")
    for body in ({"resourceType": "CodeSystem", "url": w.code_system, "status": "active", "content": "complete",
                  "concept": [{"code": "a", "display": "A"}]},
                 {"resourceType": "ValueSet", "url": w.value_set, "status": "active",
                  "compose": {"include": [{"system": w.code_system}]}}):
        assert http.post(f"/fhir/{body['resourceType']}", json=body, headers=admin.headers()).status_code == 201
    # a subscription that is off (an IP-literal endpoint: nothing is resolved or sent)
    hook = "https://1.1.1.1/gate-hook"
    w.subscriber = make_client("system/*.cruds", settings={"subscription_endpoints": [hook]})
    sub = {"resourceType": "Subscription", "status": "off", "reason": "gate", "channel": {"type": "rest-hook", "endpoint": hook},
           "criteria": "http://fhirserver.dev/SubscriptionTopic/new-result"}
    made = http.post("/fhir/Subscription", json=sub, headers=w.subscriber.headers())
    assert made.status_code == 201, made.get_data(as_text=True)
    w.subscription = made.headers["Location"].split("/Subscription/")[1].split("/")[0]
    made = http.post("/fhir/Subscription", json={**sub, "channel": {"type": "websocket"}}, headers=w.subscriber.headers())
    assert made.status_code == 201, made.get_data(as_text=True)
    w.websocket = made.headers["Location"].split("/Subscription/")[1].split("/")[0]
    name, _ = smart.user(f"Patient/{w.patient}")
    client_id, _ = smart.app_client(APP_SCOPES)
    w.patient_token = smart.tokens(client_id, "launch/patient patient/*.rs openid fhirUser", name,
                                   patient=w.patient)["access_token"]
    return w


def _bundle(w: World) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{w.patient}"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "gate"},
                      "subject": {"reference": f"Patient/{w.patient}"}},
         "request": {"method": "POST", "url": "Observation"}}]}


def _observation(w: World, text: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": w.observation, "status": "amended", "code": {"text": text},
            "subject": {"reference": f"Patient/{w.patient}"}}


def _audit_event(w: World) -> str:
    found = w.smart.http.get("/fhir/AuditEvent", query_string={"_count": "1"}, headers=w.auditor.headers())
    assert found.status_code == 200
    return str(found.get_json()["entry"][0]["resource"]["id"])


def _subscriber(w: World) -> dict[str, str]:
    assert w.subscriber is not None
    return w.subscriber.headers()


def _export_kickoff(w: World) -> Any:
    resp = w.smart.http.get("/fhir/$export", query_string={"_type": "Patient"}, headers=w.h(**ASYNC))
    w.urls["status"] = _local(resp.headers.get("Content-Location", BASE))
    return resp


def _export_status(w: World) -> Any:
    import time

    deadline = time.monotonic() + 30
    while True:
        resp = w.smart.http.get(w.urls["status"], headers=w.h())
        if resp.status_code != 202 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if resp.status_code == 200:
        w.urls["file"] = _local(resp.get_json()["output"][0]["url"])
    return resp


# route key -> the request that drives it and the status it must answer (in this order: the
# export's status and file come after its kick-off)
CASES: dict[str, tuple[Callable[[World], Any], int]] = {
    "capabilities": (lambda w: w.smart.http.get("/fhir/metadata"), 200),
    "smart-configuration": (lambda w: w.smart.http.get("/fhir/.well-known/smart-configuration"), 200),
    "read": (lambda w: w.smart.http.get(f"/fhir/Patient/{w.patient}", headers=w.h()), 200),
    "vread": (lambda w: w.smart.http.get(f"/fhir/Patient/{w.patient}/_history/1", headers=w.h()), 200),
    "create": (lambda w: w.smart.http.post("/fhir/Observation", json={k: v for k, v in _observation(w, "new").items() if k != "id"},
                                           headers=w.h()), 201),
    "update": (lambda w: w.smart.http.put(f"/fhir/Observation/{w.observation}", json=_observation(w, "updated"),
                                          headers=w.h()), 200),
    "patch": (lambda w: w.smart.http.patch(f"/fhir/Observation/{w.observation}",
                                           json=[{"op": "replace", "path": "/status", "value": "final"}],
                                           headers=w.h(**{"Content-Type": JSON_PATCH})), 200),
    "delete": (lambda w: w.smart.http.delete(f"/fhir/Observation/{w.spare}", headers=w.h()), 204),
    "history-instance": (lambda w: w.smart.http.get(f"/fhir/Patient/{w.patient}/_history", headers=w.h()), 200),
    "history-type": (lambda w: w.smart.http.get("/fhir/Observation/_history", headers=w.h()), 200),
    "history-system": (lambda w: w.smart.http.get("/fhir/_history", headers=w.h()), 200),
    "search-type": (lambda w: w.smart.http.get("/fhir/Observation", headers=w.h(), query_string={
        "patient": w.patient, "_include": "Observation:subject", "_revinclude": "Provenance:target"}), 200),
    "bundle": (lambda w: w.smart.http.post("/fhir", json=_bundle(w), headers=w.h()), 200),
    "$everything": (lambda w: w.smart.http.get(f"/fhir/Patient/{w.patient}/$everything", headers=w.h()), 200),
    "$lastn": (lambda w: w.smart.http.get("/fhir/Observation/$lastn", query_string={"patient": w.patient},
                                          headers=w.h()), 200),
    "$summary": (lambda w: w.smart.http.get(f"/fhir/Patient/{w.patient}/$summary", headers=w.h()), 200),
    "$validate": (lambda w: w.smart.http.post("/fhir/Observation/$validate", json=_observation(w, "check"),
                                              headers=w.h()), 200),
    "$erase": (lambda w: w.smart.http.post(f"/fhir/Patient/{w.doomed}/$erase", headers=w.eraser.headers()), 200),
    "$erasure-request": (lambda w: w.smart.http.get(f"/fhir/Patient/{w.patient}/$erasure-request",
                                                    headers={"Authorization": f"Bearer {w.patient_token}"}), 200),
    "$proof": (lambda w: w.smart.http.get(f"/fhir/AuditEvent/{_audit_event(w)}/$proof",
                                          headers=w.auditor.headers()), 200),
    "$lookup": (lambda w: w.smart.http.get("/fhir/CodeSystem/$lookup", query_string={
        "system": w.code_system, "code": "a"}, headers=w.h()), 200),
    "$expand": (lambda w: w.smart.http.get("/fhir/ValueSet/$expand", query_string={"url": w.value_set},
                                           headers=w.h()), 200),
    "$validate-code": (lambda w: w.smart.http.get("/fhir/ValueSet/$validate-code", query_string={
        "url": w.value_set, "code": "a"}, headers=w.h()), 200),
    "$status": (lambda w: w.smart.http.get(f"/fhir/Subscription/{w.subscription}/$status",
                                           headers=_subscriber(w)), 200),
    "$events": (lambda w: w.smart.http.get(f"/fhir/Subscription/{w.subscription}/$events",
                                           headers=_subscriber(w)), 200),
    "$get-ws-binding-token": (lambda w: w.smart.http.get(f"/fhir/Subscription/{w.websocket}/$get-ws-binding-token",
                                                         headers=_subscriber(w)), 200),
    "$export": (_export_kickoff, 202),
    "$export-poll-status": (_export_status, 200),
    "$export-file": (lambda w: w.smart.http.get(w.urls["file"], headers=w.h()), 200),
}
# routes that read no stored resource themselves: configuration, a posted body, the export's job
# row and its files (the export worker reads through a gate bound to the job's caller: those
# reads are seen while its status is polled)
NO_STORED_DATA = {"capabilities", "smart-configuration", "$validate", "$export", "$export-file"}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str | None, str]]]:
    """Every guarded read of stored content, (guard state, what was read), and every call of the
    access gate, ("gate", method)."""
    seen: list[tuple[str | None, str]] = []
    check = guard.check

    def recording(what: str) -> None:
        seen.append((guard.current(), what))
        check(what)

    def gate_call(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            seen.append(("gate", name))
            return method(*args, **kw)
        return call

    monkeypatch.setattr(guard, "check", recording)
    for name, method in vars(AccessGate).items():
        if callable(method) and not name.startswith("_"):
            monkeypatch.setattr(AccessGate, name, gate_call(name, method))
    yield seen


def test_every_route_has_a_case() -> None:
    assert set(CASES) == set(routes.ROUTES), "a new route needs a case here (and must read through the gate)"


def test_every_route_reads_through_the_gate(world: World, reads: list[tuple[str | None, str]]) -> None:
    for key, (drive, status) in CASES.items():
        reads.clear()
        resp = drive(world)
        assert resp.status_code == status, (key, resp.get_data(as_text=True)[:500])
        states = {state for state, _ in reads if state is not None}
        # served reads ran in the gate or in the route's named system path; none unbound
        assert guard.REQUEST not in states, (key, reads)
        allowed = {guard.GATE, "gate"} | SYSTEM_PATHS.get(key, set()) | {"system:questionnaire-check",
                                                                  "system:consent-minors"}
        assert states <= allowed, (key, states)
        if key not in NO_STORED_DATA:
            assert ("gate" in states) or SYSTEM_PATHS.get(key, set()) & states, (key, reads)


class Bypass:
    """A route's handler broken to read a patient's row straight from the repository first."""

    def __init__(self, inner: Any, patient: str) -> None:
        self.inner = inner
        self.patient = patient

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        ctx.services.repo.read(conn, "Patient", self.patient)  # around the gate
        result: Result = self.inner.execute(ctx, conn)
        return result


def test_a_handler_reading_around_the_gate_fails_on_every_route(world: World, monkeypatch: pytest.MonkeyPatch,
                                                                reads: list[tuple[str | None, str]]) -> None:
    for key, (drive, status) in CASES.items():
        with monkeypatch.context() as m:
            m.setitem(routes.ROUTES, key, Bypass(routes.ROUTES[key], world.patient))
            reads.clear()
            resp = drive(world)
        assert resp.status_code == 500, (key, resp.status_code, resp.get_data(as_text=True)[:300])
        assert resp.get_json()["resourceType"] == "OperationOutcome"
        assert (guard.REQUEST, "Repository.read") in reads, (key, reads)
        again = drive(world)  # unbroken again, the route answers as before (and nothing half-done was kept)
        assert again.status_code == status, (key, again.get_data(as_text=True)[:300])
