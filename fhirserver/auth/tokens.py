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

from sqlalchemy import Connection, bindparam, insert, select, update

from ..db.schema import access_token, client
from ..search.dates import now_us

_SEL_TOKEN = (
    select(access_token, client.c.name, client.c.organization, client.c.disabled, client.c.settings)
    .join(client, client.c.client_id == access_token.c.client_id)
    .where(access_token.c.token_hash == bindparam("h"))
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


def lookup_token(conn: Connection, token: str) -> tuple[TokenInfo | None, str]:
    """Return (info, "") for a usable token, or (None, reason) otherwise."""
    if not token or len(token) > 512:
        return None, "malformed token"
    row = conn.execute(_SEL_TOKEN, {"h": token_hash(token)}).first()
    if row is None:
        return None, "unknown token"
    if row.revoked:
        return None, "token revoked"
    if row.expires_us <= now_us():
        return None, "token expired"
    if row.disabled:
        return None, "client disabled"
    return TokenInfo(
        token_hash=row.token_hash, client_id=row.client_id, client_name=row.name,
        organization=row.organization, scope=row.scope, expires_us=row.expires_us,
        context=json.loads(row.context) if row.context else {},
        client_settings=json.loads(row.settings) if row.settings else {},
    ), ""


def revoke_client_tokens(conn: Connection, client_id: str) -> None:
    conn.execute(update(access_token).where(access_token.c.client_id == client_id).values(revoked=True))
