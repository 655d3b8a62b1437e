"""The consent stage as the pipeline sees it, and the write-side hooks (labelling, rules).

`ConsentStage` is the service behind `services.consent`:
- `begin(ctx)` (start of authorize): purpose of use, break-the-glass, exemption -> 403 or a
  `Decision` kept on the principal; the purpose goes into the AuditEvent.
- `predicates(...)`: the engine's row predicates (see engine.py).
- `check_write(ctx)` (after the handler's prepare): minors' privacy Consents (rule 7).
- `annotate(ctx, conn)` (after a reading handler ran): the Consents that decided, as entities.
- `finish(ctx, conn)` (in the audit transaction): alerts and denial-burst accounting.

`ConsentWrites` is the repository's write hook on every write path (REST, bulk load, demo,
reindex): sensitivity labels are added in `prepare`, and a Consent's rules are replaced in the
same transaction as the Consent's own write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import date
from typing import Any

from sqlalchemy import ColumnElement, Connection, FromClause, and_, or_, select

from .. import metrics
from ..audit.events import AuditRecord
from ..audit.records import AuditLog
from ..auth.principal import Decision, Principal
from ..clock import now_us
from ..config import Settings
from ..db import guard
from ..db.schema import app_user, resource, user_patient_link
from ..fhir.errors import FhirError
from ..storage.codec import parse_json
from ..storage.repository import Repository
from .alerts import account_of, note_denial, raise_alert
from .engine import BREAK_GLASS_PURPOSE, ConsentEngine, registered_purposes
from .entities import consent_entity, policy_entity
from .hooks import NoConsentFiltering, StageContext
from .labels import Labeller
from .rules import PRIVACY_SCOPE, materialize

READING = {"read", "vread", "history-instance", "history-type", "search-type", "operation"}
DETAIL_SYSTEM = "urn:fhirserver:consent"
TRANSFER_REFUSED = "Cross-border transfer refused"
# interactions whose 404 on an existing target means "hidden": a denial (writes see as reads do)
HIDING_404 = frozenset({"read", "vread", "update", "patch", "history-instance"})


def _entity_detail(entity: dict[str, Any], kind: str, value: str) -> dict[str, Any]:
    entity.setdefault("detail", []).append({"type": kind, "valueString": value})
    return entity


class ConsentWrites:
    """The repository's write hook (storage.repository.WriteHook): sensitivity labels are added
    when a write is prepared, and a Consent's rule rows are replaced in the transaction that
    writes (or deletes) the Consent -- on every write path: REST, Bundles, imports, reindexing."""

    def __init__(self, labeller: Labeller, digest: Callable[[str], str]) -> None:
        self.labeller = labeller
        self.digest = digest

    def prepare(self, rtype: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.labeller.label(rtype, body)

    def written(self, conn: Connection, pk: int, rtype: str, body: dict[str, Any] | None) -> None:
        if rtype == "Consent":
            materialize(conn, pk, body, self.digest)


class ConsentStage(NoConsentFiltering):
    def __init__(self, engine: ConsentEngine, settings: Settings, repo: Repository, audit: AuditLog) -> None:
        self.engine = engine
        self.repo, self.audit = repo, audit  # the minors' rule reads the patient; a burst suspension is audited
        self.minor_age = settings.consent_minor_age
        self.burst_threshold = settings.denial_burst_threshold
        self.burst_suspend = settings.denial_burst_suspend
        self.deidentified_abroad = settings.cross_border_deidentified

    # ---- stage entry
    def begin(self, ctx: StageContext) -> Decision | None:
        if ctx.principal is None:
            return None  # a public interaction (metadata, smart-configuration): nothing to decide
        decision = self.engine.decide(ctx.principal, *_asked_purpose(ctx.principal, ctx.headers))
        if decision.mode == "filter":
            decision.any_rules = self.engine.rules_exist(ctx.reading())
        rec: AuditRecord = ctx.record
        rec.purpose = [decision.purpose]
        if decision.mode == "exempt":
            entity = _entity_detail(policy_entity("consent-exempt", "consent-exempt client: consent rules not applied"),
                                    "consent-mode", "exempt")
            entity["what"]["identifier"]["value"] = "consent-exempt"
            ctx.capture.entity(entity)
        elif decision.mode == "break-glass":
            entity = policy_entity(decision.purpose, "break-the-glass: consent denies overridden")
            entity["what"]["identifier"]["value"] = "break-the-glass"
            _entity_detail(entity, "break-glass-reason", decision.reason or "")
            ctx.capture.entity(entity)
        else:
            default = "permit unless a consent denies (opt-out)" if decision.purpose in self.engine.opt_out \
                else "deny unless a consent permits (opt-in)"
            ctx.capture.entity(policy_entity(
                decision.purpose, f"default policy for purpose {decision.purpose}: {default}; data with a "
                                  "sensitivity label needs a consent that permits it explicitly"))
        if decision.transfer and decision.mode != "break-glass":
            ctx.capture.entity(policy_entity(
                "cross-border", f"cross-border transfer to {decision.jurisdiction}: only data of patients whose "
                                f"consent permits it"))
        return decision

    def transfer_rule(self, principal: Principal) -> tuple[Callable[[FromClause], ColumnElement[bool]] | None, str]:
        """The cross-border rule for this caller: its predicate over a table and the read's 403
        text for a row it hides (the client is told why; the privacy office gets an alert), or
        (None, "") where it does not apply (a domestic client, break-the-glass)."""
        decision: Decision | None = principal.consent
        if decision is None or not decision.transfer or decision.mode == "break-glass":
            return None, ""
        engine = self.engine
        return (lambda res: engine.transfer_permitted(res, decision),
                f"{TRANSFER_REFUSED}: this client is registered in {decision.jurisdiction}, the data is held in "
                f"{engine.home}, and the patient's consent does not permit this transfer")

    def export_decision(self, principal: Principal, deidentified: bool) -> Decision | None:
        """The decision an export job applies: its caller's defaults, without the cross-border
        rule for a de-identified export when the deployment allows those abroad."""
        decision = self.engine.decide(principal)
        if deidentified and self.deidentified_abroad:
            decision.transfer = False
        return decision

    def predicates(self, principal: Principal, resource_type: str, interaction: str,
                   res: FromClause) -> list[ColumnElement[bool]]:
        return self.engine.predicates(principal, resource_type, interaction, res)

    # ---- minors (rule 7)
    def check_write(self, ctx: StageContext) -> None:
        it = ctx.interaction
        if it.resource_type != "Consent" or it.kind not in ("create", "update") or ctx.write is None:
            return
        prepared = ctx.write
        body = prepared.body
        scope = body.get("scope") or {}
        if not any(isinstance(c, dict) and c.get("code") == PRIVACY_SCOPE for c in scope.get("coding", [])):
            return
        ref = (body.get("patient") or {}).get("reference") or ""
        if not ref.startswith("Patient/"):
            return
        pid = ref.split("/", 1)[1]
        principal = ctx.principal
        if principal is not None and self.engine.decision_of(principal).mode == "exempt":
            return  # the consent-management back office records (paper) consents on people's behalf
        conn = ctx.reading()
        with guard.system_path("consent-minors"):  # the age rule
            head = self.repo.current(conn, "Patient", pid)
            if head is None or head.deleted:
                return
            patient = parse_json(self.repo.read(conn, "Patient", pid).body or b"{}")
            age = _age(patient.get("birthDate"))
            if age is None or age >= self.minor_age:
                return
            user = (principal.fhir_user if principal else None) or ""
            guardian = bool(user) and conn.execute(
                select(user_patient_link.c.user_id)
                .join(app_user, app_user.c.id == user_patient_link.c.user_id)
                .where(app_user.c.fhir_user == user, user_patient_link.c.patient_id == pid,
                       user_patient_link.c.relationship == "guardian", app_user.c.disabled.is_(False))
            ).first() is not None
        if not guardian:
            raise FhirError(422, "business-rule",
                            f"Patient/{pid} is younger than {self.minor_age}: a privacy Consent for a minor must be "
                            "recorded by a user linked to the patient as guardian (fhirserver user link "
                            "--relationship guardian)", ["Consent.patient"])

    # ---- audit basis
    def annotate(self, ctx: StageContext, conn: Connection) -> None:
        principal = ctx.principal
        if principal is None or ctx.interaction.kind not in READING:
            return
        decision: Decision | None = principal.consent
        if decision is None or decision.mode == "exempt" or not decision.any_rules:
            return  # no Consent existed: the default policy (already recorded) decided
        pks = ctx.capture.pks  # the resource rows the handler returned (no lookup by reference)
        if not pks:
            return
        if decision.mode == "break-glass":
            filtering = replace(decision, mode="filter", reason=None)
            for cid in self.engine.deciding_consents(conn, pks, filtering, "deny"):
                ctx.capture.entity(consent_entity(cid, "denied; overridden by break-the-glass"))
            return
        for cid in self.engine.deciding_consents(conn, pks, decision, "permit"):
            ctx.capture.entity(consent_entity(cid, f"permitted disclosure for {decision.purpose}"))

    # ---- alerts, denial bursts (inside the audit transaction)
    def finish(self, ctx: StageContext, conn: Connection) -> None:
        rec: AuditRecord = ctx.record
        principal = ctx.principal
        decision: Decision | None = principal.consent if principal else None
        if decision is not None and rec.status < 400 and decision.mode in ("exempt", "break-glass"):
            raise_alert(conn, "break-glass" if decision.mode == "break-glass" else "consent-exempt",
                        rec.client_id, rec.request_id,
                        {"purpose": decision.purpose, "reason": decision.reason, "interaction": rec.interaction,
                         "user": rec.user,
                         "target": rec.target or rec.resource_type, "patients": rec.patients[:50],
                         "overridden_consents": [e["what"]["reference"] for e in rec.extra_entities
                                                 if e.get("what", {}).get("reference", "").startswith("Consent/")]})
        if decision is not None and rec.status == 403 and rec.outcome_desc.startswith(TRANSFER_REFUSED):
            kind, subject = account_of(rec.client_id or "", rec.user)
            raise_alert(conn, "cross-border", rec.client_id, rec.request_id,
                        {"jurisdiction": decision.jurisdiction, "interaction": rec.interaction,
                         "target": rec.target or rec.resource_type, "patients": rec.patients[:50],
                         "account": subject, "account_kind": kind})
        if not rec.client_id or rec.status not in (403, 404):
            return
        if rec.status == 404:
            if decision is None or decision.mode != "filter" or rec.interaction not in HIDING_404 \
                    or not rec.target:
                return
            pks = _pks(conn, [rec.target])
            if not pks:
                return  # really absent
            denied = self.engine.deciding_consents(conn, pks, decision, "deny")
            for cid in denied:
                ctx.capture.entity(consent_entity(cid, "denied by consent"))
            if denied:
                metrics.consent_denial(rec.resource_type)
            rec.outcome_desc = (rec.outcome_desc + " (hidden by consent)").strip()
        outcome = note_denial(conn, rec.client_id, rec.user, rec.request_id, self.burst_threshold, self.burst_suspend)
        if outcome == "suspended":
            who = f"user {rec.user}" if rec.user else f"client {rec.client_id}"
            suspended = AuditRecord(interaction="update", request_id=rec.request_id, network_address="localhost",
                                    recorded_us=now_us(), status=200,
                                    outcome_desc=f"{who} suspended after a burst of denied requests")
            suspended.subtype_code = ("urn:fhirserver:admin", "client-suspend", "Client suspended") if not rec.user \
                else ("urn:fhirserver:admin", "user-suspend", "User suspended")
            suspended.target = rec.user or f"Device/{rec.client_id}"
            self.audit.append(conn, suspended)


def _asked_purpose(principal: Principal, headers: dict[str, str]) -> tuple[str | None, str]:
    """The purpose of use the request asks for (X-Purpose-Of-Use; None: the client's default)
    and a break-the-glass reason; a purpose the client is not registered for, or break-the-glass
    without the registration or a reason, is a 403 before any data is read."""
    asked = (headers.get("x-purpose-of-use") or "").strip()
    reason = (headers.get("x-break-glass-reason") or "").strip()[:500]
    if asked == BREAK_GLASS_PURPOSE:
        if not principal.client_settings.get("break_glass"):
            raise FhirError(403, "forbidden", "X-Purpose-Of-Use ETREAT (break-the-glass) is refused: this client "
                                              "is not registered for break-the-glass access")
        if not reason:
            raise FhirError(403, "forbidden", "Break-the-glass (X-Purpose-Of-Use: ETREAT) needs a reason in the "
                                              "X-Break-Glass-Reason header")
        return asked, reason
    if asked:
        purposes = registered_purposes(principal)
        if asked not in purposes:
            raise FhirError(403, "forbidden", f"X-Purpose-Of-Use '{asked[:40]}' is not among the purposes this "
                                              f"client is registered for ({', '.join(purposes)})")
        return asked, ""
    return None, ""


def _pks(conn: Connection, refs: list[str]) -> list[int]:
    by_type: dict[str, list[str]] = {}
    for ref in refs:
        rtype, _, rid = ref.partition("/")
        if rid:
            by_type.setdefault(rtype, []).append(rid)
    if not by_type:
        return []
    conds = [and_(resource.c.type == t, resource.c.id.in_(ids)) for t, ids in by_type.items()]
    return [r[0] for r in conn.execute(select(resource.c.pk).where(or_(*conds))).all()]


def _age(birth: object) -> int | None:
    if not isinstance(birth, str) or len(birth) < 4:
        return None
    try:
        year = int(birth[:4])
        month = int(birth[5:7]) if len(birth) >= 7 else 1
        day = int(birth[8:10]) if len(birth) >= 10 else 1
        born = date(year, month, day)
    except ValueError:
        return None
    today = date.today()
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))

