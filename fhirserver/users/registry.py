"""The user registry: people who sign in to launch SMART apps, and the patients they may act for.

A user is a username, an Argon2id password hash, the FHIR resource the person is
(`Practitioner/..`, `Patient/..` or `RelatedPerson/..`, later the `fhirUser` claim) and optionally
a TOTP second factor. Links name further patients a user may act for: `guardian` (a parent for a
minor) or `proxy` (someone the patient has authorized). Nothing here returns a hash or a secret
except the freshly generated TOTP secret, which the caller shows once.

Usernames are case-insensitive (stored lower-cased): "Alice" and "alice" must not be two accounts
that a person could confuse on a login page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..clock import now_us
from ..crypto.datakeys import DataKeyStore
from ..db.engine import read_connection, transaction
from ..db.rows import AnyRow
from ..db.schema import app_user, user_patient_link
from .passwords import WeakPasswordError, check_strength, hash_password
from .totp import new_secret, seal_secret

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@+-]{0,127}$")
FHIR_ID = r"[A-Za-z0-9\-.]{1,64}"
FHIR_USER_RE = re.compile(rf"^(Practitioner|Patient|RelatedPerson)/({FHIR_ID})$")
PATIENT_RE = re.compile(rf"^(?:Patient/)?({FHIR_ID})$")
RELATIONSHIPS = ("guardian", "proxy")


class UserError(ValueError):
    """A refused user operation; the message is fit to show an administrator."""


@dataclass
class PatientLink:
    patient_id: str
    relationship: str

    @property
    def reference(self) -> str:
        return f"Patient/{self.patient_id}"


@dataclass
class UserRecord:
    """A user as the rest of the server sees it: no password hash, no TOTP secret."""

    id: int
    username: str
    fhir_user: str
    totp: bool
    disabled: bool
    failed_logins: int
    locked_until_us: int | None
    last_login_us: int | None
    created_us: int
    links: list[PatientLink] = field(default_factory=list)

    @classmethod
    def from_row(cls, row: AnyRow, links: list[PatientLink] | None = None) -> UserRecord:
        return cls(id=row.id, username=row.username, fhir_user=row.fhir_user, totp=row.totp_secret is not None,
                   disabled=row.disabled, failed_logins=row.failed_logins, locked_until_us=row.locked_until_us,
                   last_login_us=row.last_login_us, created_us=row.created_us, links=links or [])

    def locked(self, at_us: int | None = None) -> bool:
        return self.locked_until_us is not None and self.locked_until_us > (at_us if at_us is not None else now_us())


def normalize_username(username: str) -> str:
    """The stored form of a username; raises UserError if it is not acceptable."""
    name = (username or "").strip().lower()
    if not USERNAME_RE.match(name):
        raise UserError("a username is 1-128 characters: letters, digits and . _ @ + - (starting with a letter or digit)")
    return name


def check_fhir_user(fhir_user: str) -> str:
    if not FHIR_USER_RE.match(fhir_user or ""):
        raise UserError(f"fhir-user must be Practitioner/ID, Patient/ID or RelatedPerson/ID, not {fhir_user!r}")
    return fhir_user


def patient_id_of(patient: str) -> str:
    """`Patient/123` or `123` -> `123`; raises UserError otherwise."""
    m = PATIENT_RE.match(patient or "")
    if not m:
        raise UserError(f"patient must be Patient/ID, not {patient!r}")
    return m.group(1)


_COLUMNS = [app_user.c.id, app_user.c.username, app_user.c.fhir_user, app_user.c.totp_secret, app_user.c.disabled,
            app_user.c.failed_logins, app_user.c.locked_until_us, app_user.c.last_login_us, app_user.c.created_us]


def create_user(engine: Engine, keys: DataKeyStore, username: str, password: str, fhir_user: str,
                totp: bool = False) -> tuple[UserRecord, str | None]:
    """Create a user; returns the record and, with `totp`, the new TOTP secret (to show once)."""
    name = normalize_username(username)
    check_fhir_user(fhir_user)
    try:
        check_strength(password, user_inputs=[name, *re.split(r"[._@+-]", name), fhir_user.split("/", 1)[1]])
    except WeakPasswordError as exc:
        raise UserError(str(exc)) from exc
    if get_user(engine, name) is not None:
        raise UserError(f"a user named {name} already exists")
    secret = new_secret() if totp else None
    key_id, sealed = seal_secret(keys, name, secret) if secret else (None, None)
    password_hash = hash_password(password)
    try:
        with transaction(engine) as conn:
            conn.execute(insert(app_user).values(
                username=name, password_hash=password_hash, fhir_user=fhir_user, totp_key_id=key_id,
                totp_secret=sealed, totp_last_step=None, disabled=False, failed_logins=0, locked_until_us=None,
                last_login_us=None, created_us=now_us(),
            ))
    except IntegrityError as exc:  # created concurrently
        raise UserError(f"a user named {name} already exists") from exc
    record = get_user(engine, name)
    assert record is not None
    return record, secret


def _links(conn: Connection, user_ids: list[int]) -> dict[int, list[PatientLink]]:
    out: dict[int, list[PatientLink]] = {uid: [] for uid in user_ids}
    if not user_ids:
        return out
    rows = conn.execute(select(user_patient_link).where(user_patient_link.c.user_id.in_(user_ids))
                        .order_by(user_patient_link.c.patient_id)).all()
    for r in rows:
        out[r.user_id].append(PatientLink(r.patient_id, r.relationship))
    return out


def get_user(engine: Engine, username: str) -> UserRecord | None:
    """The user with this name (any case), or None; also None for names that cannot exist."""
    try:
        name = normalize_username(username)
    except UserError:
        return None
    with read_connection(engine) as conn:
        row = conn.execute(select(*_COLUMNS).where(app_user.c.username == name)).first()
        if row is None:
            return None
        return UserRecord.from_row(row, _links(conn, [row.id])[row.id])


def _require(engine: Engine, username: str) -> UserRecord:
    record = get_user(engine, username)
    if record is None:
        raise UserError(f"no user {username}")
    return record


def list_users(engine: Engine) -> list[UserRecord]:
    with read_connection(engine) as conn:
        rows = conn.execute(select(*_COLUMNS).order_by(app_user.c.username)).all()
        links = _links(conn, [r.id for r in rows])
    return [UserRecord.from_row(r, links[r.id]) for r in rows]


def set_disabled(engine: Engine, username: str, disabled: bool = True) -> UserRecord:
    """Disable a user (no login succeeds), or enable one again. Enabling also clears a lockout
    and the failure count: an administrator who re-enables an account means it to work now."""
    record = _require(engine, username)
    values: dict[str, Any] = {"disabled": disabled}
    if not disabled:
        values.update(failed_logins=0, locked_until_us=None)
    with transaction(engine) as conn:
        conn.execute(update(app_user).where(app_user.c.id == record.id).values(**values))
        if disabled:  # a disabled account's apps lose their access and refresh tokens at once
            from ..auth.grants import revoke_user_families

            revoke_user_families(conn, record.id)
    return _require(engine, record.username)


def reset_mfa(engine: Engine, keys: DataKeyStore, username: str) -> str:
    """Give the user a new TOTP secret (also enabling TOTP if it was off); returns it to show once.
    The old secret stops working immediately."""
    record = _require(engine, username)
    secret = new_secret()
    key_id, sealed = seal_secret(keys, record.username, secret)
    with transaction(engine) as conn:
        conn.execute(update(app_user).where(app_user.c.id == record.id)
                     .values(totp_key_id=key_id, totp_secret=sealed, totp_last_step=None))
    return secret


def link_patient(engine: Engine, username: str, patient: str, relationship: str) -> PatientLink:
    """Let the user act for a patient (or change the relationship of an existing link)."""
    if relationship not in RELATIONSHIPS:
        raise UserError(f"relationship must be one of {', '.join(RELATIONSHIPS)}, not {relationship!r}")
    pid = patient_id_of(patient)
    record = _require(engine, username)
    if record.fhir_user == f"Patient/{pid}":
        raise UserError(f"{record.username} is Patient/{pid}; a user needs no link to themselves")
    with transaction(engine) as conn:
        done = conn.execute(update(user_patient_link).where(
            user_patient_link.c.user_id == record.id, user_patient_link.c.patient_id == pid,
        ).values(relationship=relationship)).rowcount
        if not done:
            conn.execute(insert(user_patient_link).values(user_id=record.id, patient_id=pid,
                                                          relationship=relationship, created_us=now_us()))
    return PatientLink(pid, relationship)


def unlink_patient(engine: Engine, username: str, patient: str) -> bool:
    """Remove a link; False when there was none."""
    pid = patient_id_of(patient)
    record = _require(engine, username)
    with transaction(engine) as conn:
        gone = conn.execute(delete(user_patient_link).where(
            user_patient_link.c.user_id == record.id, user_patient_link.c.patient_id == pid)).rowcount
    return gone > 0


def patient_links(engine: Engine, username: str) -> list[PatientLink]:
    """The patients a user may act for besides themselves."""
    return _require(engine, username).links
