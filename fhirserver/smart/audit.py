"""AuditEvents for the OAuth side: token issuance and refusal, authorization decisions,
introspection and revocation (logins are audited by `users.login`). Fail closed: if the record
cannot be written the caller's response is replaced by a 500."""

from __future__ import annotations

import uuid

from flask import request

from ..audit.events import DCM, AuditRecord
from ..auth.clients import ClientRecord
from ..clock import now_us
from ..consent.alerts import note_auth_failure
from ..services import Services

SUBTYPES = {
    "token": ("http://dicom.nema.org/resources/ontology/DCM", "110122", "Login"),
    "authorize": ("urn:fhirserver:oauth", "authorize", "Authorization decision"),
    "introspection": ("urn:fhirserver:oauth", "introspect", "Token introspection"),
    "revocation": ("http://dicom.nema.org/resources/ontology/DCM", "110123", "Logout"),
}


def audit_oauth(svc: Services, kind: str, status: int, client: ClientRecord | None, user: str | None, desc: str,
                refused_claim: tuple[str | None, bool] | None = None) -> None:
    """One AuditEvent for an OAuth-side event. `refused_claim` (client id claimed, whether it is
    registered): the caller failed client authentication -- counted for bursts (consent.alerts
    .note_auth_failure) in the same transaction."""
    rec = AuditRecord(interaction="login", request_id=str(uuid.uuid4()), network_address=request.remote_addr or "",
                      recorded_us=now_us(), status=status, user=user, outcome_desc=desc[:500])
    rec.type_code = (DCM, "110114", "User Authentication")
    rec.subtype_code = SUBTYPES[kind]
    if client is not None:
        rec.client_id, rec.client_name = client.client_id, client.name
    with svc.engine.begin() as conn:
        if refused_claim is not None:
            note_auth_failure(conn, kind, refused_claim[0], refused_claim[1], rec.network_address, rec.request_id,
                              svc.settings.denial_burst_threshold)
        svc.audit.append(conn, rec)
