"""Graded penalties (issue 15, item 4): alerts about an account add up to warn, limit, suspend.

An account is a client (`client`, its client_id) or a user (`user`, their fhirUser reference,
e.g. Practitioner/7: the identity the audit trail and the alerts name). Its points are the
weights of the alerts about it since its last reinstatement, within `penalty_window_days`:

    snooping low 1, medium 2, high 4; denial-burst 2; cross-border 2

and `penalty_policy` (default `warn:2,limit:6,suspend:10`) maps points to the level in force.
Levels only rise on their own; `fhirserver client|user reinstate` lifts them. Each change is an
alert (`penalty`) and an AuditEvent (subtype penalty-<level> / penalty-lifted).

- warn: flagged in the token response (`fhirserver_warning`) and in `fhirserver penalties list`;
- limit: requests over `penalty_rate` (default 30/minute) are 429 with Retry-After, counted by
  the `limits` library (the engine under Flask-Limiter; memory or Redis storage): the limit
  applies to the authenticated account, so it is checked inside the pipeline, after the token;
- suspend: the client is disabled / the user's accounts are, and their tokens revoked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from limits import parse, storage, strategies
from sqlalchemy import Connection, Engine, select, update

from ..audit.events import AuditRecord
from ..auth.tokens import revoke_client_tokens
from ..clock import now_us
from ..config import Settings
from ..consent.alerts import raise_alert
from ..db.engine import read_connection
from ..db.schema import access_token, account_penalty, app_user, client, consent_alert

LEVELS = ("none", "warn", "limit", "suspend")
WEIGHTS = {"low": 1, "medium": 2, "high": 4}
KIND_WEIGHTS = {"denial-burst": 2, "cross-border": 2}
APP_USERS = 3  # distinct users whose denials make an app's own points
CACHE_SECONDS = 2.0


def parse_policy(text: str) -> list[tuple[int, str]]:
    """`warn:2,limit:6,suspend:10` -> [(2, warn), (6, limit), (10, suspend)]."""
    steps = []
    for part in text.split(","):
        level, _sep, points = part.strip().partition(":")
        if level not in LEVELS[1:] or not points.strip().isdigit():
            raise ValueError(f"penalty_policy: {part.strip()!r} is not <warn|limit|suspend>:<points>")
        steps.append((int(points), level))
    return sorted(steps)


@dataclass
class Change:
    kind: str
    subject: str
    level: str
    points: int


class Penalties:
    def __init__(self, engine: Engine, settings: Settings, audit_append: Callable[[Connection, AuditRecord], object]) -> None:
        self.engine = engine
        self.policy = parse_policy(settings.penalty_policy)
        self.window_us = int(settings.penalty_window_days) * 86_400_000_000
        self.rate = parse(settings.penalty_rate)
        self.gate = strategies.MovingWindowRateLimiter(storage.storage_from_string(settings.rate_limit_storage))
        self.audit_append = audit_append
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[tuple[str, str], str]] = (0.0, {})

    # ---------------------------------------------------------------- reading
    def levels(self, conn: Connection | None = None) -> dict[tuple[str, str], str]:
        """Levels in force (cached for CACHE_SECONDS: the table is tiny, requests are many). A
        request passes its read snapshot, so a refresh opens no transaction of its own."""
        at, cached = self._cache
        if time.monotonic() - at < CACHE_SECONDS:
            return cached
        stmt = select(account_penalty.c.subject_kind, account_penalty.c.subject_id,
                      account_penalty.c.level).where(account_penalty.c.level != "none")
        if conn is not None:
            rows = conn.execute(stmt).all()
        else:
            with read_connection(self.engine) as own:
                rows = own.execute(stmt).all()
        fresh = {(r.subject_kind, r.subject_id): r.level for r in rows}
        self._cache = (time.monotonic(), fresh)
        return fresh

    def level_of(self, kind: str, subject: str) -> str:
        return self.levels().get((kind, subject), "none")

    def retry_after(self, client_id: str, user: str | None, conn: Connection | None = None) -> int | None:
        """None when the request may go on; else seconds until a limited account may try again."""
        levels = self.levels(conn)
        for kind, subject in (("client", client_id), ("user", user)):
            if subject and levels.get((kind, subject)) == "limit" and not self.gate.hit(self.rate, kind, subject):
                reset = self.gate.get_window_stats(self.rate, kind, subject).reset_time
                return max(1, int(reset - time.time()) + 1)
        return None

    def warning(self, client_id: str, user: str | None) -> str | None:
        """What a token response says to an account under a penalty."""
        levels = self.levels()
        for kind, subject in (("client", client_id), ("user", user)):
            level = levels.get((kind, subject or ""))
            if level in ("warn", "limit"):
                return (f"this {kind} is under a privacy penalty ({level}) after alerts about its access; "
                        "contact the privacy office")
        return None

    # ---------------------------------------------------------------- escalating
    def points(self, conn: Connection, kind: str, subject: str, since_us: int) -> int:
        """The weights of the alerts about the account since `since_us`. Denial bursts and refused
        transfers are the account's whose request it was (`consent.alerts.account_of`): a user's
        count against the user, and against the app they used only once APP_USERS or more of its
        users drew such alerts (then the app itself is what misbehaves)."""
        stmt = select(consent_alert.c.kind, consent_alert.c.client_id, consent_alert.c.detail).where(
            consent_alert.c.created_us >= since_us, consent_alert.c.kind.in_(["snooping", *KIND_WEIGHTS]))
        if kind == "client":
            stmt = stmt.where(consent_alert.c.client_id == subject)
        total = 0
        users: dict[str, int] = {}
        for row in conn.execute(stmt).all():
            detail = json.loads(row.detail or "{}")
            if row.kind == "snooping":
                account = detail.get("account")
                if account == (f"Device/{subject}" if kind == "client" else subject):
                    total += WEIGHTS.get(detail.get("severity", "low"), 1)
                continue
            weight = KIND_WEIGHTS[row.kind]
            by_user = detail.get("account_kind") == "user"
            if kind == "user" and by_user and detail.get("account") == subject:
                total += weight
            elif kind == "client" and by_user:
                users[str(detail.get("account"))] = users.get(str(detail.get("account")), 0) + weight
            elif kind == "client":
                total += weight
        if len(users) >= APP_USERS:
            total += sum(users.values())
        return total

    def assess(self, conn: Connection, kind: str, subject: str) -> Change | None:
        """Recompute the account's level from its alerts; apply a rise. None when unchanged. An
        app people sign in to is shared: it rises to `limit` at most on its own, and an alert asks
        an operator for the suspension the points call for (`fhirserver client disable`)."""
        row = conn.execute(select(account_penalty).where(account_penalty.c.subject_kind == kind,
                                                         account_penalty.c.subject_id == subject)).first()
        current = row.level if row is not None else "none"
        reset_us = row.since_us if row is not None and row.level == "none" else 0
        points = self.points(conn, kind, subject, max(reset_us, now_us() - self.window_us))
        level = "none"
        for threshold, name in self.policy:
            if points >= threshold:
                level = name
        if level == "suspend" and kind == "client" and _shared_app(conn, subject):
            if not _operator_asked(conn, subject, reset_us):
                raise_alert(conn, "penalty", subject, None,
                            {"account": subject, "kind": kind, "level": "limit", "points": points,
                             "operator_needed": "suspend: the app is shared by its users (fhirserver client disable)"})
            level = "limit"
        if LEVELS.index(level) <= LEVELS.index(current):
            return None
        self._set(conn, kind, subject, level, f"{points} alert points (policy {self.policy})", row is not None)
        if level == "suspend":
            suspend(conn, kind, subject)
        raise_alert(conn, "penalty", subject if kind == "client" else None, None,
                    {"account": subject, "kind": kind, "level": level, "points": points})
        self._audit(conn, kind, subject, f"penalty-{level}", f"{kind} {subject}: penalty {level} ({points} points)")
        return Change(kind, subject, level, points)

    def reinstate(self, conn: Connection, kind: str, subject: str, by: str) -> str:
        """Lift the penalty (manual): level none from now on, alerts before now no longer count;
        a suspended account is enabled again (its revoked tokens stay revoked)."""
        row = conn.execute(select(account_penalty.c.level).where(account_penalty.c.subject_kind == kind,
                                                                 account_penalty.c.subject_id == subject)).first()
        previous = row.level if row is not None else "none"
        self._set(conn, kind, subject, "none", f"reinstated by {by}", row is not None)
        if kind == "client":
            conn.execute(update(client).where(client.c.client_id == subject).values(disabled=False))
        else:
            conn.execute(update(app_user).where(app_user.c.fhir_user == subject).values(
                disabled=False, failed_logins=0, locked_until_us=None))
        raise_alert(conn, "penalty", subject if kind == "client" else None, None,
                    {"account": subject, "kind": kind, "level": "none", "lifted": previous, "by": by})
        self._audit(conn, kind, subject, "penalty-lifted", f"{kind} {subject}: penalty {previous} lifted by {by}")
        return previous

    def _set(self, conn: Connection, kind: str, subject: str, level: str, reason: str, exists: bool) -> None:
        values = {"level": level, "since_us": now_us(), "reason": reason}
        if exists:
            conn.execute(update(account_penalty).where(account_penalty.c.subject_kind == kind,
                                                       account_penalty.c.subject_id == subject).values(**values))
        else:
            conn.execute(account_penalty.insert().values(subject_kind=kind, subject_id=subject, **values))
        self._cache = (0.0, {})

    def _audit(self, conn: Connection, kind: str, subject: str, code: str, text: str) -> None:
        rec = AuditRecord(interaction="update", request_id=f"penalty-{now_us()}", network_address="localhost",
                          recorded_us=now_us(), status=200, outcome_desc=text)
        rec.subtype_code = ("urn:fhirserver:admin", code, text[:60])
        rec.target = f"Device/{subject}" if kind == "client" else subject
        self.audit_append(conn, rec)

    def listing(self) -> list[dict[str, Any]]:
        with read_connection(self.engine) as conn:
            rows = conn.execute(select(account_penalty).order_by(account_penalty.c.since_us.desc())).all()
        from ..fhir.dates import instant_text

        return [{"kind": r.subject_kind, "account": r.subject_id, "level": r.level, "since": instant_text(r.since_us),
                 "reason": r.reason} for r in rows]


def _shared_app(conn: Connection, client_id: str) -> bool:
    """A SMART app (kind `app`): people sign in to it, so it is shared by all of them."""
    return conn.execute(select(client.c.kind).where(client.c.client_id == client_id)).scalar() == "app"


def _operator_asked(conn: Connection, client_id: str, since_us: int) -> bool:
    rows = conn.execute(select(consent_alert.c.detail).where(
        consent_alert.c.kind == "penalty", consent_alert.c.client_id == client_id,
        consent_alert.c.created_us >= since_us)).scalars()
    return any("operator_needed" in json.loads(d or "{}") for d in rows)


def suspend(conn: Connection, kind: str, subject: str) -> None:
    """Disable the account and revoke its tokens (the client's, or every grant of the user)."""
    if kind == "client":
        conn.execute(update(client).where(client.c.client_id == subject).values(disabled=True))
        revoke_client_tokens(conn, subject)
        return
    from ..auth.grants import revoke_user_families

    for uid in conn.execute(select(app_user.c.id).where(app_user.c.fhir_user == subject)).scalars().all():
        conn.execute(update(app_user).where(app_user.c.id == uid).values(disabled=True))
        revoke_user_families(conn, uid)
    # tokens issued to the user outside a SMART grant (none in normal operation) name them in their context
    conn.execute(update(access_token).where(access_token.c.context.contains(f'"fhirUser": "{subject}"', autoescape=True))
                 .values(revoked=True))
