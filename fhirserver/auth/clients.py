"""The client registry: who may ask for tokens, with which keys and up to which scopes."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, insert, select, update

from ..db.engine import read_connection, transaction
from ..db.rows import AnyRow
from ..db.schema import client as client_table
from .scopes import invalid_scopes


class ClientError(ValueError):
    pass


@dataclass
class ClientRecord:
    client_id: str
    name: str
    kind: str
    scopes: str
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    organization: str | None = None
    disabled: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    redirect_uris: list[str] = field(default_factory=list)
    secret_hash: str | None = None

    @property
    def auth_method(self) -> str:
        """How the client authenticates at the token endpoint."""
        if self.kind == "backend":
            return "private_key_jwt"
        return str(self.settings.get("token_endpoint_auth_method", "none"))

    @property
    def public(self) -> bool:
        return self.kind == "app" and self.auth_method == "none"

    def check_secret(self, secret: str) -> bool:
        return bool(self.secret_hash) and hmac.compare_digest(self.secret_hash or "", hash_secret(secret))

    @classmethod
    def from_row(cls, row: AnyRow) -> ClientRecord:
        return cls(
            client_id=row.client_id, name=row.name, kind=row.kind, scopes=row.scopes,
            jwks=json.loads(row.jwks) if row.jwks else None, jwks_uri=row.jwks_uri,
            organization=row.organization, disabled=row.disabled,
            settings=json.loads(row.settings) if row.settings else {},
            redirect_uris=json.loads(row.redirect_uris) if row.redirect_uris else [],
            secret_hash=row.secret_hash,
        )


def new_client_id() -> str:
    """A random client_id that never starts with "-" (a command line would read it as an option)."""
    return "c" + secrets.token_urlsafe(16)


def hash_secret(secret: str) -> str:
    """Client secrets are 256-bit random strings the server generates, so one SHA-256 suffices
    (no password stretching needed) and the database never holds a usable secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_jwks(jwks: dict[str, Any]) -> None:
    from joserfc.jwk import KeySet

    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ClientError("JWKS must be a JSON object with a non-empty 'keys' array")
    for key in jwks["keys"]:
        if any(k in key for k in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise ClientError("JWKS must contain public keys only")
    try:
        KeySet.import_key_set(jwks)  # type: ignore[arg-type]  # validated by joserfc itself
    except Exception as exc:  # noqa: BLE001 - joserfc raises several types
        raise ClientError(f"JWKS is not valid: {exc}") from exc


def _check_keys(jwks: dict[str, Any] | None, jwks_uri: str | None) -> None:
    if bool(jwks) == bool(jwks_uri):
        raise ClientError("give exactly one of a JWKS (file) or a JWKS URL")
    if jwks_uri and not jwks_uri.startswith(("https://", "http://")):
        raise ClientError("the JWKS URL must be http(s)")
    if jwks:
        _check_jwks(jwks)


def _check_scopes_and_id(engine: Engine, scopes: str, client_id: str | None) -> None:
    bad = invalid_scopes(scopes)
    if bad:
        raise ClientError(f"invalid scope(s): {' '.join(bad)}")
    if not scopes.split():
        raise ClientError("a client needs at least one allowed scope")
    if client_id and get_client(engine, client_id) is not None:
        raise ClientError(f"a client with id {client_id} already exists")


def register_backend_client(
    engine: Engine,
    name: str,
    scopes: str,
    jwks: dict[str, Any] | None = None,
    jwks_uri: str | None = None,
    organization: str | None = None,
    client_id: str | None = None,
    settings: dict[str, Any] | None = None,
) -> ClientRecord:
    if not name.strip():
        raise ClientError("a client needs a name")
    _check_keys(jwks, jwks_uri)
    _check_scopes_and_id(engine, scopes, client_id)
    record = ClientRecord(
        client_id=client_id or new_client_id(), name=name, kind="backend", scopes=scopes,
        jwks=jwks, jwks_uri=jwks_uri, organization=organization, settings=settings or {},
    )
    with transaction(engine) as conn:
        conn.execute(insert(client_table).values(
            client_id=record.client_id, name=name, kind="backend", scopes=scopes,
            jwks=json.dumps(jwks) if jwks else None, jwks_uri=jwks_uri, organization=organization,
            settings=json.dumps(record.settings), disabled=False, created_us=int(time.time() * 1e6),
        ))
    return record


def get_client(engine: Engine, client_id: str) -> ClientRecord | None:
    with read_connection(engine) as conn:
        row = conn.execute(select(client_table).where(client_table.c.client_id == client_id)).first()
    return ClientRecord.from_row(row) if row else None


def list_clients(engine: Engine) -> list[ClientRecord]:
    with read_connection(engine) as conn:
        rows = conn.execute(select(client_table).order_by(client_table.c.created_us)).all()
    return [ClientRecord.from_row(r) for r in rows]


def set_disabled(engine: Engine, client_id: str, disabled: bool = True) -> bool:
    """Disable (or re-enable) a client. Disabling also revokes every token it holds, so
    re-enabling later does not bring old tokens back."""
    from .tokens import revoke_client_tokens

    with transaction(engine) as conn:
        result = conn.execute(update(client_table).where(client_table.c.client_id == client_id)
                              .values(disabled=disabled))
        if disabled:
            revoke_client_tokens(conn, client_id)
    return result.rowcount > 0


APP_AUTH_METHODS = ("none", "client_secret_basic", "private_key_jwt")


def _check_redirect_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
        raise ClientError(f"redirect URI must be an absolute http(s) URL without a fragment: {uri}")


def register_app_client(
    engine: Engine,
    name: str,
    scopes: str,
    redirect_uris: list[str],
    auth_method: str = "none",
    jwks: dict[str, Any] | None = None,
    jwks_uri: str | None = None,
    launch_url: str | None = None,
    organization: str | None = None,
    client_id: str | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[ClientRecord, str | None]:
    """Register a SMART App Launch client: public (PKCE only), confidential with a client secret
    (returned once, only its hash is kept) or confidential with a JWKS. Returns (record, secret)."""
    if not name.strip():
        raise ClientError("a client needs a name")
    if auth_method not in APP_AUTH_METHODS:
        raise ClientError(f"token endpoint auth method must be one of {', '.join(APP_AUTH_METHODS)}")
    if not redirect_uris:
        raise ClientError("an app needs at least one redirect URI")
    for uri in redirect_uris:
        _check_redirect_uri(uri)
    if launch_url:
        _check_redirect_uri(launch_url)
    if auth_method == "private_key_jwt":
        _check_keys(jwks, jwks_uri)
    elif jwks or jwks_uri:
        raise ClientError("a JWKS is only used with private_key_jwt")
    _check_scopes_and_id(engine, scopes, client_id)
    secret = secrets.token_urlsafe(32) if auth_method == "client_secret_basic" else None
    merged = {**(settings or {}), "token_endpoint_auth_method": auth_method}
    if launch_url:
        merged["launch_url"] = launch_url
    record = ClientRecord(
        client_id=client_id or new_client_id(), name=name, kind="app", scopes=scopes,
        jwks=jwks, jwks_uri=jwks_uri, organization=organization, settings=merged,
        redirect_uris=list(redirect_uris), secret_hash=hash_secret(secret) if secret else None,
    )
    with transaction(engine) as conn:
        conn.execute(insert(client_table).values(
            client_id=record.client_id, name=name, kind="app", scopes=scopes,
            jwks=json.dumps(jwks) if jwks else None, jwks_uri=jwks_uri, organization=organization,
            settings=json.dumps(merged), disabled=False, created_us=int(time.time() * 1e6),
            redirect_uris=json.dumps(record.redirect_uris), secret_hash=record.secret_hash,
        ))
    return record, secret
