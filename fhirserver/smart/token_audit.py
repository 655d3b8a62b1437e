"""The audit record of every token request (issued or refused, DICOM 110114 User Authentication),
and revoking what was issued when that record cannot be written (no token without its audit)."""

from __future__ import annotations

import logging
from typing import Any

from flask import request
from joserfc import jws
from sqlalchemy import select

from ..audit.events import AuditRecord
from ..auth.tokens import token_hash
from ..clock import now_us
from ..consent.alerts import note_auth_failure
from ..db.engine import read_connection
from ..db.schema import client
from ..services import Services
from ..storage.codec import parse_json


def audit_token_request(svc: Services, status: int, body: dict[str, Any]) -> AuditRecord:
    """Record every token request (issued or refused) as an AuditEvent (DICOM 110114); returns
    the record (its client and user name whom an issued token is for)."""
    rec = AuditRecord(interaction="login", request_id=request.headers.get("X-Request-Id", "")[:64] or "token",
                      network_address=request.remote_addr or "", recorded_us=now_us(), status=status)
    rec.type_code = ("http://dicom.nema.org/resources/ontology/DCM", "110114", "User Authentication")
    rec.subtype_code = ("http://dicom.nema.org/resources/ontology/DCM", "110122", "Login")
    token = body.get("access_token")
    if token:
        from ..db.schema import access_token

        with read_connection(svc.engine) as conn:
            row = conn.execute(select(client.c.client_id, client.c.name).join(
                access_token, access_token.c.client_id == client.c.client_id)
                .where(access_token.c.token_hash == token_hash(token))).first()
            ctx = conn.execute(select(access_token.c.context).where(
                access_token.c.token_hash == token_hash(token))).scalar()
        if row:
            rec.client_id, rec.client_name = row.client_id, row.name
        if ctx:
            rec.user = parse_json(ctx.encode()).get("fhirUser")
        grant = request.form.get("grant_type", "")
        rec.outcome_desc = f"token issued ({grant}); scope: {body.get('scope', '')}"
    else:
        claimed = request.form.get("client_id") or (request.authorization.username if request.authorization else None)
        assertion = request.form.get("client_assertion")
        if assertion:
            try:
                claimed = parse_json(jws.extract_compact(assertion.encode()).payload).get("sub")
            except Exception:  # noqa: BLE001 - anything unparsable is simply "unknown"
                claimed = None
        rec.outcome_desc = f"token refused: {body.get('error', 'error')}" + (
            f" (claimed client {str(claimed)[:64]})" if claimed else "")
    with svc.engine.begin() as conn:
        if not token and body.get("error") == "invalid_client":  # failed client authentication: bursts alert
            claim = str(claimed)[:64] if claimed else None
            known = claim is not None and conn.execute(
                select(client.c.client_id).where(client.c.client_id == claim)).first() is not None
            note_auth_failure(conn, "token", claim, known, rec.network_address, rec.request_id,
                              svc.settings.denial_burst_threshold)
        svc.audit.append(conn, rec)
    return rec


def revoke_issued(svc: Services, body: dict[str, Any]) -> None:
    from sqlalchemy import update

    from ..db.schema import access_token, refresh_token

    hashes = {k: token_hash(body[k]) for k in ("access_token", "refresh_token") if isinstance(body.get(k), str)}
    if not hashes:
        return
    try:
        with svc.engine.begin() as conn:
            if "access_token" in hashes:
                conn.execute(update(access_token).where(access_token.c.token_hash == hashes["access_token"])
                             .values(revoked=True))
            if "refresh_token" in hashes:
                conn.execute(update(refresh_token).where(refresh_token.c.token_hash == hashes["refresh_token"])
                             .values(revoked=True))
    except Exception:
        logging.getLogger("fhirserver.auth").exception("could not revoke a token whose issuance was not audited")
