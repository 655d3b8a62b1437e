"""Patient erasure (GDPR art. 17, PIPL art. 47): crypto-shredding plus cleanup, in one transaction.

Everything in a patient's compartment is encrypted under the patient's own data key
(`patient:<id>`; a resource in several compartments uses its first patient's key). Erasure:

1. removes every version of every resource whose current version is under that key (the Patient,
   their Observations, QuestionnaireResponses, Consents), leaving bodiless tombstones so reads
   answer 410 and searches never match; older versions under the key of resources that have
   since moved to another patient are removed too;
2. deletes the patient's search index, blind-index and compartment rows, consent rules, user
   links and unfinished-import bookkeeping; closes the patient's sign-in accounts and revokes
   every token and launch context that names the patient; pseudonymizes consent alerts;
3. destroys the data key itself, so any copy of those ciphertexts (backups, WAL, free pages)
   is noise;
4. cancels every unexpired Bulk export that may hold the patient (their files and keys go);
5. pseudonymizes the patient in the AuditEvents that name them (`Patient/erased-<HMAC>`, the same
   pseudonym in every event so auditors can still follow one erased person's trail), recorded
   in the audit log as an authorized redaction (see audit/records.py).
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from sqlalchemy import Connection, delete, func, select

from ..audit.records import redact
from ..audit.rollup import rename_patient as rename_in_rollup
from ..clock import now_us
from ..consent.rules import clear as clear_consent_rules
from ..db.schema import (
    access_token,
    app_user,
    compartment,
    consent_alert,
    data_key,
    erasure_request,
    export_job,
    import_patient,
    launch_context,
    refresh_token,
    resource,
    resource_version,
    user_patient_link,
)
from ..search.sources import source_of
from ..services import Services
from ..storage import export_jobs as jobs

PSEUDONYM_SCOPE = "erasure-pseudonym"


@dataclass
class ErasureReport:
    pseudonym: str
    resources: int = 0
    versions: int = 0
    audit_events: int = 0
    exports: int = 0
    accounts: int = 0  # patient user accounts closed


def pseudonym_for(svc: Services, patient_id: str) -> str:
    """The erased patient's stable, keyed pseudonym (a valid FHIR id)."""
    mac = hmac.new(svc.keys.ensure(PSEUDONYM_SCOPE)[1], patient_id.encode(), sha256).digest()
    return "erased-" + base64.b32encode(mac[:15]).decode().lower()


def already_erased(conn: Connection, patient_deleted: bool, patient_id: str) -> bool:
    """An erased patient is a deleted Patient whose data key no longer exists (a merely deleted
    one still has its key and its history)."""
    return patient_deleted and conn.execute(
        select(data_key.c.id).where(data_key.c.scope == f"patient:{patient_id}")).first() is None


def erase_patient(svc: Services, conn: Connection, patient_id: str, pseudonym: str) -> ErasureReport:
    """Erase one patient inside the caller's transaction (see the module docstring)."""
    report = ErasureReport(pseudonym)
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA secure_delete=ON")  # zero the freed pages, not just unlink them
    scope = f"patient:{patient_id}"
    key_row = conn.execute(select(data_key.c.id).where(data_key.c.scope == scope)).first()
    keyed: set[int] = set()
    if key_row is not None:
        rows = conn.execute(select(resource_version.c.resource_pk, resource_version.c.version,
                                   resource.c.version.label("current"))
                            .join(resource, resource.c.pk == resource_version.c.resource_pk)
                            .where(resource_version.c.key_id == key_row.id)).all()
        keyed = {r.resource_pk for r in rows if r.version == r.current}
        moved = [(r.resource_pk, r.version) for r in rows if r.resource_pk not in keyed]
        for pk, version in moved:
            conn.execute(delete(resource_version).where(resource_version.c.resource_pk == pk,
                                                        resource_version.c.version == version))
        report.versions += len(moved)
    patient = svc.repo.current(conn, "Patient", patient_id)
    if patient is not None:
        keyed.add(patient.pk)
    report.versions += conn.execute(select(func.count()).select_from(resource_version)
                                    .where(resource_version.c.resource_pk.in_(keyed))).scalar_one()
    for pk, rtype in conn.execute(select(resource.c.pk, resource.c.type).where(resource.c.pk.in_(keyed))).all():
        if rtype == "Consent":
            clear_consent_rules(conn, pk)
        svc.repo.erase(conn, pk, rtype)
        report.resources += 1
    audit_comp = source_of("AuditEvent").compartment
    audit_pks = conn.execute(select(audit_comp.c.resource_pk).where(audit_comp.c.patient_id == patient_id)
                             .distinct()).scalars().all()
    conn.execute(delete(compartment).where(compartment.c.patient_id == patient_id))
    conn.execute(delete(user_patient_link).where(user_patient_link.c.patient_id == patient_id))
    conn.execute(delete(import_patient).where(import_patient.c.patient_id == patient_id))
    report.accounts = _close_accounts(conn, patient_id, pseudonym)
    _redact_alerts(conn, patient_id, pseudonym)
    svc.keys.destroy(conn, scope)
    report.exports = _cancel_exports(conn, patient_id)
    rename_in_rollup(conn, patient_id, pseudonym)
    conn.execute(erasure_request.update().where(erasure_request.c.patient_id == patient_id).values(patient_id=pseudonym))
    conn.execute(erasure_request.update().where(erasure_request.c.requested_by == f"Patient/{patient_id}")
                 .values(requested_by=f"Patient/{pseudonym}"))
    rewrite = _Rewriter(patient_id, pseudonym)
    for pk in sorted(audit_pks):
        if redact(svc.audit, conn, pk, lambda content: _redact_record(content, rewrite, patient_id, pseudonym)):
            report.audit_events += 1
    return report


