"""Subscriptions over HTTP with a real receiving server (docs/subscriptions.md): the handshake,
numbered notifications for each payload kind, filters, owner-only Subscriptions, privacy at
delivery (a withdrawn Consent, scope restrictions), access records per delivery, retries while
the receiver is down, and refused endpoints."""

from __future__ import annotations

from typing import Any

import pytest

from tests.functional.consent.harness import consent
from tests.support.receiver import event_numbers, status_of

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
NEW_RESULT = "http://fhirserver.dev/SubscriptionTopic/new-result"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
FHIR = {"Content-Type": "application/fhir+json"}





def subscription(endpoint: str, payload: str = "id-only", filters: tuple[str, ...] = (),
                 topic: str = NEW_RESULT, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
                               "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content",
                                                           "valueCode": payload}]}}
    if headers:
        channel["header"] = list(headers)
    body: dict[str, Any] = {"resourceType": "Subscription", "status": "requested", "reason": "test",
                            "criteria": topic, "channel": channel,
                            "meta": {"profile": [f"{BACKPORT}/backport-subscription"]}}
    if filters:
        body["_criteria"] = {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria", "valueString": f}
                                           for f in filters]}
    return body


def _status(http: Any, headers: dict[str, str], sid: str) -> dict[str, str]:
    """The $status parameters of a subscription, as name -> value text."""
    answer = http.get(f"/fhir/Subscription/{sid}/$status", headers=headers)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return {p["name"]: str(next(v for k, v in p.items() if k.startswith("value")))
            for p in answer.get_json()["entry"][0]["resource"]["parameter"] if p["name"] != "notification-event"}


def patient(http: Any, headers: dict[str, str], name: str) -> str:
    resp = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": name}]},
                     headers={**headers, **FHIR})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return str(resp.get_json()["id"])


