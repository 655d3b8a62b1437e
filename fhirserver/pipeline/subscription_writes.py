"""Subscription writes (docs/subscriptions.md): the body is admitted before the transaction
(subscriptions/admission.py) and, inside it, the dispatcher's state follows the stored version --
whose snapshot of the owner it delivers as, and the topic -- so the subscription and its state
commit together."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from ..fhir.errors import FhirError
from ..subscriptions import state
from ..subscriptions.admission import admit, criteria_of
from .context import RequestContext

SUBSCRIPTION = "Subscription"


def admitted(ctx: RequestContext, rtype: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body to store for a write of `rtype` (unchanged for every other type)."""
    if rtype != SUBSCRIPTION:
        return body
    if ctx.principal is None:
        raise FhirError(401, "login", "A subscription needs an authenticated owner")
    s = ctx.services
    return admit(body, ctx.principal, s.topics, s.params, s.settings)


def written(ctx: RequestContext, conn: Connection, rtype: str, pk: int, rid: str, body: dict[str, Any] | None) -> None:
    """After a version of `rtype` was written in this transaction (body None: deleted)."""
    if rtype != SUBSCRIPTION:
        return
    if body is None:
        state.retire(conn, pk)
        return
    assert ctx.principal is not None
    s = ctx.services
    crit = criteria_of(body, s.topics, s.params)  # admitted: it parses
    state.register(conn, pk, rid, ctx.principal, str(body.get("criteria", "")), str(body.get("status", "requested")),
                   crit.heartbeat_seconds, crit.channel)