def _close_accounts(conn: Connection, patient_id: str, pseudonym: str) -> int:
    """The patient's own sign-in accounts are closed and stripped of what identifies them, and
    every token, refresh token and pending launch naming the patient is revoked/removed (their
    stored context names the patient). Accounts stay as rows: grant history refers to them."""
    ref = f"Patient/{patient_id}"
    users = conn.execute(select(app_user.c.id).where(app_user.c.fhir_user == ref)).scalars().all()
    for uid in users:
        conn.execute(app_user.update().where(app_user.c.id == uid).values(
            username=f"{pseudonym}-{uid}", password_hash="!erased", fhir_user=f"Patient/{pseudonym}",
            totp_key_id=None, totp_secret=None, disabled=True))

    def names_patient(context: str | None) -> bool:
        if not context or patient_id not in context:
            return False
        data = json.loads(context)
        return patient_id in (data.get("patient"), *data.get("linked_patients", [])) or ref in (
            data.get("fhirUser"), data.get("user"))

    for table, cleared in ((access_token, None), (refresh_token, "{}")):
        rows = conn.execute(select(table.c.token_hash, table.c.context).where(
            table.c.context.contains(patient_id))).all()
        for row in rows:
            if names_patient(row.context):
                conn.execute(table.update().where(table.c.token_hash == row.token_hash).values(
                    revoked=True, context=cleared))
    for row in conn.execute(select(launch_context.c.launch_hash, launch_context.c.context).where(
            launch_context.c.context.contains(patient_id))).all():
        if names_patient(row.context):
            conn.execute(delete(launch_context).where(launch_context.c.launch_hash == row.launch_hash))
    return len(users)


def _redact_alerts(conn: Connection, patient_id: str, pseudonym: str) -> None:
    """Consent alerts (break-the-glass, exempt access) name the patients involved: pseudonymize."""
    rewrite = _Rewriter(patient_id, pseudonym)
    for row in conn.execute(select(consent_alert.c.id, consent_alert.c.detail).where(
            consent_alert.c.detail.contains(patient_id))).all():
        detail = json.loads(row.detail)
        if isinstance(detail.get("patients"), list):
            detail["patients"] = [pseudonym if p == patient_id else p for p in detail["patients"]]
        detail = _replace(detail, rewrite)
        conn.execute(consent_alert.update().where(consent_alert.c.id == row.id).values(
            detail=json.dumps(detail, sort_keys=True)))


def _cancel_exports(conn: Connection, patient_id: str) -> int:
    """Unexpired exports that may contain the patient: every system/type-level one, the
    patient's own, and those of Groups listing the patient (erring on the side of erasure)."""
    rows = conn.execute(select(export_job.c.id, export_job.c.spec).where(
        export_job.c.status.in_(("queued", "running", "complete")))).all()
    specs = [(r.id, json.loads(r.spec)) for r in rows]
    hit = [job_id for job_id, spec in specs
           if (spec.get("level") == "instance" and spec.get("patient") == patient_id)
           or (spec.get("level") == "group" and patient_id in spec.get("patients", []))
           or spec.get("level") not in ("instance", "group")]
    for job_id in hit:
        jobs.cancel(conn, job_id)
        conn.execute(export_job.update().where(export_job.c.id == job_id).values(
            error="Cancelled: a patient whose data it may hold was erased", expires_us=now_us()))
    return len(hit)


def _redact_record(content: dict[str, Any], rewrite: _Rewriter, patient_id: str, pseudonym: str) -> dict[str, Any]:
    """An access record with the patient pseudonymized (records moved from the old chain are
    AuditEvent JSON, whose query is base64)."""
    if content.get("resourceType") == "AuditEvent":
        return dict(_replace(content, rewrite))
    out = dict(content)
    out["patients"] = [pseudonym if p == patient_id else p for p in content.get("patients", [])]
    if isinstance(content.get("query"), str):
        out["query"] = rewrite(content["query"])
    for name in ("resources", "target", "user", "outcome_desc", "extra_entities"):
        if content.get(name) is not None:
            out[name] = _replace(content[name], rewrite, name)
    return out


class _Rewriter:
    """Replaces the patient's id where it names the patient: `Patient/<id>` references (also
    URL-encoded) and patient-valued search parameters (`patient=`, `subject=`, `Patient?_id=`)."""

    def __init__(self, patient_id: str, pseudonym: str) -> None:
        pid = re.escape(patient_id)
        end = r"(?![A-Za-z0-9\-.])"
        self._ref = re.compile(rf"Patient(/|%2F|%2f){pid}{end}")
        self._param = re.compile(rf"((?:[?&](?:patient|subject)(?::Patient)?|Patient\?(?:[^#]*&)?_id)=(?:[^&#]*,)?){pid}{end}")
        self._pseudonym = pseudonym

    def __call__(self, text: str) -> str:
        text = self._ref.sub(lambda m: f"Patient{m.group(1)}{self._pseudonym}", text)
        return self._param.sub(lambda m: f"{m.group(1)}{self._pseudonym}", text)


def _replace(node: object, rewrite: _Rewriter, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _replace(v, rewrite, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, rewrite, key) for v in node]
    if isinstance(node, str):
        if key == "query":  # BALP: the search query, base64
            try:
                decoded = base64.b64decode(node, validate=True).decode()
            except ValueError:
                return rewrite(node)
            return base64.b64encode(rewrite(decoded).encode()).decode()
        return rewrite(node)
    return node
