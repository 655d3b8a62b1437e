"""Who is calling: the authenticated client (and user/patient context) behind a bearer token."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .scopes import ScopeSet, parse_scopes
from .tokens import TokenInfo


@dataclass
class Decision:
    """Why and how the principal is asking, as the consent stage decided at the start of a request
    (purpose of use, break-the-glass or exemption, the requester's actor digests, jurisdiction).
    It lives beside the Principal that carries it; consent/ computes it."""

    purpose: str
    mode: str = "filter"  # filter | exempt | break-glass
    reason: str | None = None
    actors: list[str] = field(default_factory=list)  # keyed digests of the requester's references
    own_patients: list[str] = field(default_factory=list)  # unfiltered compartments (self, guardian, proxy)
    now_us: int = 0
    any_rules: bool = True  # False: the rule table was empty when the request started (fast path)
    jurisdiction: str = ""  # the client's jurisdiction ("" when the rule is off)
    transfer: bool = False  # the client is outside the deployment's jurisdiction


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
    consent: Decision | None = None  # the consent stage's decision for this request

    @property
    def reads_own_records(self) -> bool:
        """A signed-in patient (or their guardian/proxy): reads of role-restricted types such as
        the audit trail are confined to their own records by the consent stage."""
        return (self.fhir_user or "").startswith(("Patient/", "RelatedPerson/"))

    def has_role(self, role: str) -> bool:
        """The client was registered with this role (`fhirserver client register --auditor`)."""
        return bool(self.client_settings.get(role))

    @property
    def sees_audit_values(self) -> bool:
        """Query values and details inside AuditEvents are shown in plain text only to an auditor
        client holding the explicit permission for them (docs/security.md)."""
        return not self.reads_own_records and self.has_role("auditor") and self.has_role("audit_query_values")

    @classmethod
    def from_token(cls, info: TokenInfo) -> Principal:
        ctx = info.context
        return cls(
            client_id=info.client_id, client_name=info.client_name, organization=info.organization,
            scopes=parse_scopes(info.scope, strict=False), token_hash=info.token_hash,
            fhir_user=ctx.get("fhirUser"), patient=ctx.get("patient"),
            linked_patients=tuple(ctx.get("linked_patients", [])),
            client_settings=info.client_settings,
            # the client's default purpose of use; the consent stage replaces it with the one asked for
            purpose=[str(p) for p in (info.client_settings.get("purposes") or ["TREAT"])[:1]],
        )


def principal_snapshot(principal: Principal) -> dict[str, Any]:
    """The caller's plain (JSON) attributes; derived state, such as a consent decision, is
    recomputed when the job runs."""

    data: dict[str, Any] = {"scopes": principal.scopes.render()}
    for f in dataclasses.fields(principal):
        value = getattr(principal, f.name)
        if f.name == "scopes":
            continue
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value)
        except TypeError:
            continue
        data[f.name] = value
    return data


def principal_from(snapshot: dict[str, Any]) -> Principal:
    names = {f.name for f in dataclasses.fields(Principal)}
    values = {k: v for k, v in snapshot.items() if k in names}
    values["scopes"] = parse_scopes(str(snapshot.get("scopes", "")), strict=False)
    if "linked_patients" in values:
        values["linked_patients"] = tuple(values["linked_patients"])
    return Principal(**values)
