"""The websocket channel over a real socket (docs/subscriptions.md): $get-ws-binding-token, bind,
the handshake, numbered notifications, one-time tokens, the owner rule, and a reconnect that
picks up where delivery stopped."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import simple_websocket
from werkzeug.serving import make_server

from fhirserver.config import Settings
from tests.conftest import make_settings

from .test_rest_hook import observation, patient, subscribe, subscription


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path, db_url, subscription_poll_seconds=0.05)


@pytest.fixture
def ws_port(app: Any) -> Iterator[int]:
    """The app served on a loopback port by Werkzeug (threaded), for real websocket connections."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()


def token_for(http: Any, headers: dict[str, str], sid: str) -> dict[str, str]:
    resp = http.get(f"/fhir/Subscription/{sid}/$get-ws-binding-token", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in resp.get_json()["parameter"]}


def status(bundle: dict[str, Any]) -> dict[str, Any]:
    params = bundle["entry"][0]["resource"]["parameter"]
    out: dict[str, Any] = {p["name"]: next((v for k, v in p.items() if k.startswith("value")), None) for p in params}
    out["numbers"] = [int(q["valueString"]) for p in params if p["name"] == "notification-event"
                      for q in p["part"] if q["name"] == "event-number"]
    return out


def receive(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        message = ws.receive(timeout=15)
        assert message is not None, f"no {kind} within 15 s"
        bundle = json.loads(message)
        if status(bundle)["type"] == kind:
            return dict(bundle)


def test_bind_then_handshake_and_numbered_notifications_over_the_socket(http, make_client, ws_port) -> None:  # type: ignore[no-untyped-def]
    client = make_client()
    h = client.headers()
    pid = patient(http, h, "Wes")
    sid = subscribe(http, h, {**subscription("", filters=(f"Observation?patient=Patient/{pid}",)),
                              "channel": {"type": "websocket", "payload": "application/fhir+json"}})
    params = token_for(http, h, sid)
    assert params["subscription"] == sid and params["websocket-url"].endswith("/subscriptions/ws")
    url = f"ws://127.0.0.1:{ws_port}/subscriptions/ws"
    ws = simple_websocket.Client.connect(url)
    try:
        ws.send(f"bind-with-token: {params['token']}")
        hello = receive(ws, "handshake")
        assert hello["entry"][0]["resource"]["parameter"][0]["valueReference"]["reference"].endswith(sid)
        first = observation(http, h, pid, 1.0)
        note = receive(ws, "event-notification")
        assert status(note)["numbers"] == [1]
        assert note["entry"][1]["fullUrl"].endswith(f"/Observation/{first}")
    finally:
        ws.close()
    # the token was spent: binding with it again is refused
    again = simple_websocket.Client.connect(url)
    again.send(f"bind-with-token: {params['token']}")
    with pytest.raises(simple_websocket.ConnectionClosed):
        again.receive(timeout=10)
    # while nobody listens, events wait; a new binding gets a handshake, then them
    second = observation(http, h, pid, 2.0)
    ws = simple_websocket.Client.connect(url)
    try:
        ws.send(f"bind-with-token: {token_for(http, h, sid)['token']}")
        receive(ws, "handshake")
        note = receive(ws, "event-notification")
        assert status(note)["numbers"] == [2] and note["entry"][1]["fullUrl"].endswith(f"/Observation/{second}")
    finally:
        ws.close()


def test_binding_tokens_are_the_owners_alone(http, make_client) -> None:  # type: ignore[no-untyped-def]
    owner, other = make_client(), make_client()
    sid = subscribe(http, owner.headers(), {**subscription(""), "channel": {"type": "websocket"}})
    denied = http.get(f"/fhir/Subscription/{sid}/$get-ws-binding-token", headers=other.headers())
    assert denied.status_code == 404 and denied.get_json()["resourceType"] == "OperationOutcome"
    hook_client = make_client(settings={"subscription_endpoints": ["https://1.1.1.1/hook"]})
    hook = subscribe(http, hook_client.headers(), {**subscription("https://1.1.1.1/hook"), "status": "off"})
    not_ws = http.get(f"/fhir/Subscription/{hook}/$get-ws-binding-token", headers=hook_client.headers())
    assert not_ws.status_code == 422


def test_a_bad_token_closes_the_socket(ws_port) -> None:  # type: ignore[no-untyped-def]
    ws = simple_websocket.Client.connect(f"ws://127.0.0.1:{ws_port}/subscriptions/ws")
    ws.send("bind-with-token: not-a-token")
    with pytest.raises(simple_websocket.ConnectionClosed):
        ws.receive(timeout=10)
