"""A real HTTP endpoint on the loopback interface that records the notifications POSTed to it
(the subscription tests' receiving system). It can be told to answer errors, as a receiver that
is down or failing would."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # {"path", "headers", "body"}
        self.failing = False
        self.delay = 0.0  # seconds to wait before answering (a slow receiver)
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if outer.failing:
                    self.send_response(503)
                    self.end_headers()
                    return
                with outer._lock:
                    outer.received.append({"path": self.path, "headers": dict(self.headers.items()),
                                           "body": json.loads(raw), "raw": raw})
                if outer.delay:
                    time.sleep(outer.delay)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bundles(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            out = [r["body"] for r in self.received]
        return [b for b in out if kind is None or status_of(b)["type"] == kind]

    def wait(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.bundles()
            if predicate(found):
                return found
            time.sleep(0.05)
        raise AssertionError(f"the receiver did not get what was expected in {timeout} s: {self.bundles()}")


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The subscription status parameters of a notification, as a flat dict (events as a list)."""
    params = bundle["entry"][0]["resource"]["parameter"]
    out: dict[str, Any] = {"events": []}
    for p in params:
        if p["name"] == "notification-event":
            ev = {q["name"]: next(v for k, v in q.items() if k.startswith("value")) for q in p["part"]}
            out["events"].append(ev)
        else:
            out[p["name"]] = next(v for k, v in p.items() if k.startswith("value"))
    return out


def event_numbers(bundles: list[dict[str, Any]]) -> list[int]:
    return [int(e["event-number"]) for b in bundles if status_of(b)["type"] == "event-notification"
            for e in status_of(b)["events"]]
