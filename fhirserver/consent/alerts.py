"""The privacy alert feed: break-the-glass use, consent-exempt access, denial bursts and automatic
client suspensions. Alerts are rows of `consent_alert`, written in the same transaction as the
AuditEvent of the request that raised them; listed by `fhirserver alerts list` and
`GET /api/admin/alerts`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from ..clock import now_us
from ..db.engine import read_connection
from ..db.schema import access_denial, app_user, client, consent_alert
from ..fhir.dates import instant_text

KINDS = ("break-glass", "consent-exempt", "denial-burst", "client-suspended", "cross-border", "snooping", "penalty",
         "auth-failure-burst")
WINDOW_US = 60_000_000


@dataclass
class Alert:
    id: int
    created: str
    kind: str
    client_id: str | None
    request_id: str | None
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "kind": self.kind, "client_id": self.client_id,
                "request_id": self.request_id, "detail": self.detail}


def raise_alert(conn: Connection, kind: str, client_id: str | None, request_id: str | None,
                detail: dict[str, Any]) -> None:
    conn.execute(insert(consent_alert).values(created_us=now_us(), kind=kind, client_id=client_id,
                                              request_id=request_id, detail=json.dumps(detail, sort_keys=True)))


def list_alerts(engine: Engine, kind: str | None = None, client_id: str | None = None,
                since_us: int | None = None, limit: int = 100) -> list[Alert]:
    stmt = select(consent_alert).order_by(consent_alert.c.id.desc()).limit(max(1, min(limit, 1000)))
    if kind:
        stmt = stmt.where(consent_alert.c.kind == kind)
    if client_id:
        stmt = stmt.where(consent_alert.c.client_id == client_id)
    if since_us is not None:
        stmt = stmt.where(consent_alert.c.created_us >= since_us)
    with read_connection(engine) as conn:
        rows = conn.execute(stmt).all()
    return [Alert(r.id, instant_text(r.created_us), r.kind, r.client_id, r.request_id,
                  json.loads(r.detail) if r.detail else {}) for r in rows]


def account_of(client_id: str, user: str | None) -> tuple[str, str]:
    """Whom a request's denials count against: the signed-in person of a user-level token (an app
    many people use is not to blame for one of them), else the client."""
    return ("user", user) if user else ("client", client_id)


def note_denial(conn: Connection, client_id: str, user: str | None, request_id: str, threshold: int,
                suspend: bool) -> str | None:
    """Count one denied request against its account (`account_of`); returns "burst" or
    "suspended" when this one crossed the threshold within a minute. A burst is an alert naming
    the account; with `suspend`, the person's accounts (a user) or a backend client are disabled
    and their tokens revoked -- an app that people sign in to is shared, so its suspension is left
    to an operator (the alert says so)."""
    kind, subject = account_of(client_id, user)
    account = f"{kind}:{subject}"
    now = now_us()
    conn.execute(delete(access_denial).where(access_denial.c.at_us < now - WINDOW_US))
    conn.execute(insert(access_denial).values(client_id=client_id, account=account, at_us=now))
    if threshold <= 0:
        return None
    recent = conn.execute(select(func.count()).select_from(access_denial).where(
        access_denial.c.account == account, access_denial.c.at_us >= now - WINDOW_US)).scalar_one()
    if recent < threshold:
        return None
    earlier = select(consent_alert.c.detail).where(
        consent_alert.c.client_id == client_id, consent_alert.c.kind == "denial-burst",
        consent_alert.c.created_us >= now - WINDOW_US)
    if any(json.loads(d or "{}").get("account") == subject for d in conn.execute(earlier).scalars()):
        return None
    detail: dict[str, Any] = {"denied_requests": recent, "window_seconds": WINDOW_US // 1_000_000,
                              "threshold": threshold, "account": subject, "account_kind": kind}
    shared = kind == "client" and conn.execute(select(client.c.kind).where(client.c.client_id == client_id)).scalar() == "app"
    if suspend and shared:
        detail["operator_needed"] = "suspend: the app is shared by its users (fhirserver client disable)"
    raise_alert(conn, "denial-burst", client_id, request_id, detail)
    if not suspend or shared:
        return "burst"
    reason = f"{recent} denied requests within {WINDOW_US // 1_000_000} s (threshold {threshold})"
    if kind == "user":
        from ..auth.grants import revoke_user_families

        for uid in conn.execute(select(app_user.c.id).where(app_user.c.fhir_user == subject)).scalars().all():
            conn.execute(update(app_user).where(app_user.c.id == uid).values(disabled=True))
            revoke_user_families(conn, uid)
        raise_alert(conn, "client-suspended", client_id, request_id, {"reason": reason, "user": subject})
        return "suspended"
    from ..auth.tokens import revoke_client_tokens

    conn.execute(update(client).where(client.c.client_id == client_id).values(disabled=True))
    revoke_client_tokens(conn, client_id)
    raise_alert(conn, "client-suspended", client_id, request_id, {"reason": reason})
    return "suspended"


def note_auth_failure(conn: Connection, endpoint: str, claimed: str | None, known: bool, address: str,
                      request_id: str, threshold: int) -> bool:
    """Count one refused client authentication at an OAuth endpoint (token, introspection,
    revocation) under the client id it claimed and under the caller's address; True when this one
    made either cross `threshold` within a minute, which raises one `auth-failure-burst` alert
    per counter and minute. The claimed client may be the victim of someone forging its id, so the
    alert names it without counting against it (no penalty points)."""
    now = now_us()
    counters = [f"auth-address:{address[:200]}"]
    if claimed:
        counters.append(f"auth-client:{claimed[:200]}")
    client_id = claimed[:64] if claimed and known else ""
    conn.execute(delete(access_denial).where(access_denial.c.at_us < now - WINDOW_US))
    for account in counters:
        conn.execute(insert(access_denial).values(client_id=client_id, account=account, at_us=now))
    if threshold <= 0:
        return False
    raised = False
    for account in counters:
        recent = conn.execute(select(func.count()).select_from(access_denial).where(
            access_denial.c.account == account, access_denial.c.at_us >= now - WINDOW_US)).scalar_one()
        if recent < threshold:
            continue
        earlier = conn.execute(select(consent_alert.c.detail).where(
            consent_alert.c.kind == "auth-failure-burst", consent_alert.c.created_us >= now - WINDOW_US)).scalars()
        key = account.split(":", 1)
        if any(_counter_of(json.loads(d or "{}")) == (key[0], key[1]) for d in earlier):
            continue  # one alert per counter and minute
        raise_alert(conn, "auth-failure-burst", client_id or None, request_id,
                    {"endpoint": endpoint, "counted_by": account.split(":", 1)[0], "claimed_client": claimed,
                     "claimed_client_registered": known, "address": address, "failures": recent,
                     "window_seconds": WINDOW_US // 1_000_000})
        raised = True
    return raised


def _counter_of(detail: dict[str, Any]) -> tuple[str, str]:
    kind = str(detail.get("counted_by", ""))
    return kind, str(detail.get("claimed_client") if kind == "auth-client" else detail.get("address"))[:200]
