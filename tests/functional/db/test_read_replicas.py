"""Read replicas (issue 28, item 3) on a real Patroni cluster: GET requests are served by a
streaming replica once it has replayed what the primary had when the request began, so a client
always sees its own writes and a Consent withdrawn through another client is in force at once --
also with replication lag injected (`recovery_min_apply_delay`), when the primary answers instead.
The access record of a replica-served read is on the primary."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_settings
from tests.support.apps import app_with_client
from tests.support.ha import Cluster, Node

pytestmark = pytest.mark.skipif(os.environ.get("FHIRSERVER_TEST_SKIP_HA") == "1",
                                reason="FHIRSERVER_TEST_SKIP_HA=1 (no Patroni/etcd here)")
FHIR_JSON = {"Content-Type": "application/fhir+json"}
SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}



def _replica(cluster: Cluster) -> Node:
    """The asynchronous replica (lag injected there never holds up a commit)."""
    name = next(m["name"] for m in cluster.members() if m["role"] == "replica")
    return next(n for n in cluster.nodes if n.name == name)


def _apply_delay(cluster: Cluster, node: Node, delay: str) -> None:
    """Replication lag on the standbys, set as an operator would (Patroni's dynamic configuration;
    an ALTER SYSTEM on a Patroni node does not stick); returns once `node` applies it."""
    leader = cluster.leader()
    patch = json.dumps({"postgresql": {"parameters": {"recovery_min_apply_delay": delay}}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{leader.rest_port}/config", data=patch, method="PATCH",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    want = "0" if delay in ("0", "0s") else delay
    with psycopg.connect(f"host=127.0.0.1 port={node.pg_port} user=postgres dbname=postgres", autocommit=True) as c:
        deadline = time.time() + 30
        while (c.execute("SHOW recovery_min_apply_delay").fetchone() or [""])[0] != want:
            assert time.time() < deadline, "the standby did not take the new delay"
            time.sleep(0.2)


def _snapshots(client: Any) -> dict[str, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {m[0]: float(m[1]) for m in re.findall(r'fhirserver_read_snapshots_total\{node="(\w+)"\} ([0-9.e+]+)', text)}


@pytest.fixture(scope="module")
def served(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, dict[str, str], Node]]:
    primary = cluster.create_database("replicas")
    node = _replica(cluster)
    replica = f"postgresql+psycopg://postgres@127.0.0.1:{node.pg_port}/replicas"
    app, client, h = app_with_client(make_settings(tmp_path_factory.mktemp("replicas"), primary,
                                                   read_replica_urls=replica))
    yield app, client, h, node
    _apply_delay(cluster, node, "0")
    app.extensions["fhirserver"].engine.dispose()


def _create(client: Any, h: dict[str, str], body: dict[str, Any]) -> str:
    made = client.post(f"/fhir/{body['resourceType']}", data=json.dumps(body), headers={**h, **FHIR_JSON})
    assert made.status_code == 201, made.get_data(as_text=True)
    return str(made.headers["Location"].split(f"/{body['resourceType']}/")[1].split("/")[0])


def test_reads_are_served_by_a_caught_up_replica(served: Any) -> None:
    _app, client, h, _node = served
    pid = _create(client, h, {"resourceType": "Patient", "name": [{"family": "Replica"}]})
    time.sleep(0.5)
    before = _snapshots(client)
    for _ in range(20):
        assert client.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
        time.sleep(0.05)
    after = _snapshots(client)
    assert after.get("replica", 0) - before.get("replica", 0) >= 10, (before, after)


def test_with_replication_lag_a_client_sees_its_own_writes_and_a_withdrawn_consent_at_once(cluster: Cluster,
                                                                                         served: Any) -> None:
    _app, client, h, node = served
    _apply_delay(cluster, node, "3s")
    try:
        pid = _create(client, h, {"resourceType": "Patient", "name": [{"family": "Lagged"}]})
        assert client.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200  # its own write, at once
        obs = _create(client, h, {"resourceType": "Observation", "status": "final", "code": {"text": "lag"},
                                  "subject": {"reference": f"Patient/{pid}"}})
        assert client.get(f"/fhir/Observation/{obs}", headers=h).status_code == 200
        # the patient withdraws consent (through this client here; any client's write counts the same)
        _create(client, h, {"resourceType": "Consent", "status": "active", "scope": SCOPE,
                            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                            "patient": {"reference": f"Patient/{pid}"}, "provision": {"type": "deny"}})
        assert client.get(f"/fhir/Observation/{obs}", headers=h).status_code == 404  # in force at once
        found = client.get("/fhir/Observation", query_string={"subject": f"Patient/{pid}"}, headers=h).get_json()
        assert found["total"] == 0
    finally:
        _apply_delay(cluster, node, "0")


@pytest.fixture
def lagged(cluster: Cluster, served: Any) -> Iterator[None]:
    """The standbys 0.2 s behind for one test."""
    _apply_delay(cluster, served[3], "200ms")
    yield
    _apply_delay(cluster, served[3], "0")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["update", "read", "search", "pause"]), min_size=3, max_size=10))
def test_a_read_after_a_write_by_the_same_client_always_sees_it(served: Any, lagged: None, steps: list[str]) -> None:
    """Interleavings of writes, reads, searches and pauses, the replica 0.2 s behind: every read
    and search shows the latest version this client wrote."""
    _app, client, h, _node = served
    pid = _create(client, h, {"resourceType": "Patient", "name": [{"family": "Interleave"}]})
    version, family = 1, "Interleave"
    for n, step in enumerate(steps):
        if step == "update":
            family = f"Interleave{n}"
            resp = client.put(f"/fhir/Patient/{pid}", headers={**h, **FHIR_JSON},
                              data=json.dumps({"resourceType": "Patient", "id": pid, "name": [{"family": family}]}))
            assert resp.status_code == 200, resp.get_data(as_text=True)
            version += 1
        elif step == "read":
            got = client.get(f"/fhir/Patient/{pid}", headers=h).get_json()
            assert got["meta"]["versionId"] == str(version) and got["name"][0]["family"] == family
        elif step == "search":
            bundle = client.get("/fhir/Patient", query_string={"_id": pid}, headers=h).get_json()
            assert [e["resource"]["meta"]["versionId"] for e in bundle["entry"]] == [str(version)]
        else:
            time.sleep(0.25)  # long enough for the replica to catch up now and then


def test_replicas_need_a_postgresql_primary(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="read replicas are PostgreSQL streaming replicas"):
        app_with_client(make_settings(tmp_path, read_replica_urls="postgresql+psycopg://postgres@127.0.0.1:1/x"))


def test_a_replica_that_is_down_is_passed_over_for_the_primary(tmp_path: Path, postgres: Any) -> None:
    """Nothing listens at the replica's address: GETs are answered from the primary, never a 5xx."""
    from tests.support.live import free_port

    primary = postgres.create_database(f"replica_down_{os.getpid()}")
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    app, client, h = app_with_client(make_settings(tmp_path, primary, read_replica_urls=down))
    try:
        pid = _create(client, h, {"resourceType": "Patient", "name": [{"family": "Fallback"}]})
        before = _snapshots(client)
        for _ in range(3):
            assert client.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
        after = _snapshots(client)
        assert after.get("primary", 0) - before.get("primary", 0) == 3
        assert after.get("replica", 0) == before.get("replica", 0)
    finally:
        app.extensions["fhirserver"].engine.dispose()
