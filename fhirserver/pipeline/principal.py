"""Who is calling: the authenticated client (and user/patient context) behind a bearer token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..auth.scopes import ScopeSet, parse_scopes
from ..auth.tokens import TokenInfo


@dataclass
class Principal:
    client_id: str
    client_name: str
    organization: str | None
    scopes: ScopeSet
    token_hash: str
    fhir_user: str | None = None  # e.g. Practitioner/123 for a signed-in user
    patient: str | None = None  # launch/patient context (patient id)
    linked_patients: tuple[str, ...] = ()
    purpose: list[str] = field(default_factory=lambda: ["TREAT"])
    client_settings: dict[str, Any] = field(default_factory=dict)
    consent: Any = None  # the consent stage's Decision for this request (purpose, mode, actors)

    @classmethod
    def from_token(cls, info: TokenInfo) -> Principal:
        ctx = info.context
        return cls(
            client_id=info.client_id, client_name=info.client_name, organization=info.organization,
            scopes=parse_scopes(info.scope, strict=False), token_hash=info.token_hash,
            fhir_user=ctx.get("fhirUser"), patient=ctx.get("patient"),
            linked_patients=tuple(ctx.get("linked_patients", [])),
            client_settings=info.client_settings,
        )
