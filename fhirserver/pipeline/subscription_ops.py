"""Subscription/[id]/$status and Subscription/[id]/$events (R4 Subscriptions Backport IG).

Both answer the subscription's owner only (the gate's owner rule: another caller gets the 404 of an
unknown id). `$status` reports the dispatcher's live state (status, events numbered, how far
delivery got, the last error); `$events` replays numbered events, each re-checked through the
caller's access now, so a replay never shows what a notification would withhold today.
"""

from __future__ import annotations

from sqlalchemy import Connection

from ..access import EventRef
from ..clock import now_us
from ..fhir.dates import instant_text
from ..fhir.errors import FhirError
from ..storage.codec import parse_json
from ..subscriptions import state
from ..subscriptions.admission import criteria_of
from ..subscriptions.notification import Item, notification, status_parameters
from .context import RequestContext, Result
from .handler import Handler

MAX_EVENTS = 100
TOKEN_TTL_US = 60_000_000
WEBSOCKET_PATH = "/subscriptions/ws"  # served by notify/websocket.py


def _subscription(ctx: RequestContext, conn: Connection) -> tuple[state.Sub, dict[str, object]]:
    rid = ctx.interaction.id or ""
    stored = ctx.gate.read(conn, "Subscription", rid, preds=ctx.access.search)  # the owner's, or 404
    ctx.capture.touched(stored)
    sub = state.get(conn, rid)
    if sub is None:
        raise FhirError(404, "not-found", f"Subscription/{rid} is not known")
    return sub, parse_json(stored.body or b"{}")


class SubscriptionStatus(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        sub, body = _subscription(ctx, conn)
        base = ctx.services.settings.fhir_base
        status = "off" if sub.status == "off" else sub.status
        params = status_parameters(base, sub.id, str(body.get("criteria", "")), status, "query-status",
                                   sub.events_since_start, [], "empty", sub.last_error if sub.failing_since_us else None)
        params["parameter"].extend([
            {"name": "events-delivered-through", "valueString": str(sub.delivered_through)},
            {"name": "events-withheld", "valueString": str(sub.withheld)},
            {"name": "paused", "valueBoolean": sub.paused},
        ])
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": 1,
                  "entry": [{"fullUrl": f"urn:uuid:{params['id']}", "resource": params,
                             "search": {"mode": "match"}}]}
        return Result(200, bundle)


class SubscriptionEvents(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        sub, body = _subscription(ctx, conn)
        args = dict(ctx.interaction.params)
        try:
            since = int(args.get("eventsSinceNumber", "1"))
            until = int(args.get("eventsUntilNumber", str(sub.events_since_start)))
        except ValueError:
            raise FhirError(400, "invalid", "eventsSinceNumber and eventsUntilNumber are integers") from None
        s = ctx.services
        crit = criteria_of(body, s.topics, s.params)
        content = args.get("content", crit.payload)
        if content not in ("empty", "id-only", "full-resource"):
            raise FhirError(400, "invalid", "content is one of empty, id-only, full-resource")
        events = state.events_after(conn, sub.pk, max(since, 1) - 1, MAX_EVENTS, until)
        refs = {ev.number: EventRef(ev.resource_pk, ev.id, ev.version, crit.patients) for ev in events}
        seen = {rtype: ctx.gate.events(conn, rtype, [refs[ev.number] for ev in events if ev.type == rtype],
                                       crit.filters_for(rtype)) for rtype in {ev.type for ev in events}}
        items: list[Item] = []
        for ev in events:
            stored = seen[ev.type].get(refs[ev.number])
            if stored is None:
                continue  # withheld now: replayed as a notification would be (not at all)
            ctx.capture.touched(stored)
            full = content == "full-resource" and stored.body
            items.append(Item(ev.number, ev.recorded_us, ev.type, ev.id, ev.version, ev.method,
                              parse_json(stored.body) if full and stored.body else None))
        bundle = notification(s.settings.fhir_base, sub.id, str(body.get("criteria", "")), sub.status,
                              "query-event", sub.events_since_start, items, content, now_us())
        return Result(200, bundle)


class BindingToken(Handler):
    """Subscription/[id]/$get-ws-binding-token: a one-time token (valid a minute) the owner's
    client sends as `bind-with-token: <token>` on the websocket to receive its notifications."""

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        sub, _body = _subscription(ctx, conn)
        if sub.channel != "websocket":
            raise FhirError(422, "processing", "This subscription's channel is not a websocket")
        now = now_us()
        token = state.issue_token(conn, sub.pk, now, TOKEN_TTL_US)
        root = ctx.services.settings.public_root
        url = ("wss://" + root[len("https://"):] if root.startswith("https://") else "ws://" + root.split("://", 1)[-1])
        return Result(200, {"resourceType": "Parameters", "parameter": [
            {"name": "token", "valueString": token},
            {"name": "expiration", "valueDateTime": instant_text(now + TOKEN_TTL_US)},
            {"name": "subscription", "valueString": sub.id},
            {"name": "websocket-url", "valueUrl": f"{url}{WEBSOCKET_PATH}"},
        ]})
