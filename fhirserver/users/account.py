"""A signed-in user managing their own account (the portal's security settings): two-step sign-in
(TOTP) enrolment, password change, and the apps they authorized. Administrators have the CLI
(`fhirserver user reset-mfa|disable`); this is the user's own, proving who they are again where
it matters (the current password to change it; a valid code before a TOTP secret is kept)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, or_, select, update

from ..auth.grants import revoke_family
from ..clock import now_us
from ..crypto.datakeys import DataKeyStore
from ..db.engine import read_connection, transaction
from ..db.schema import access_token, app_user, client, grant_family, refresh_token
from ..fhir.dates import instant_text
from .passwords import WeakPasswordError, check_strength, hash_password, verify_password
from .registry import UserError, _require
from .totp import check_code, new_secret, open_secret, provisioning_uri, seal_secret

ENROL_SECONDS = 600  # how long an issued setup key waits for its first code


def start_totp(engine: Engine, keys: DataKeyStore, username: str, issuer: str, current_code: str = "") -> dict[str, str]:
    """Issue a new secret (sealed, held server-side for ENROL_SECONDS) and its otpauth:// URI.
    Replacing a second factor that is on needs a code from it (consumed): a hijacked session must
    not swap the authenticator for its own."""
    record = _require(engine, username)
    if record.totp:
        _prove_current(engine, keys, record.id, record.username, current_code)
    secret = new_secret()
    key_id, sealed = seal_secret(keys, record.username, secret)
    with transaction(engine) as conn:
        conn.execute(update(app_user).where(app_user.c.id == record.id).values(
            totp_pending_key_id=key_id, totp_pending_secret=sealed,
            totp_pending_until_us=now_us() + ENROL_SECONDS * 1_000_000))
    return {"secret": secret, "uri": provisioning_uri(secret, record.username, issuer)}


def _prove_current(engine: Engine, keys: DataKeyStore, uid: int, username: str, code: str) -> None:
    with read_connection(engine) as conn:
        row = conn.execute(select(app_user.c.totp_key_id, app_user.c.totp_secret, app_user.c.totp_last_step)
                           .where(app_user.c.id == uid)).one()
        secret = open_secret(keys, row.totp_key_id, row.totp_secret, username, conn)
    accepted = check_code(secret, code, time.time(), row.totp_last_step)
    if accepted.step is None:
        raise UserError("a code from the authenticator you use now is needed to replace it")
    with transaction(engine) as conn:  # single use, like a sign-in code
        conn.execute(update(app_user).where(app_user.c.id == uid).values(totp_last_step=accepted.step))


def confirm_totp(engine: Engine, keys: DataKeyStore, username: str, code: str) -> None:
    """Keep the secret `start_totp` issued -- never one the client names -- once the user proved
    their authenticator produces its codes. The pending secret is used up: a second confirmation
    (the same code again, or a race) finds none."""
    record = _require(engine, username)
    with read_connection(engine) as conn:
        row = conn.execute(select(app_user.c.totp_pending_key_id, app_user.c.totp_pending_secret,
                                  app_user.c.totp_pending_until_us).where(app_user.c.id == record.id)).one()
        if row.totp_pending_secret is None or (row.totp_pending_until_us or 0) < now_us():
            raise UserError("no two-step sign-in setup is waiting; start again")
        secret = open_secret(keys, row.totp_pending_key_id, row.totp_pending_secret, record.username, conn)
    accepted = check_code(secret, code, time.time(), None)
    if accepted.step is None:
        raise UserError("the code does not match; check the clock of your phone and try again")
    with transaction(engine) as conn:  # the code just shown cannot be used again to sign in
        done = conn.execute(update(app_user).where(
            app_user.c.id == record.id, app_user.c.totp_pending_secret == row.totp_pending_secret).values(
            totp_key_id=row.totp_pending_key_id, totp_secret=row.totp_pending_secret, totp_last_step=accepted.step,
            totp_pending_key_id=None, totp_pending_secret=None, totp_pending_until_us=None))
        if done.rowcount != 1:
            raise UserError("no two-step sign-in setup is waiting; start again")


def change_password(engine: Engine, username: str, current: str, new: str) -> None:
    record = _require(engine, username)
    with read_connection(engine) as conn:
        stored = conn.execute(select(app_user.c.password_hash).where(app_user.c.id == record.id)).scalar_one()
    if not verify_password(stored, current):
        raise UserError("the current password is not right")
    try:
        check_strength(new, user_inputs=[record.username, record.fhir_user.split("/", 1)[1]])
    except WeakPasswordError as exc:
        raise UserError(str(exc)) from exc
    with transaction(engine) as conn:
        conn.execute(update(app_user).where(app_user.c.id == record.id).values(password_hash=hash_password(new)))


def authorizations(engine: Engine, username: str) -> list[dict[str, Any]]:
    """The apps the user authorized that still hold access (newest first)."""
    record = _require(engine, username)
    with read_connection(engine) as conn:
        now = now_us()  # an authorization still holds access while a token of it is alive
        live_access = select(access_token.c.token_hash).where(
            access_token.c.family_id == grant_family.c.family_id, access_token.c.revoked.is_(False),
            access_token.c.expires_us > now).exists()
        live_refresh = select(refresh_token.c.token_hash).where(
            refresh_token.c.family_id == grant_family.c.family_id, refresh_token.c.revoked.is_(False),
            refresh_token.c.rotated.is_(False), refresh_token.c.expires_us > now).exists()
        rows = conn.execute(select(grant_family.c.family_id, grant_family.c.created_us, client.c.name)
                            .join(client, client.c.client_id == grant_family.c.client_id)
                            .where(grant_family.c.user_id == record.id, grant_family.c.revoked.is_(False),
                                   or_(live_access, live_refresh))
                            .order_by(grant_family.c.created_us.desc())).all()
        out = []
        for r in rows:
            scope = conn.execute(select(access_token.c.scope).where(access_token.c.family_id == r.family_id)
                                 .order_by(access_token.c.issued_us.desc()).limit(1)).scalar()
            out.append({"id": r.family_id, "app": r.name, "since": instant_text(r.created_us), "scope": scope or ""})
    return out


def revoke_authorization(engine: Engine, username: str, family_id: str) -> bool:
    """Revoke one of the user's own authorizations (False: not theirs, or unknown)."""
    record = _require(engine, username)
    with transaction(engine) as conn:
        owner = conn.execute(select(grant_family.c.user_id).where(grant_family.c.family_id == family_id)).scalar()
        if owner != record.id:
            return False
        revoke_family(conn, family_id)
    return True
