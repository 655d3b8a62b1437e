"""Patient/[id]/$erase: the right to erasure, run by an administrator client.

Who may: a backend client registered with `--admin` whose token carries delete permission on
Patient (e.g. `system/Patient.d`); nobody else, whatever their scopes (403). Only POST. What it
does is in exchange/erase.py. The AuditEvent of the erasure itself names the patient only by
the pseudonym, like the earlier events it pseudonymizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from ..db import guard
from ..exchange.erase import already_erased, erase_patient, pseudonym_for
from ..fhir.errors import FhirError
from .context import RequestContext, Result
from .handler import Handler, Need


@dataclass(frozen=True)
class _Plan:
    pseudonym: str  # the patient's pseudonym; its key is made before the transaction


class Erase(Handler):
    needs = (Need("delete", "delete"),)  # delete permission on Patient (403 without)
    role = "admin-backend"

    def prepare(self, ctx: RequestContext) -> None:
        it = ctx.interaction
        if it.method != "POST":
            raise FhirError(405, "not-supported", "Use POST for $erase", headers={"Allow": "POST"})
        ctx.plan = _Plan(pseudonym_for(ctx.services, it.id or ""))

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        pid = ctx.interaction.id or ""
        svc = ctx.services
        with guard.system_path("$erase"):  # erasure acts on every row of the patient, whoever can see it
            head = svc.repo.current(conn, "Patient", pid, lock=True)
            if head is None:
                raise FhirError(404, "not-found", f"Patient/{pid} is not known")
            if already_erased(conn, head.deleted, pid):
                raise FhirError(410, "deleted", "This patient has already been erased")
            pseudonym = ctx.plan_as(_Plan).pseudonym
            report = erase_patient(svc, conn, pid, pseudonym)
        record = ctx.record
        record.target = f"Patient/{pseudonym}"
        record.patients = [pseudonym]
        record.resources = []
        record.outcome_desc = (f"patient erased: {report.resources} resources ({report.versions} versions) "
                               f"removed, data key destroyed, {report.audit_events} AuditEvents pseudonymized, "
                               f"{report.exports} exports cancelled, {report.accounts} patient accounts closed")
        return Result(200, {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational",
                       "diagnostics": record.outcome_desc.replace("patient erased", f"Patient/{pid} erased"),
                       "details": {"text": f"The erased patient appears in the audit trail as Patient/{pseudonym}"}}],
        })
