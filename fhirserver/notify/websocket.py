"""The websocket channel (R4 Subscriptions Backport IG; docs/subscriptions.md): a client gets a
one-time token from `Subscription/[id]/$get-ws-binding-token`, connects to `/subscriptions/ws`
and sends `bind-with-token: <token>`. The connection's thread then serves that subscription as
the dispatcher serves a rest-hook (a lease, each event re-checked through the owner's gate, an
access record before each send) -- a handshake first, then notifications and heartbeats as text
frames. A websocket send has no acknowledgement: a client that reconnects asks `$events` for
numbers it missed.

Served by flask-sock on gunicorn's gthread workers (`fhirserver serve`): each open websocket holds
one worker thread, so `--threads` bounds the connections per worker.
"""

from __future__ import annotations

import logging

from flask import Flask, request
from flask_sock import ConnectionClosed, Sock

from ..clock import now_us
from ..db.engine import read_connection, transaction
from ..pipeline.subscription_ops import WEBSOCKET_PATH
from ..services import Services
from ..subscriptions import state
from .channels import DeliveryFailed
from .dispatcher import Dispatcher

log = logging.getLogger("fhirserver.subscriptions")
BIND_WAIT_S = 30.0


class WebSocketChannel:
    def __init__(self, ws: object, address: str, subscription_id: str) -> None:
        self.ws = ws
        self.address = address
        self.destination = f"websocket of Subscription/{subscription_id}"

    def send(self, payload: bytes) -> None:
        try:
            self.ws.send(payload.decode())  # type: ignore[attr-defined]
        except (ConnectionClosed, OSError):
            raise DeliveryFailed("the websocket closed") from None


def install(app: Flask, svc: Services) -> None:
    sock = Sock(app)

    @sock.route(WEBSOCKET_PATH)
    def subscription_socket(ws: object) -> None:
        dispatcher = Dispatcher(svc)
        try:
            message = ws.receive(timeout=BIND_WAIT_S)  # type: ignore[attr-defined]
        except ConnectionClosed:
            return
        token = str(message or "").partition("bind-with-token:")[2].strip()
        with transaction(svc.engine) as conn:
            pk = state.redeem_token(conn, token, now_us()) if token else None
            if pk is not None:
                state.rebind(conn, pk)
        if pk is None:
            ws.close(reason=1008, message="bind-with-token: a valid token from $get-ws-binding-token")  # type: ignore[attr-defined]
            return
        address = request.remote_addr or ""
        poll = svc.settings.subscription_poll_seconds
        try:
            while True:
                sub = None
                with read_connection(svc.engine) as conn:  # idle: a read, no write lock per poll
                    due = state.any_due(conn, now_us(), "websocket", pk)
                    current = state.get_by_pk(conn, pk)
                if due:
                    with transaction(svc.engine) as conn:
                        sub = state.claim_due(conn, dispatcher.worker, now_us(), dispatcher.lease_us, "websocket", pk)
                if sub is not None:
                    with read_connection(svc.engine) as conn:
                        crit = dispatcher.criteria(conn, sub)
                    owner = dispatcher.owner(sub)
                    if crit is None or owner is None:
                        ws.close(reason=1008, message="the subscription is no longer valid")  # type: ignore[attr-defined]
                        return
                    if not dispatcher.serve(sub, crit, owner, WebSocketChannel(ws, address, sub.id)):
                        return
                    continue
                if current is None or current.status not in state.LIVE:
                    ws.close(reason=1000, message="the subscription ended")  # type: ignore[attr-defined]
                    return
                try:
                    ws.receive(timeout=poll)  # type: ignore[attr-defined]  # wait; notices a closed socket
                except ConnectionClosed:
                    return
        finally:
            with transaction(svc.engine) as conn:
                state.release(conn, pk, dispatcher.worker)