def observation(http: Any, headers: dict[str, str], pid: str, value: float, category: str = "laboratory") -> str:
    body = {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": value, "unit": "mg/dL"}}
    resp = http.post("/fhir/Observation", json=body, headers={**headers, **FHIR})
    assert resp.status_code in (201, 200), resp.get_data(as_text=True)
    return str(resp.headers["Location"].split("/Observation/")[1].split("/")[0])


def subscribe(http: Any, headers: dict[str, str], body: dict[str, Any]) -> str:
    resp = http.post("/fhir/Subscription", json=body, headers={**headers, **FHIR})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return str(resp.headers["Location"].split("/Subscription/")[1].split("/")[0])


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_handshake_then_numbered_id_only_notifications_for_the_filtered_patient(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    alice, bob = patient(http, h, "Alice"), patient(http, h, "Bob")
    sid = subscribe(http, h, subscription(receiver.url, filters=(f"Observation?patient=Patient/{alice}",),
                                          headers=("Authorization: Bearer receiver-secret",)))
    handshake = receiver.wait(lambda b: len(b) >= 1)[0]
    assert status_of(handshake)["type"] == "handshake"
    assert status_of(handshake)["subscription"]["reference"].endswith(f"/Subscription/{sid}")
    first = observation(http, h, alice, 1.0)
    observation(http, h, bob, 2.0)  # another patient: not this subscription's
    second = observation(http, h, alice, 3.0)
    got = receiver.wait(lambda b: event_numbers(b) == [1, 2])
    notes = [b for b in got if status_of(b)["type"] == "event-notification"]
    foci = [e["focus"]["reference"] for b in notes for e in status_of(b)["events"]]
    assert [f.rsplit("/", 1)[1] for f in foci] == [first, second]
    assert all("resource" not in e for b in notes for e in b["entry"][1:])  # id-only carries no content
    assert receiver.received[-1]["headers"]["Authorization"] == "Bearer receiver-secret"
    assert status_of(notes[-1])["events-since-subscription-start"] == "2"
    # the subscription and its live state, as the owner sees them
    sub = http.get(f"/fhir/Subscription/{sid}", headers=h).get_json()
    assert sub["status"] == "requested" and any(t["code"] for t in sub["meta"]["tag"])


def test_full_resource_and_empty_payloads(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    pid = patient(http, h, "Carol")
    subscribe(http, h, subscription(receiver.url + "/full", "full-resource", (f"Observation?patient=Patient/{pid}",)))
    subscribe(http, h, subscription(receiver.url + "/empty", "empty", (f"Observation?patient=Patient/{pid}",)))
    oid = observation(http, h, pid, 7.5)
    got = receiver.wait(lambda b: len(event_numbers(b)) == 2)
    by_path = {r["path"]: r["body"] for r in receiver.received if status_of(r["body"])["type"] == "event-notification"}
    full, empty = by_path["/hook/full"], by_path["/hook/empty"]
    resource = full["entry"][1]["resource"]
    assert resource == http.get(f"/fhir/Observation/{oid}", headers=h).get_json()
    assert len(empty["entry"]) == 1 and "focus" not in status_of(empty)["events"][0]
    assert got


def test_subscriptions_are_their_owners_alone(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    owner = make_client(settings={"subscription_endpoints": [receiver.url]})
    other = make_client(settings={"subscription_endpoints": [receiver.url]})
    sid = subscribe(http, owner.headers(), subscription(receiver.url))
    assert http.get(f"/fhir/Subscription/{sid}", headers=owner.headers()).status_code == 200
    assert http.get(f"/fhir/Subscription/{sid}", headers=other.headers()).status_code == 404
    assert http.get("/fhir/Subscription", headers=other.headers()).get_json().get("total") == 0
    found = http.get("/fhir/Subscription", headers=owner.headers()).get_json()
    assert [e["resource"]["id"] for e in found["entry"]] == [sid]
    # a client-sent owner tag is replaced by the server's
    forged = subscription(receiver.url)
    forged["meta"]["tag"] = [{"system": "http://fhirserver.dev/CodeSystem/owner", "code": owner.client_id}]
    forged_id = subscribe(http, other.headers(), forged)
    assert http.get(f"/fhir/Subscription/{forged_id}", headers=owner.headers()).status_code == 404
    # another client's update, patch, history and delete find nothing, as its read does; nothing changes
    changed = {**subscription(receiver.url), "id": sid}
    patch = [{"op": "replace", "path": "/reason", "value": "taken over"}]
    for resp in (http.put(f"/fhir/Subscription/{sid}", json=changed, headers={**other.headers(), **FHIR}),
                 http.patch(f"/fhir/Subscription/{sid}", json=patch,
                            headers={**other.headers(), "Content-Type": "application/json-patch+json"}),
                 http.get(f"/fhir/Subscription/{sid}/_history", headers=other.headers())):
        assert resp.status_code == 404 and resp.get_json()["issue"][0]["code"] == "not-found", resp.get_data(as_text=True)
    assert http.delete(f"/fhir/Subscription/{sid}", headers=other.headers()).status_code == 204
    kept = http.get(f"/fhir/Subscription/{sid}", headers=owner.headers())
    assert kept.status_code == 200 and kept.get_json()["meta"]["versionId"] == "1"  # not changed, not deleted


@pytest.mark.parametrize("endpoint,allowed,why", [
    ("http://127.0.0.1:9/elsewhere", "http://127.0.0.1:9/hook", "not under a URL registered"),
    ("http://192.0.2.10/hook", "http://192.0.2.10/hook", "https://"),
    ("https://10.1.2.3/hook", "https://10.1.2.3/hook", "private, loopback or reserved"),
    ("https://169.254.169.254/latest/meta-data", "https://169.254.169.254/", "private, loopback or reserved"),
    ("https://127.0.0.1/hook", "https://127.0.0.1/hook", "private, loopback or reserved"),
    ("https://[::1]/hook", "https://[::1]/hook", "private, loopback or reserved"),
    ("https://user:pw@example.org/hook", "https://user:pw@example.org/hook", "credentials"),
    ("ftp://example.org/hook", "ftp://example.org/hook", "https://"),
])
def test_endpoints_that_could_reach_inside_are_refused(http, make_client, endpoint, allowed, why) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [allowed]})
    resp = http.post("/fhir/Subscription", json=subscription(endpoint), headers={**client.headers(), **FHIR})
    assert resp.status_code == 422, resp.get_data(as_text=True)
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome" and why in outcome["issue"][0]["diagnostics"]
    assert http.get("/fhir/Subscription", headers=client.headers()).get_json()["total"] == 0


def test_a_client_without_registered_endpoints_cannot_subscribe(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client()
    resp = http.post("/fhir/Subscription", json=subscription(receiver.url), headers={**client.headers(), **FHIR})
    assert resp.status_code == 422 and "registered for this client" in resp.get_data(as_text=True)


@pytest.mark.parametrize("change,why", [
    ({"criteria": "http://example.org/SubscriptionTopic/unknown"}, "Unknown subscription topic"),
    ({"_criteria": {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                   "valueString": "Observation?value-quantity=5"}]}}, "does not allow filtering"),
    ({"_criteria": {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                   "valueString": "Patient?name=x"}]}}, "does not cover"),
    ({"channel": {"type": "email", "endpoint": "mailto:a@example.org"}}, "not supported"),
    ({"_criteria": {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                   "valueString": "Observation?patient=Group/1"}]}}, "A patient filter names patients"),
])
def test_bad_subscriptions_are_422_naming_the_rule(http, make_client, receiver, change, why) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    resp = http.post("/fhir/Subscription", json={**subscription(receiver.url), **change},
                     headers={**client.headers(), **FHIR})
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert why in resp.get_json()["issue"][0]["diagnostics"]


