"""The operators' side of subscriptions: `fhirserver client register --subscription-endpoint`,
`fhirserver subscription list|pause|resume`, the metrics, and the CapabilityStatement."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fhirserver.auth.clients import get_client
from tests.support.cli import cli, ok
from tests.support.receiver import event_numbers

from .test_rest_hook import observation, patient, subscribe, subscription


def test_register_a_client_with_subscription_endpoints(tmp_path: Path, svc) -> None:  # type: ignore[no-untyped-def]
    ok(cli("client", "keygen", "--private-key-out", str(tmp_path / "k.json"), "--jwks-out", str(tmp_path / "j.json"),
           data_dir=None))
    data = tmp_path / "data"
    cid = ok(cli("client", "register", "--name", "Lab feed", "--jwks-file", str(tmp_path / "j.json"), "--scopes",
                 "system/Observation.rs system/Subscription.crus", "--subscription-endpoint",
                 "https://feeds.example.org/fhir-hook", "--subscription-endpoint", "https://backup.example.org/",
                 data_dir=data)).strip()
    rec = get_client(svc.engine, cid)
    assert rec is not None
    assert rec.settings["subscription_endpoints"] == ["https://feeds.example.org/fhir-hook", "https://backup.example.org/"]
    bad = cli("client", "register", "--name", "Bad", "--jwks-file", str(tmp_path / "j.json"), "--scopes",
              "system/Subscription.crus", "--subscription-endpoint", "ftp://x.example.org/", data_dir=data)
    assert bad.returncode != 0 and "https://" in bad.stderr + bad.stdout


def test_pause_holds_delivery_without_losing_events_and_resume_delivers_them(tmp_path: Path, http, make_client,  # type: ignore[no-untyped-def]
                                                                             receiver) -> None:
    data = tmp_path / "data"
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    pid = patient(http, h, "Hal")
    sid = subscribe(http, h, subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",)))
    receiver.wait(lambda b: len(b) >= 1)  # handshake
    assert ok(cli("subscription", "pause", sid, data_dir=data)).strip() == f"{sid} paused"
    for v in range(3):
        observation(http, h, pid, float(v))
    deadline = time.monotonic() + 10
    while True:  # numbered while paused ...
        listed = {r["id"]: r for r in json.loads(ok(cli("subscription", "list", "--json", data_dir=data)))}
        if listed[sid]["events"] == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert listed[sid]["paused"] is True and listed[sid]["events"] == 3 and listed[sid]["delivered_through"] == 0
    assert event_numbers(receiver.bundles()) == []  # ... and not sent
    assert "Authorization" not in json.dumps(listed)  # the listing shows no channel header
    ok(cli("subscription", "resume", sid, data_dir=data))
    receiver.wait(lambda b: event_numbers(b) == [1, 2, 3])
    deadline = time.monotonic() + 10  # acknowledged once the receiver's answers are recorded
    while "delivered 3" not in (text := ok(cli("subscription", "list", data_dir=data))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sid in text and "events 3, delivered 3" in text
    missing = cli("subscription", "pause", "no-such-subscription", data_dir=data)
    assert missing.returncode != 0 and "no subscription" in missing.stderr + missing.stdout


def test_capability_statement_advertises_topics_and_the_backport_profile(http) -> None:  # type: ignore[no-untyped-def]
    cs = http.get("/fhir/metadata").get_json()
    sub = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Subscription")
    topics = {e["valueCanonical"] for e in sub.get("extension", [])
              if e["url"].endswith("capabilitystatement-subscriptiontopic-canonical")}
    assert "http://fhirserver.dev/SubscriptionTopic/new-result" in topics and len(topics) == 5
    assert ("http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"
            in sub.get("supportedProfile", []))
    ops = {o["name"] for o in sub.get("operation", [])}
    assert {"status", "events"} <= ops


def test_metrics_count_deliveries(http, make_client, receiver) -> None:  # type: ignore[no-untyped-def]
    client = make_client(settings={"subscription_endpoints": [receiver.url]})
    h = client.headers()
    pid = patient(http, h, "Ida")
    subscribe(http, h, subscription(receiver.url, filters=(f"Observation?patient=Patient/{pid}",)))
    observation(http, h, pid, 1.0)
    receiver.wait(lambda b: event_numbers(b) == [1])
    deadline = time.monotonic() + 10
    while True:  # counted once the receiver's answer is recorded, just after it arrives
        text = http.get("/metrics").get_data(as_text=True)
        delivered = [line for line in text.splitlines()
                     if line.startswith('fhirserver_subscription_notifications_total{outcome="delivered"}')]
        if delivered or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert delivered and float(delivered[0].split()[-1]) >= 1
    assert "fhirserver_subscription_lag_seconds_count" in text


def test_a_malformed_private_network_setting_stops_the_start_with_the_fix(tmp_path: Path) -> None:
    run = cli("subscription", "list", data_dir=tmp_path / "data", FHIRSERVER_SUBSCRIPTION_PRIVATE_NETWORKS="10.0.0.0/33")
    assert run.returncode != 0
    assert "subscription_private_networks" in run.stderr + run.stdout and "Traceback" not in run.stderr
