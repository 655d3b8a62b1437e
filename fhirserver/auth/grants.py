"""Server-side state of SMART App Launch grants: authorization codes, refresh tokens, launch
contexts and the "family" that ties everything minted from one user approval together.

Codes, refresh tokens and launch ids are stored only as SHA-256. Each is single use, and the
claim is one conditional UPDATE (`... WHERE used = false`), so two racing requests cannot both
win. Presenting a spent code or a rotated refresh token is treated as theft: the whole family
(every access and refresh token from that approval) is revoked at once (RFC 6749 4.1.2, OAuth
2.0 Security BCP 4.14).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, insert, select, update

from ..clock import now_us
from ..db.engine import read_connection, transaction
from ..db.schema import access_token, authorization_code, grant_family, launch_context, refresh_token
from .tokens import token_hash

REFRESH_SCOPES = ("offline_access", "online_access")



class ClientWithId(Protocol):
    """An OAuth client as Authlib passes it (smart.server.OAuthClient)."""

    def get_client_id(self) -> str: ...

@dataclass
class GrantContext:
    """Who approved what, in which launch context: travels from the approval page through the
    code into every token of the family (and is what `Principal` reads back)."""

    user_id: int
    username: str
    fhir_user: str
    scope: str = ""
    patient: str | None = None
    encounter: str | None = None
    linked_patients: list[str] = field(default_factory=list)
    need_patient_banner: bool = True
    auth_time: int = 0  # seconds since the epoch
    family_id: str = ""
    launch: bool = False  # came from an EHR launch

    def token_context(self, grant_type: str) -> dict[str, Any]:
        ctx: dict[str, Any] = {"grant_type": grant_type, "user": self.username, "user_id": self.user_id,
                               "fhirUser": self.fhir_user, "linked_patients": self.linked_patients}
        if self.patient:
            ctx["patient"] = self.patient
        if self.encounter:
            ctx["encounter"] = self.encounter
        return ctx

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GrantContext:
        return cls(**json.loads(text))


@dataclass
class StoredCode:
    """An authorization code row, shaped as Authlib's AuthorizationCodeMixin expects."""

    code_hash: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    nonce: str | None
    context: GrantContext
    expires_us: int
    code_challenge_method: str = "S256"

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.context.auth_time

    def get_acr(self) -> str | None:
        return None

    def get_amr(self) -> list[str] | None:
        return None


@dataclass
class StoredToken:
    """An access or refresh token row, for the refresh grant, introspection and revocation."""

    kind: str  # access | refresh
    token_hash: str
    client_id: str
    scope: str
    issued_us: int
    expires_us: int
    revoked: bool
    family_id: str | None
    context: dict[str, Any]
    rotated: bool = False

    def get_scope(self) -> str:
        return self.scope

    def check_client(self, client: ClientWithId | None) -> bool:
        return client is not None and client.get_client_id() == self.client_id

    def is_expired(self) -> bool:
        return self.expires_us <= now_us()

    def is_revoked(self) -> bool:
        return self.revoked or self.rotated


# ---- families

def new_family(conn: Connection, client_id: str, user_id: int | None) -> str:
    family = secrets.token_urlsafe(24)
    conn.execute(insert(grant_family).values(family_id=family, client_id=client_id, user_id=user_id,
                                             revoked=False, created_us=now_us()))
    return family


def revoke_family(conn: Connection, family_id: str) -> None:
    conn.execute(update(grant_family).where(grant_family.c.family_id == family_id).values(revoked=True))
    conn.execute(update(access_token).where(access_token.c.family_id == family_id).values(revoked=True))
    conn.execute(update(refresh_token).where(refresh_token.c.family_id == family_id).values(revoked=True))


def revoke_user_families(conn: Connection, user_id: int) -> int:
    """Revoke every grant a user made (used when the account is disabled)."""
    families = conn.execute(select(grant_family.c.family_id).where(
        grant_family.c.user_id == user_id, grant_family.c.revoked.is_(False))).scalars().all()
    for fam in families:
        revoke_family(conn, fam)
    return len(families)


def family_revoked(conn: Connection, family_id: str) -> bool:
    row = conn.execute(select(grant_family.c.revoked).where(grant_family.c.family_id == family_id)).first()
    return row is None or bool(row.revoked)


# ---- authorization codes

def save_code(conn: Connection, code: str, client_id: str, redirect_uri: str, challenge: str,
              nonce: str | None, ctx: GrantContext, lifetime_s: int) -> None:
    conn.execute(insert(authorization_code).values(
        code_hash=token_hash(code), client_id=client_id, family_id=ctx.family_id, redirect_uri=redirect_uri,
        scope=ctx.scope, code_challenge=challenge, nonce=nonce, context=ctx.to_json(),
        expires_us=now_us() + lifetime_s * 1_000_000, used=False,
    ))