def test_a_withdrawn_consent_stops_the_next_notification(http, make_client, admin, receiver) -> None:  # type: ignore[no-untyped-def]
    """An opt-in purpose (research): notified while the patient's Consent permits it, not after
    the Consent is withdrawn -- also for an event numbered before the withdrawal but sent after."""
    research = make_client(settings={"subscription_endpoints": [receiver.url], "purposes": ["HRESCH"]})
    h = admin.headers()
    pid = patient(http, h, "Dora")
    permit = consent("c-dora", pid, {"type": "permit", "purpose": [{"system": ACT_REASON, "code": "HRESCH"}]})
    assert http.put("/fhir/Consent/c-dora", json=permit, headers={**h, **FHIR}).status_code in (200, 201)
    sid = subscribe(http, research.headers(), subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",)))
    receiver.wait(lambda b: len(b) >= 1)  # handshake
    seen = observation(http, h, pid, 1.0)
    receiver.wait(lambda b: event_numbers(b) == [1])
    receiver.failing = True  # the next event is numbered, but its delivery waits ...
    observation(http, h, pid, 2.0)
    import time
    deadline = time.monotonic() + 15
    while _status(http, research.headers(), sid)["events-since-subscription-start"] != "2":
        assert time.monotonic() < deadline, "event 2 was not numbered"
        time.sleep(0.05)
    withdrawn = {**permit, "status": "inactive"}
    assert http.put("/fhir/Consent/c-dora", json=withdrawn, headers={**h, **FHIR}).status_code == 200
    observation(http, h, pid, 3.0)  # after the withdrawal: never numbered for this owner
    receiver.failing = False
    marker = patient(http, h, "Marker")  # a later event the subscription does not cover
    assert marker
    deadline = time.monotonic() + 15
    while _status(http, research.headers(), sid)["events-withheld"] != "1" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert event_numbers(receiver.bundles()) == [1]
    foci = [e["focus"]["reference"] for b in receiver.bundles("event-notification") for e in status_of(b)["events"]]
    assert [f.rsplit("/", 1)[1] for f in foci] == [seen]
    # the event numbered before the withdrawal was withheld and counted (not revealed to the receiver)
    params = _status(http, research.headers(), sid)
    assert params["events-withheld"] == "1" and params["events-since-subscription-start"] == "2"


def test_status_and_events_replay_for_the_owner_only(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    other = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    pid = patient(http, h, "Erin")
    sid = subscribe(http, h, subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",)))
    oids = [observation(http, h, pid, float(v)) for v in range(3)]
    receiver.wait(lambda b: event_numbers(b) == [1, 2, 3])
    import time
    deadline = time.monotonic() + 10  # acknowledged once the receiver's answers are recorded
    while _status(http, h, sid)["events-delivered-through"] != "3" and time.monotonic() < deadline:
        time.sleep(0.05)
    status = http.get(f"/fhir/Subscription/{sid}/$status", headers=h)
    assert status.status_code == 200, status.get_data(as_text=True)
    params = {p["name"]: p for p in status.get_json()["entry"][0]["resource"]["parameter"]}
    assert params["status"]["valueCode"] == "active" and params["type"]["valueCode"] == "query-status"
    assert params["events-since-subscription-start"]["valueString"] == "3"
    assert params["events-delivered-through"]["valueString"] == "3"
    replay = http.get(f"/fhir/Subscription/{sid}/$events?eventsSinceNumber=2&content=full-resource", headers=h)
    assert replay.status_code == 200, replay.get_data(as_text=True)
    bundle = replay.get_json()
    assert [int(e["event-number"]) for e in status_of(bundle)["events"]] == [2, 3]
    assert [e["resource"]["id"] for e in bundle["entry"][1:]] == oids[1:]
    for path in (f"/fhir/Subscription/{sid}/$status", f"/fhir/Subscription/{sid}/$events"):
        denied = http.get(path, headers=other.headers())
        assert denied.status_code == 404 and denied.get_json()["resourceType"] == "OperationOutcome"


def test_each_delivery_is_an_access_record_naming_the_patient_and_endpoint(http, make_client, auditor, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    pid = patient(http, h, "Fay")
    sid = subscribe(http, h, subscription(receiver.url, "full-resource", (f"Observation?patient=Patient/{pid}",)))
    oid = observation(http, h, pid, 4.0)
    receiver.wait(lambda b: event_numbers(b) == [1])
    found = http.get(f"/fhir/AuditEvent?patient=Patient/{pid}&_count=100", headers=auditor.headers()).get_json()
    pushes = [e["resource"] for e in found.get("entry", [])
              if any(s.get("code") == "subscription-notification" for s in e["resource"].get("subtype", []))]
    assert len(pushes) == 1, found
    event = pushes[0]
    assert receiver.url in event["outcomeDesc"]
    refs = {e.get("what", {}).get("reference") for e in event["entity"]}
    assert {f"Observation/{oid}/_history/1", f"Patient/{pid}", f"Subscription/{sid}"} <= refs, refs
    assert event["agent"][0]["who"]["reference"] == f"Device/{client.client_id}"


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_notifications_wait_for_a_receiver_that_is_down_and_arrive_in_order(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    pid = patient(http, h, "Gus")
    sid = subscribe(http, h, subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",)))
    receiver.wait(lambda b: len(b) >= 1)
    receiver.failing = True
    for v in range(5):
        observation(http, h, pid, float(v))
    import time
    time.sleep(1.5)  # several failed attempts
    status = http.get(f"/fhir/Subscription/{sid}/$status", headers=h).get_json()
    params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert params["events-delivered-through"]["valueString"] == "0" and "error" in params
    receiver.failing = False
    got = receiver.wait(lambda b: event_numbers(b)[-1:] == [5])
    numbers = event_numbers(got)
    assert numbers == sorted(numbers) and set(numbers) == {1, 2, 3, 4, 5}


def test_a_scope_limited_subscriber_is_told_only_what_its_scopes_let_it_read(http, make_client, admin, receiver) -> None:  # type: ignore[no-untyped-def]
    """Scopes hold at delivery: a subscriber whose token reads only vital signs, subscribed to
    every new result with no filter, is told of no laboratory result -- and gets no gap in its
    event numbers for them."""
    scope = "system/Observation.rs?category=vital-signs system/Subscription.crus"
    vitals = make_client(scope, default_scope=scope, settings={"subscription_endpoints": [receiver.url]})
    subscribe(http, vitals.headers(), subscription(receiver.url))
    receiver.wait(lambda b: len(b) >= 1)
    h = admin.headers()
    pid = patient(http, h, "Ivy")
    written = [observation(http, h, pid, float(i), "vital-signs" if i % 3 == 0 else "laboratory") for i in range(7)]
    wanted = [oid for i, oid in enumerate(written) if i % 3 == 0]
    got = receiver.wait(lambda b: len(event_numbers(b)) >= len(wanted))
    import time
    time.sleep(1.0)  # nothing more arrives
    got = receiver.bundles()
    assert event_numbers(got) == list(range(1, len(wanted) + 1))
    foci = [e["focus"]["reference"].rsplit("/", 1)[1] for b in receiver.bundles("event-notification")
            for e in status_of(b)["events"]]
    assert foci == wanted


def test_heartbeats_when_nothing_happens_and_not_audited_as_disclosures(http, make_client, auditor, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    body = subscription(receiver.url)
    body["channel"]["extension"] = [{"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": 1}]
    sid = subscribe(http, client.headers(), body)
    got = receiver.wait(lambda b: len([x for x in b if status_of(x)["type"] == "heartbeat"]) >= 2, timeout=20)
    beats = [b for b in got if status_of(b)["type"] == "heartbeat"]
    assert all(len(b["entry"]) == 1 and not status_of(b)["events"] for b in beats)  # no data in a heartbeat
    assert all(status_of(b)["subscription"]["reference"].endswith(f"/Subscription/{sid}") for b in beats)
    found = http.get("/fhir/AuditEvent?_count=200", headers=auditor.headers()).get_json()
    pushes = [e["resource"] for e in found.get("entry", [])
              if any(s.get("code") == "subscription-notification" for s in e["resource"].get("subtype", []))]
    assert len(pushes) == 1 and "handshake" in pushes[0]["outcomeDesc"]  # the handshake only


def test_a_patient_app_subscribes_to_its_own_record_only(app, http, admin, receiver) -> None:  # type: ignore[no-untyped-def]
    from tests.functional.smart.conftest import Smart

    smart = Smart(app, http, admin)
    h = admin.headers()
    alice, bob = patient(http, h, "Alice"), patient(http, h, "Bob")
    client_id, _ = smart.app_client(settings={"subscription_endpoints": [receiver.url]})
    scope = "launch/patient openid fhirUser patient/*.rs patient/Subscription.crus patient/AuditEvent.rs"
    alice_user, _ = smart.user(f"Patient/{alice}")
    bob_user, _ = smart.user(f"Patient/{bob}")
    as_alice = {"Authorization": f"Bearer {smart.tokens(client_id, scope, alice_user, patient=alice)['access_token']}"}
    other_browser = Smart(app, app.test_client(), admin)  # Bob signs in on his own device
    as_bob = {"Authorization": f"Bearer {other_browser.tokens(client_id, scope, bob_user, patient=bob)['access_token']}"}
    for filters in ((), (f"Observation?patient=Patient/{bob}",)):  # the whole server, or someone else
        resp = http.post("/fhir/Subscription", json=subscription(receiver.url, filters=filters),
                         headers={**as_alice, **FHIR})
        assert resp.status_code == 403, resp.get_data(as_text=True)
        assert resp.get_json()["resourceType"] == "OperationOutcome"
    sid = subscribe(http, as_alice, subscription(receiver.url, filters=(f"Observation?patient=Patient/{alice}",)))
    mine = observation(http, h, alice, 1.0)
    observation(http, h, bob, 2.0)
    receiver.wait(lambda b: event_numbers(b) == [1])
    foci = [e["focus"]["reference"] for b in receiver.bundles("event-notification") for e in status_of(b)["events"]]
    assert [f.rsplit("/", 1)[1] for f in foci] == [mine]
    # Alice's "who saw my data" (her own AuditEvents, as the portal lists them) includes the push
    events = http.get("/fhir/AuditEvent?_count=200", headers=as_alice).get_json()
    pushes = [e["resource"] for e in events.get("entry", [])
              if any(s.get("code") == "subscription-notification" for s in e["resource"].get("subtype", []))]
    # the handshake (her app acting for her) and the push of her result
    assert sorted(p["outcomeDesc"].split(" to ")[0] for p in pushes) == ["subscription event-notification",
                                                                          "subscription handshake"]
    push = next(p for p in pushes if "event-notification" in p["outcomeDesc"])
    assert receiver.url in push["outcomeDesc"]
    assert f"Observation/{mine}/_history/1" in {e.get("what", {}).get("reference") for e in push["entity"]}
    # the same app used by another patient sees nothing of Alice's subscription
    assert http.get(f"/fhir/Subscription/{sid}", headers=as_bob).status_code == 404
    assert http.get("/fhir/Subscription", headers=as_bob).get_json()["total"] == 0
    assert http.get(f"/fhir/Subscription/{sid}", headers=as_alice).status_code == 200


def test_the_owner_searches_its_subscriptions_by_every_parameter(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    hook = subscribe(http, h, {**subscription(receiver.url + "/a"), "contact": [{"system": "email", "value": "ops@example.org"}]})
    ws = subscribe(http, h, {**subscription(receiver.url), "channel": {"type": "websocket"}})
    off = subscribe(http, h, {**subscription(receiver.url + "/b", topic="Observation?code=http://loinc.org|2339-0"),
                              "status": "off"})
    cases = {
        f"url={receiver.url}/a": {hook},
        "type=websocket": {ws},
        "status=off": {off},
        "status=requested": {hook, ws},
        f"criteria={NEW_RESULT}": {hook, ws},
        "payload=application/fhir%2Bjson": {hook, off},
        "contact=ops@example.org": {hook},
    }
    for query, expected in cases.items():
        found = http.get(f"/fhir/Subscription?{query}", headers=h).get_json()
        assert {e["resource"]["id"] for e in found.get("entry", [])} == expected, query


def test_notifications_are_signed_with_the_servers_published_key(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    from joserfc import jws
    from joserfc.errors import BadSignatureError
    from joserfc.jwk import KeySet

    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    subscribe(http, client.headers(), subscription(receiver.url))
    receiver.wait(lambda b: len(b) >= 1)
    got = receiver.received[0]
    keys = KeySet.import_key_set(http.get("/auth/jwks").get_json())  # as a receiver fetches it (jwks_uri)
    signature = got["headers"]["X-Fhirserver-Signature"]
    assert jws.deserialize_compact(signature, keys, payload=got["raw"]).protected["alg"] == "RS256"
    with pytest.raises(BadSignatureError):  # one byte changed: the signature no longer holds
        jws.deserialize_compact(signature, keys, payload=got["raw"].replace(b"handshake", b"handshakE"))



def test_encounter_topics_fire_on_the_status_transition_only(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    pid = patient(http, h, "Jo")
    subscribe(http, h, subscription(receiver.url + "/start", topic="http://fhirserver.dev/SubscriptionTopic/encounter-start",
                                    filters=(f"Encounter?patient=Patient/{pid}",)))
    subscribe(http, h, subscription(receiver.url + "/finish", topic="http://fhirserver.dev/SubscriptionTopic/encounter-finish",
                                    filters=(f"Encounter?patient=Patient/{pid}",)))
    enc = {"resourceType": "Encounter", "status": "planned", "subject": {"reference": f"Patient/{pid}"},
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}
    made = http.post("/fhir/Encounter", json=enc, headers={**h, **FHIR})
    assert made.status_code == 201
    eid = made.get_json()["id"]
    for status in ("arrived", "in-progress", "in-progress", "finished", "finished"):  # repeats change nothing
        body = {**enc, "id": eid, "status": status}
        assert http.put(f"/fhir/Encounter/{eid}", json=body, headers={**h, **FHIR}).status_code == 200
    receiver.wait(lambda b: len(event_numbers(b)) >= 2)
    import time
    time.sleep(1.0)
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in receiver.received:
        if status_of(r["body"])["type"] == "event-notification":
            by_path.setdefault(r["path"], []).extend(status_of(r["body"])["events"])
    assert [e["event-number"] for e in by_path["/hook/start"]] == ["1"]
    assert [e["event-number"] for e in by_path["/hook/finish"]] == ["1"]
    versions = [r["body"]["entry"][1]["response"]["etag"] for r in receiver.received
                if status_of(r["body"])["type"] == "event-notification"]
    assert sorted(versions) == ['W/"3"', 'W/"5"']  # in-progress was version 3, finished version 5
