"""Checking a login: password, lockout, second factor, and the AuditEvent every attempt leaves.

The slow part (one Argon2id verification, ~0.25 s) runs *before* the write transaction, so the
SQLite write lock — which every FHIR request needs for its own AuditEvent — is never held while
hashing. The decision is then taken inside the transaction on a freshly read (row-locked) user
row, where the failure counter, the lockout and the TOTP replay guard are updated and, in
`authenticate_user`, the AuditEvent is appended: if the audit record cannot be written, nothing
commits and the login fails (the exception propagates; callers answer 500).

Every attempt costs one Argon2id verification, whether the user exists, is disabled or locked, so
response times do not tell which usernames exist. A locked or disabled account is refused even
with the right password, and refusals of locked accounts do not prolong the lock (otherwise anyone
could keep a victim locked out forever by retrying).

Lockout policy: `LoginPolicy` (default 5 consecutive failures lock the account for 15 minutes);
a server takes it from the `login_max_failures` and `login_lockout_seconds` keys of its TOML
configuration. A wrong TOTP code counts as a failure like a wrong password; being asked for the
code ("totp-required") does not, and does not reset the count either.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Engine, select, update

from .. import metrics
from ..audit.events import DCM, ENTITY_TYPE, OBJECT_ROLE, AuditRecord
from ..clock import now_us as current_us
from ..config import Settings
from ..crypto.cipher import DecryptionError
from ..crypto.datakeys import DataKeyStore
from ..crypto.keyring import KeyError_
from ..db.engine import read_connection, transaction
from ..db.rows import AnyRow
from ..db.schema import app_user
from .passwords import burn, hash_password, needs_rehash, verify_password
from .registry import UserError, normalize_username
from .totp import KEY_SCOPE, check_code, open_secret

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("fhirserver.users")

Reason = Literal["ok", "unknown-user", "bad-password", "locked", "disabled", "totp-required", "bad-totp"]
USER_ACCOUNT_SYSTEM = "urn:fhirserver:user"


@dataclass(frozen=True)
class LoginPolicy:
    max_failures: int = 5
    lockout_seconds: int = 15 * 60

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginPolicy:
        policy = cls(max_failures=settings.login_max_failures, lockout_seconds=settings.login_lockout_seconds)
        if policy.max_failures < 1 or policy.lockout_seconds < 1:
            raise ValueError("login_max_failures and login_lockout_seconds must be positive")
        return policy


@dataclass(frozen=True)
class LoginResult:
    """The outcome of one attempt. `reason` is for audit and logs; a login page should show the
    same neutral message for every refusal except `totp-required`."""

    ok: bool
    reason: Reason
    username: str
    user_id: int | None = None
    fhir_user: str | None = None
    detail: str = ""
    locked_until_us: int | None = None


@dataclass(frozen=True)
class _Precheck:
    """What was learned outside the transaction: the hash seen and whether the password fits it."""

    name: str | None
    hash_seen: str | None
    password_ok: bool
    new_hash: str | None  # a re-hash with current parameters, when the old ones are outdated


def _stored_hash(engine: Engine, username: str) -> tuple[str | None, str | None]:
    """(normalized name or None, the account's password hash or None)."""
    try:
        name: str | None = normalize_username(username)
    except UserError:
        return None, None
    with read_connection(engine) as conn:
        return name, conn.execute(select(app_user.c.password_hash).where(app_user.c.username == name)).scalar()


def _precheck(engine: Engine, username: str, password: str) -> _Precheck:
    name, stored = _stored_hash(engine, username)
    if stored is None:
        burn(password)
        return _Precheck(name, None, False, None)
    ok = verify_password(stored, password)
    new_hash = hash_password(password) if ok and needs_rehash(stored) else None
    return _Precheck(name, stored, ok, new_hash)


def _fail(conn: Connection, row: AnyRow, reason: Reason, detail: str, policy: LoginPolicy, now: int) -> LoginResult:
    """Count a failure; the one that reaches the limit locks the account and restarts the count."""
    failures = row.failed_logins + 1
    locked_until = None
    if failures >= policy.max_failures:
        locked_until, failures = now + policy.lockout_seconds * 1_000_000, 0
        detail += f"; account locked for {policy.lockout_seconds} s after {policy.max_failures} failures"
    conn.execute(update(app_user).where(app_user.c.id == row.id)
                 .values(failed_logins=failures, locked_until_us=locked_until))
    return LoginResult(False, reason, row.username, row.id, row.fhir_user, detail, locked_until)


def _decide(conn: Connection, pre: _Precheck, password: str, totp_code: str | None, keys: DataKeyStore | None,
            policy: LoginPolicy, now: int) -> LoginResult:
    """Decide on the freshly locked row and update counters (inside the caller's transaction)."""
    row = None
    if pre.name is not None:
        row = conn.execute(select(app_user).where(app_user.c.username == pre.name).with_for_update()).first()
    if row is None:
        return LoginResult(False, "unknown-user", pre.name or "")
    user = {"username": row.username, "user_id": row.id, "fhir_user": row.fhir_user}
    if row.disabled:
        return LoginResult(False, "disabled", **user, detail="account disabled")
    if row.locked_until_us is not None and row.locked_until_us > now:
        return LoginResult(False, "locked", **user, detail="account locked", locked_until_us=row.locked_until_us)
    password_ok, new_hash = pre.password_ok, pre.new_hash
    if row.password_hash != pre.hash_seen:  # changed in between: judge against the current hash
        password_ok, new_hash = verify_password(row.password_hash, password), None
    if not password_ok:
        return _fail(conn, row, "bad-password", "wrong password", policy, now)
    values: dict[str, Any] = {"failed_logins": 0, "locked_until_us": None, "last_login_us": now}
    if new_hash:
        values["password_hash"] = new_hash
    if row.totp_secret is not None:
        if not totp_code:
            return LoginResult(False, "totp-required", **user, detail="password accepted; TOTP code required")
        if keys is None:
            raise ValueError("verifying a TOTP code needs the data key store")
        try:
            secret = open_secret(keys, row.totp_key_id, row.totp_secret, row.username, conn)
        except (DecryptionError, KeyError_):
            log.error("the TOTP secret of user id %s cannot be decrypted", row.id)
            return LoginResult(False, "bad-totp", **user, detail="stored TOTP secret failed authentication")
        check = check_code(secret, totp_code, now / 1e6, row.totp_last_step)
        if check.step is None:
            return _fail(conn, row, "bad-totp", "TOTP code already used" if check.replayed else "wrong TOTP code",
                         policy, now)
        values["totp_last_step"] = check.step
    conn.execute(update(app_user).where(app_user.c.id == row.id).values(**values))
    return LoginResult(True, "ok", **user, detail="login succeeded" + ("; password re-hashed" if new_hash else ""))


def verify_login(engine: Engine, username: str, password: str, totp_code: str | None = None, *,
                 keys: DataKeyStore | None = None, policy: LoginPolicy | None = None,
                 now_us: int | None = None) -> LoginResult:
    """Check one login attempt and update the account's counters; writes no AuditEvent (use
    `authenticate_user` for logins people make). `keys` is needed for users with TOTP."""
    if keys is not None:
        keys.ensure(KEY_SCOPE)  # before the transaction: it may create the key in its own one
    pre = _precheck(engine, username, password)
    with transaction(engine) as conn:
        return _decide(conn, pre, password, totp_code, keys, policy or LoginPolicy(),
                       now_us if now_us is not None else current_us())


def login_audit_record(result: LoginResult, network_address: str, recorded_us: int, request_id: str | None = None,
                       client_id: str | None = None, client_name: str | None = None) -> AuditRecord:
    """A DICOM 110114 User Authentication / 110122 Login AuditEvent, outcome 0 or 4.

    A username that matches no account is not written into the record: people often type their
    password into the username field."""
    rec = AuditRecord(interaction="login", request_id=request_id or str(uuid.uuid4()),
                      network_address=network_address, recorded_us=recorded_us,
                      status=200 if result.ok else 401, client_id=client_id, client_name=client_name,
                      user=result.fhir_user)
    rec.type_code = (DCM, "110114", "User Authentication")
    rec.subtype_code = (DCM, "110122", "Login")
    if result.user_id is not None:
        rec.outcome_desc = f"{result.reason}: {result.detail} (user {result.username})"
        rec.extra_entities.append({
            "what": {"identifier": {"system": USER_ACCOUNT_SYSTEM, "value": result.username}},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "11", "display": "Security User Entity"},
        })
    else:
        rec.outcome_desc = "unknown-user: no such account"
    return rec


