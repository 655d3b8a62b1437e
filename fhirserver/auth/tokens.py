"""Opaque bearer tokens with server-side lookup.

Why opaque rather than self-contained JWTs: revocation and client disabling take effect on the
very next request on every node (the lookup is one indexed primary-key read), tokens carry no
patient or user data that could leak from logs, and there is no token-signing key to manage.
Only SHA-256 of a token is stored, so a database copy cannot be replayed against the API.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, insert, update

from ..clock import now_us
from ..db import raw as raw_sql
from ..db.schema import access_token

# Every FHIR request runs this lookup: as raw SQL on a pooled connection it costs ~15 us instead
# of ~150 us through SQLAlchemy (statement execution plus a read transaction's BEGIN/ROLLBACK).
# It is one primary-key read, never cached: revocation applies to the very next request.
_RAW_SEL_TOKEN = (
    "SELECT t.token_hash, t.client_id, t.scope, t.expires_us, t.revoked, t.context, "
    "c.name, c.organization, c.disabled, c.settings "
    "FROM access_token t JOIN client c ON c.client_id = t.client_id WHERE t.token_hash = ?"
)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenInfo:
    token_hash: str
    client_id: str
    client_name: str
    organization: str | None
    scope: str
    expires_us: int
    context: dict[str, Any] = field(default_factory=dict)
    client_settings: dict[str, Any] = field(default_factory=dict)


def issue_token(conn: Connection, client_id: str, scope: str, lifetime_s: int,
                context: dict[str, Any] | None = None, family_id: str | None = None) -> tuple[str, int]:
    token = secrets.token_urlsafe(32)
    now = now_us()
    expires = now + lifetime_s * 1_000_000
    conn.execute(insert(access_token).values(
        token_hash=token_hash(token), client_id=client_id, scope=scope, issued_us=now,
        expires_us=expires, revoked=False, context=json.dumps(context or {}), family_id=family_id,
    ))
    return token, expires


def lookup_token(conn: Connection | Engine, token: str) -> tuple[TokenInfo | None, str]:
    """Return (info, "") for a usable token, or (None, reason) otherwise.

    `conn`: an open connection, or an Engine to read on a pooled connection outside any
    transaction (one statement, so it sees the latest committed revocation)."""
    if not token or len(token) > 512:
        return None, "malformed token"
    params = (token_hash(token),)
    if isinstance(conn, Connection):
        row = raw_sql.fetchone(conn, _RAW_SEL_TOKEN, params)
    else:
        row = raw_sql.fetchone_pooled(conn, _RAW_SEL_TOKEN, params)
    if row is None:
        return None, "unknown token"
    hashed, client_id, scope, expires_us, revoked, context, name, organization, disabled, settings = row
    if revoked:
        return None, "token revoked"
    if expires_us <= now_us():
        return None, "token expired"
    if disabled:
        return None, "client disabled"
    return TokenInfo(
        token_hash=hashed, client_id=client_id, client_name=name, organization=organization, scope=scope,
        expires_us=expires_us, context=json.loads(context) if context else {},
        client_settings=json.loads(settings) if settings else {},
    ), ""


def revoke_client_tokens(conn: Connection, client_id: str) -> None:
    conn.execute(update(access_token).where(access_token.c.client_id == client_id).values(revoked=True))
