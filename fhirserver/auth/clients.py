"""The client registry: who may ask for tokens, with which keys and up to which scopes."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, insert, select, update

from ..db.engine import read_connection, transaction
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

    @classmethod
    def from_row(cls, row: Any) -> ClientRecord:
        return cls(
            client_id=row.client_id, name=row.name, kind=row.kind, scopes=row.scopes,
            jwks=json.loads(row.jwks) if row.jwks else None, jwks_uri=row.jwks_uri,
            organization=row.organization, disabled=row.disabled,
            settings=json.loads(row.settings) if row.settings else {},
        )


def _check_jwks(jwks: dict[str, Any]) -> None:
    from joserfc.jwk import KeySet

    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ClientError("JWKS must be a JSON object with a non-empty 'keys' array")
    for key in jwks["keys"]:
        if any(k in key for k in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise ClientError("JWKS must contain public keys only")
    try:
        KeySet.import_key_set(jwks)
    except Exception as exc:  # noqa: BLE001 - joserfc raises several types
        raise ClientError(f"JWKS is not valid: {exc}") from exc


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
    if bool(jwks) == bool(jwks_uri):
        raise ClientError("give exactly one of a JWKS (file) or a JWKS URL")
    if jwks_uri and not jwks_uri.startswith(("https://", "http://")):
        raise ClientError("the JWKS URL must be http(s)")
    if jwks:
        _check_jwks(jwks)
    bad = invalid_scopes(scopes)
    if bad:
        raise ClientError(f"invalid scope(s): {' '.join(bad)}")
    if not scopes.split():
        raise ClientError("a client needs at least one allowed scope")
    if client_id and get_client(engine, client_id) is not None:
        raise ClientError(f"a client with id {client_id} already exists")
    record = ClientRecord(
        client_id=client_id or secrets.token_urlsafe(16), name=name, kind="backend", scopes=scopes,
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