def authenticate_user(svc: Services, username: str, password: str, totp: str | None, network_address: str, *,
                      request_id: str | None = None, client_id: str | None = None, client_name: str | None = None,
                      policy: LoginPolicy | None = None, now_us: int | None = None) -> LoginResult:
    """A login as the authorization endpoint performs it: verify, update the counters and append
    the AuditEvent in one transaction. Raises (and nothing commits) if the audit cannot be written.
    `now_us` overrides the clock for the lockout and TOTP decisions (tests); the AuditEvent always
    carries the real time."""
    svc.keys.ensure(KEY_SCOPE)
    policy = policy or LoginPolicy.from_settings(svc.settings)
    started = time.monotonic()
    pre = _precheck(svc.engine, username, password)
    with transaction(svc.engine) as conn:
        recorded = current_us()
        result = _decide(conn, pre, password, totp, svc.keys, policy, now_us if now_us is not None else recorded)
        svc.audit.append(conn, login_audit_record(result, network_address, recorded, request_id, client_id,
                                                  client_name))
    if not result.ok:
        metrics.login_failure(result.reason)
    log.info("login %s for user id %s in %.0f ms", result.reason, result.user_id,
             (time.monotonic() - started) * 1000)
    return result


def authenticate_second_factor(svc: Services, username: str, totp: str, network_address: str, *,
                               request_id: str | None = None, client_id: str | None = None,
                               client_name: str | None = None, policy: LoginPolicy | None = None) -> LoginResult:
    """The TOTP step of a login whose password was accepted moments ago (the login page keeps
    that fact in its signed session, never the password). Same counters, lockout and audit as
    `authenticate_user`; if the password changed in between, the attempt fails."""
    svc.keys.ensure(KEY_SCOPE)
    policy = policy or LoginPolicy.from_settings(svc.settings)
    name, seen = _stored_hash(svc.engine, username)
    pre = _Precheck(name, seen, seen is not None, None)
    with transaction(svc.engine) as conn:
        recorded = current_us()
        result = _decide(conn, pre, "", totp or None, svc.keys, policy, recorded)
        if result.reason == "totp-required":  # an empty code is a wrong code at this step
            result = LoginResult(False, "bad-totp", result.username, result.user_id, result.fhir_user, "no TOTP code")
        svc.audit.append(conn, login_audit_record(result, network_address, recorded, request_id, client_id,
                                                  client_name))
    if not result.ok:
        metrics.login_failure(result.reason)
    return result