def find_code(engine: Engine, code: str, client_id: str) -> StoredCode | None:
    """A usable code for this client. Presenting a spent one revokes its family."""
    h = token_hash(code)
    with read_connection(engine) as conn:
        row = conn.execute(select(authorization_code).where(authorization_code.c.code_hash == h)).first()
    if row is None or row.client_id != client_id:
        return None
    if row.used:
        with transaction(engine) as conn:
            revoke_family(conn, row.family_id)
        return None
    if row.expires_us <= now_us():
        return None
    return StoredCode(row.code_hash, row.client_id, row.redirect_uri, row.scope, row.code_challenge, row.nonce,
                      GrantContext.from_json(row.context), row.expires_us)


def claim_code(conn: Connection, code: StoredCode) -> bool:
    """Mark the code used; False if another request got there first (then the family is revoked)."""
    res = conn.execute(update(authorization_code).where(
        authorization_code.c.code_hash == code.code_hash, authorization_code.c.used.is_(False)).values(used=True))
    if res.rowcount != 1:
        revoke_family(conn, code.context.family_id)
        return False
    return not family_revoked(conn, code.context.family_id)


def nonce_used(engine: Engine, client_id: str, nonce: str) -> bool:
    with read_connection(engine) as conn:
        return conn.execute(select(authorization_code.c.code_hash).where(
            authorization_code.c.client_id == client_id, authorization_code.c.nonce == nonce)).first() is not None


# ---- refresh tokens

def issue_refresh(conn: Connection, client_id: str, ctx: GrantContext, scope: str, lifetime_s: int) -> str:
    token = secrets.token_urlsafe(32)
    now = now_us()
    conn.execute(insert(refresh_token).values(
        token_hash=token_hash(token), client_id=client_id, family_id=ctx.family_id, scope=scope,
        context=ctx.to_json(), issued_us=now, expires_us=now + lifetime_s * 1_000_000, rotated=False,
        revoked=False,
    ))
    return token


def find_token(engine: Engine, token: str, hint: str | None = None) -> StoredToken | None:
    """Look a token string up as an access or a refresh token (hint first)."""
    h = token_hash(token)
    order = ["refresh", "access"] if hint == "refresh_token" else ["access", "refresh"]
    with read_connection(engine) as conn:
        for kind in order:
            if kind == "access":
                row = conn.execute(select(access_token).where(access_token.c.token_hash == h)).first()
                if row is not None:
                    return StoredToken("access", h, row.client_id, row.scope, row.issued_us, row.expires_us,
                                       bool(row.revoked), row.family_id,
                                       json.loads(row.context) if row.context else {})
            else:
                row = conn.execute(select(refresh_token).where(refresh_token.c.token_hash == h)).first()
                if row is not None:
                    return StoredToken("refresh", h, row.client_id, row.scope, row.issued_us, row.expires_us,
                                       bool(row.revoked), row.family_id, json.loads(row.context),
                                       rotated=bool(row.rotated))
    return None


def find_refresh(engine: Engine, token: str) -> StoredToken | None:
    """A usable refresh token. Presenting a rotated (already used) one revokes its family."""
    found = find_token(engine, token, "refresh_token")
    if found is None or found.kind != "refresh":
        return None
    if found.rotated and not found.revoked and found.family_id:
        with transaction(engine) as conn:
            revoke_family(conn, found.family_id)
        return None
    if found.revoked or found.is_expired():
        return None
    return found


def claim_refresh(conn: Connection, token: StoredToken) -> bool:
    res = conn.execute(update(refresh_token).where(
        refresh_token.c.token_hash == token.token_hash, refresh_token.c.rotated.is_(False),
        refresh_token.c.revoked.is_(False)).values(rotated=True))
    if res.rowcount != 1:
        if token.family_id:
            revoke_family(conn, token.family_id)
        return False
    return not (token.family_id and family_revoked(conn, token.family_id))


def revoke_token(conn: Connection, token: StoredToken) -> None:
    """RFC 7009: revoking a refresh token also revokes the access tokens of the same grant."""
    if token.kind == "refresh" and token.family_id:
        revoke_family(conn, token.family_id)
    elif token.kind == "refresh":
        conn.execute(update(refresh_token).where(refresh_token.c.token_hash == token.token_hash).values(revoked=True))
    else:
        conn.execute(update(access_token).where(access_token.c.token_hash == token.token_hash).values(revoked=True))


# ---- EHR launch contexts

def create_launch(engine: Engine, client_id: str, context: dict[str, Any], lifetime_s: int) -> str:
    launch = secrets.token_urlsafe(24)
    with transaction(engine) as conn:
        conn.execute(insert(launch_context).values(
            launch_hash=token_hash(launch), client_id=client_id, context=json.dumps(context),
            expires_us=now_us() + lifetime_s * 1_000_000, used=False))
    return launch


def claim_launch(engine: Engine, launch: str, client_id: str) -> dict[str, Any] | None:
    """The launch context, consumed; None if unknown, expired, used or for another client."""
    if not launch or len(launch) > 200:
        return None
    h = token_hash(launch)
    with transaction(engine) as conn:
        row = conn.execute(select(launch_context).where(launch_context.c.launch_hash == h)).first()
        if row is None or row.client_id != client_id or row.used or row.expires_us <= now_us():
            return None
        conn.execute(update(launch_context).where(launch_context.c.launch_hash == h).values(used=True))
    context: dict[str, Any] = json.loads(row.context)
    return context
