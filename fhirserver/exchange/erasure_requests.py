"""Erasure requests (GDPR art. 17, PIPL art. 47): the patient asks, an administrator decides.

A patient (or a guardian for their child) files a request with `POST Patient/[id]/$erasure-request`
and sees its status with `GET`; an administrator lists them (`fhirserver erasure list`) and
approves -- which runs the erasure of exchange/erase.py, the same as `$erase` -- or refuses with a
note the patient sees. One pending request per patient at a time. The reason is sealed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, select, update

from ..audit.events import AuditRecord
from ..clock import now_us
from ..crypto.cipher import open_sealed, seal
from ..db.rows import AnyRow
from ..db.schema import erasure_request
from ..fhir.dates import instant_text
from ..services import Services
from .erase import already_erased, erase_patient, pseudonym_for

KEY_SCOPE = "erasure-requests"


class RequestError(ValueError):
    pass


@dataclass
class ErasureRequest:
    id: str
    patient: str
    requested_by: str
    status: str
    created: str
    reason: str
    decided: str | None = None
    decided_by: str | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _aad(request_id: str) -> bytes:
    return f"erasure-request/{request_id}".encode()


def _load(svc: Services, conn: Connection, row: AnyRow) -> ErasureRequest:
    reason = ""
    if row.reason is not None:
        reason = open_sealed(AESGCM(svc.keys.by_id(row.key_id, conn)), row.reason, _aad(row.id)).decode()
    return ErasureRequest(row.id, row.patient_id, row.requested_by, row.status, instant_text(row.created_us), reason,
                          instant_text(row.decided_us) if row.decided_us else None, row.decided_by, row.note)


def file_request(svc: Services, conn: Connection, patient_id: str, requested_by: str, reason: str) -> ErasureRequest:
    """A new pending request (RequestError when one is pending already). The key must exist
    (`svc.keys.ensure(KEY_SCOPE)` before the transaction)."""
    pending = conn.execute(select(erasure_request.c.id).where(erasure_request.c.patient_id == patient_id,
                                                             erasure_request.c.status == "pending")).first()
    if pending is not None:
        raise RequestError("an erasure request for this patient is already waiting for a decision")
    request_id = str(uuid.uuid4())
    key_id, key = svc.keys.ensure(KEY_SCOPE)
    sealed = seal(AESGCM(key), reason[:2000].encode(), _aad(request_id)) if reason else None
    conn.execute(erasure_request.insert().values(id=request_id, patient_id=patient_id, requested_by=requested_by,
                                                 key_id=key_id, reason=sealed, status="pending", created_us=now_us()))
    row = conn.execute(select(erasure_request).where(erasure_request.c.id == request_id)).one()
    return _load(svc, conn, row)


def requests_of(svc: Services, conn: Connection, patient_id: str | None = None,
                status: str | None = None) -> list[ErasureRequest]:
    stmt = select(erasure_request).order_by(erasure_request.c.created_us.desc())
    if patient_id is not None:
        stmt = stmt.where(erasure_request.c.patient_id == patient_id)
    if status is not None:
        stmt = stmt.where(erasure_request.c.status == status)
    return [_load(svc, conn, r) for r in conn.execute(stmt).all()]


def decide(svc: Services, request_id: str, approve: bool, by: str, note: str = "") -> tuple[ErasureRequest, Any]:
    """Approve (erase the patient, in the same transaction) or refuse a pending request.
    Returns the request and, when approved, the erasure report."""
    svc.keys.ensure(KEY_SCOPE)
    with svc.engine.connect() as conn:
        row = conn.execute(select(erasure_request).where(erasure_request.c.id == request_id)).first()
    if row is None:
        raise RequestError(f"no erasure request {request_id}")
    if row.status != "pending":
        raise RequestError(f"request {request_id} was {row.status} already")
    pseudonym = pseudonym_for(svc, row.patient_id) if approve else None  # its key before the transaction
    report = None
    with svc.engine.begin() as conn:
        patient = row.patient_id
        if approve:
            assert pseudonym is not None
            head = svc.repo.current(conn, "Patient", patient, lock=True)
            if head is None or already_erased(conn, head.deleted, patient):
                raise RequestError(f"Patient/{patient} is not known or erased already")
            report = erase_patient(svc, conn, patient, pseudonym)
        conn.execute(update(erasure_request).where(erasure_request.c.id == request_id).values(
            status="approved" if approve else "refused", decided_us=now_us(), decided_by=by, note=note[:2000] or None))
        shown = pseudonym if approve else patient
        rec = AuditRecord(interaction="delete" if approve else "update", request_id=f"erasure-{request_id}",
                          network_address="localhost", recorded_us=now_us(), status=200, patients=[str(shown)],
                          target=f"Patient/{shown}", outcome_desc=f"erasure request {request_id} "
                          f"{'approved: patient erased' if approve else 'refused'} by {by}")
        rec.subtype_code = ("urn:fhirserver:privacy", "erasure-" + ("approve" if approve else "refuse"), "erasure decision")
        svc.audit.append(conn, rec)
        done = _load(svc, conn, conn.execute(select(erasure_request).where(erasure_request.c.id == request_id)).one())
    return done, report
