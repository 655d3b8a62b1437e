"""The consent engine: which rows a request may see, as SQL predicates (issue 6).

The pipeline's consent stage calls `predicates(principal, type, interaction, table)` for every
table the request reads -- the main search, chained and `_has` sub-queries, `_include` /
`_revinclude`, history, `$everything`, `$lastn` -- and ANDs them into the same statement, so
totals, pages and links are computed over visible rows only.

For a resource row `r` and the request's purpose `p` and actors `A` (the user's fhirUser, the
client's Organization, `Device/<client_id>`), a rule (a provision of an active privacy Consent of a
patient whose compartment contains `r`, in force now) *decides* when it matches (every criterion
group has a matching value) and none of its nested provisions matches. Then:

    visible(r) = NOT deny-decides(r)
                 AND (default(p) = permit OR permit-decides(r))
                 AND (r carries no sensitivity label OR an explicit permit decides(r))

where an explicit permit is one whose provision (or a parent) names a code or a securityLabel.
The patient themself and linked guardian/proxy users see their own compartment unfiltered;
consent-exempt clients and break-the-glass requests are not filtered (and are audited/alerted).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    FromClause,
    and_,
    case,
    false,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement, Select

from ..db.schema import (
    compartment,
    consent_criterion,
    consent_rule,
    idx_date,
    idx_reference,
    idx_token,
    resource,
)
from ..fhir.errors import FhirError
from ..search.dates import now_us
from .labels import SensitiveCodes
from .rules import ACTOR_PARAM, canonical_actor

# the clinical date of each type (dataPeriod is matched against it)
CLINICAL_DATE_PARAMS = ("date", "authored")
NOT_FILTERED_TYPES = frozenset({"AuditEvent"})  # the audit trail is governed by scopes only
DEFAULT_OPT_OUT = ("TREAT", "HPAYMT", "HOPERAT")
BREAK_GLASS_PURPOSE = "ETREAT"
POLICY_SYSTEM = "urn:fhirserver:consent-policy"


class now_micros(FunctionElement[int]):  # noqa: N801 - an SQL function
    """The database's current time in microseconds since the epoch (like every time column)."""

    type = BigInteger()
    inherit_cache = True
    name = "now_micros"


@compiles(now_micros, "sqlite")
def _now_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    return "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"


@compiles(now_micros)
def _now_default(element: Any, compiler: Any, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM now()) * 1000000 AS BIGINT)"


@dataclass(frozen=True)
class _Templates:
    row: Any  # the resource alias the templates are built over (correlate: row.pk == caller's pk)
    rule: Any
    tok: Any
    score: Select[Any]
    consents: Select[Any]
    sensitive: Select[Any]


@dataclass
class Decision:
    """What the consent stage decided for one request (kept on the Principal)."""

    purpose: str
    mode: str = "filter"  # filter | exempt | break-glass
    reason: str | None = None
    actors: list[str] = field(default_factory=list)  # keyed digests of the requester's references
    own_patients: list[str] = field(default_factory=list)  # unfiltered compartments (self, guardian, proxy)
    now_us: int = 0
    any_rules: bool = True  # False: the rule table was empty when the request started (fast path)


class ConsentEngine:
    def __init__(self, codes: SensitiveCodes, digest: Callable[[str], str],
                 opt_out_purposes: tuple[str, ...] = DEFAULT_OPT_OUT) -> None:
        self.codes = codes
        self.digest = digest
        self.opt_out = frozenset(opt_out_purposes)

    # ------------------------------------------------------------------ who is asking, for what
    def decide(self, principal: Any, headers: dict[str, str]) -> Decision:
        settings = principal.client_settings or {}
        purposes = [p for p in settings.get("purposes") or ["TREAT"] if isinstance(p, str)]
        asked = (headers.get("x-purpose-of-use") or "").strip()
        reason = (headers.get("x-break-glass-reason") or "").strip()
        mode = "filter"
        if asked == BREAK_GLASS_PURPOSE:
            if not settings.get("break_glass"):
                raise FhirError(403, "forbidden", "X-Purpose-Of-Use ETREAT (break-the-glass) is refused: this client "
                                                  "is not registered for break-the-glass access")
            if not reason:
                raise FhirError(403, "forbidden", "Break-the-glass (X-Purpose-Of-Use: ETREAT) needs a reason in the "
                                                  "X-Break-Glass-Reason header")
            purpose, mode = asked, "break-glass"
        elif asked:
            if asked not in purposes:
                raise FhirError(403, "forbidden", f"X-Purpose-Of-Use '{asked[:40]}' is not among the purposes this "
                                                  f"client is registered for ({', '.join(purposes)})")
            purpose = asked
        else:
            purpose = purposes[0] if purposes else "TREAT"
        if mode == "filter" and settings.get("consent_exempt"):
            mode = "exempt"
        actors = [f"Device/{principal.client_id}"]
        if principal.organization:
            actors.append(canonical_actor(principal.organization))
        if principal.fhir_user:
            actors.append(canonical_actor(principal.fhir_user))
        own: list[str] = []
        user = principal.fhir_user or ""
        if user.startswith("Patient/"):
            own.append(user.split("/", 1)[1])
        if user:
            own.extend(principal.linked_patients)
        return Decision(purpose, mode, reason[:500] or None, [self.digest(a) for a in actors], own, now_us())

    def decision_of(self, principal: Any) -> Decision:
        decision = getattr(principal, "consent", None)
        if decision is None:
            decision = self.decide(principal, {})
            principal.consent = decision
        return decision

    # ------------------------------------------------------------------ the predicates
    def predicates(self, principal: Any, resource_type: str, interaction: str,
                   res: FromClause = resource) -> list[ColumnElement[bool]]:
        d = self.decision_of(principal)
        if resource_type == "AuditEvent" and d.own_patients:
            # transparency: a patient (or guardian) sees the AuditEvents about their own data --
            # and only those that involve no one else, since an event names every patient and
            # resource it touched (multi-patient events stay with the privacy office)
            comp = compartment.alias()
            return [~_exists([comp], comp.c.resource_pk == res.c.pk, comp.c.patient_id.not_in(d.own_patients))]
        if d.mode != "filter" or resource_type in NOT_FILTERED_TYPES:
            return []
        pred = self.visible(res, d)
        if d.own_patients:
            comp = compartment.alias()
            own = res.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id.in_(d.own_patients)))
            pred = or_(own, pred)
        return [pred]

    def visible(self, res: FromClause, d: Decision) -> ColumnElement[bool]:
        """One correlated score per row: the strongest deciding rule (4 deny, 2 explicit permit,
        1 permit, 0/NULL none), compared with the least the row needs (0 opt-out, 1 opt-in, 2 when
        it carries a sensitivity label). Kept flat: SQLite's parser limits nesting depth, and this
        predicate is nested again inside chains, _has and includes."""
        t = self._templates(d.purpose, tuple(d.actors))
        sensitive = t.sensitive.where(t.tok.c.resource_pk == res.c.pk).exists()
        if not d.any_rules:
            # no Consent anywhere: every row scores 0, so only the defaults apply (same result,
            # without the per-row rule probes and their cost in every statement)
            return and_(~sensitive) if d.purpose in self.opt_out else false()
        score = func.coalesce(t.score.where(t.row.c.pk == res.c.pk).scalar_subquery(), 0)
        # written so that a row is probed once in the common case (no sensitivity label): SQLite
        # evaluates a correlated sub-query at every mention, and BETWEEN/CASE forms mention it twice
        allowed = score < 4 if d.purpose in self.opt_out else score.in_([1, 2])
        return and_(allowed, or_(~sensitive, score == 2))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - the engine lives as long as the process
    def _templates(self, purpose: str, actors: tuple[str, ...]) -> _Templates:
        """The request-independent parts of the predicate, built once per (purpose, actors): the
        score and sensitivity sub-queries over their own aliases, correlated to the caller's row
        by one added condition. (Building these SQLAlchemy trees costs milliseconds; the time
        of day is evaluated by the database, so nothing else varies between requests.)"""
        d = Decision(purpose, actors=list(actors))
        row, rule, comp = resource.alias(), consent_rule.alias(), compartment.alias()
        value = case((rule.c.effect == "deny", 4), (rule.c.explicit.is_(True), 2), else_=1)
        joined = row.join(comp, comp.c.resource_pk == row.c.pk).join(rule, rule.c.patient_id == comp.c.patient_id)
        deciding = [rule.c.effect != "none", self._in_force(rule), self.decides(rule, row, d)]
        score = select(func.max(value)).select_from(joined).where(*deciding).correlate_except(row, comp, rule)
        cres = resource.alias()
        consents = (select(cres.c.id).distinct().select_from(joined.join(cres, cres.c.pk == rule.c.consent_pk))
                    .where(*deciding).order_by(cres.c.id).limit(100))
        tok = idx_token.alias()
        systems: dict[str, list[str]] = {}
        for system, code in self.codes.label_pairs:
            systems.setdefault(system, []).append(code)
        labelled = or_(*[and_(tok.c.system == s, tok.c.code.in_(codes)) for s, codes in systems.items()]) \
            if systems else false()
        sensitive = select(literal(1)).select_from(tok).where(tok.c.param == "_security", labelled) \
            .correlate_except(tok)
        return _Templates(row, rule, tok, score, consents, sensitive)

    def _in_force(self, rule: Any) -> ColumnElement[bool]:
        now = now_micros()
        return and_(rule.c.start_us <= now, rule.c.end_us >= now)

    def matches(self, rule: Any, res: FromClause, d: Decision) -> ColumnElement[bool]:
        """Every criterion group of `rule` has a value matching the row `res` and the request:
        the number of distinct groups with a matching value equals the rule's group count."""
        item, tok = consent_criterion.alias(), idx_token.alias()
        ref, dat = idx_reference.alias(), idx_date.alias()
        joined = (
            item.outerjoin(tok, and_(item.c.kind.in_(("code", "label")), tok.c.resource_pk == res.c.pk,
                                     tok.c.param == case((item.c.kind == "code", "code"), else_="_security"),
                                     tok.c.code == item.c.value,
                                     or_(item.c.system.is_(None), tok.c.system == item.c.system)))
            .outerjoin(ref, and_(item.c.kind == "code", ref.c.resource_pk == res.c.pk,
                                 ref.c.param == "questionnaire", ref.c.url == item.c.value))
            .outerjoin(dat, and_(item.c.kind == "period", dat.c.resource_pk == res.c.pk,
                                 dat.c.param.in_(CLINICAL_DATE_PARAMS), dat.c.low_us >= item.c.low_us,
                                 dat.c.high_us <= item.c.high_us))
        )
        one = or_(
            and_(item.c.kind == "actor", item.c.value.in_(d.actors)) if d.actors else false(),
            and_(item.c.kind == "purpose", item.c.value == d.purpose),
            and_(item.c.kind == "class", item.c.value == res.c.type),
            and_(item.c.kind == "data", item.c.system == res.c.type, item.c.value == res.c.id),
            tok.c.resource_pk.is_not(None), ref.c.resource_pk.is_not(None), dat.c.resource_pk.is_not(None),
        )
        matched = (select(func.count(item.c.grp.distinct())).select_from(joined)
                   .where(item.c.rule_pk == rule.c.pk, one)
                   .correlate_except(item, tok, ref, dat).scalar_subquery())
        return matched == rule.c.n_groups

    def decides(self, rule: Any, res: FromClause, d: Decision) -> ColumnElement[bool]:
        child = consent_rule.alias()
        return and_(self.matches(rule, res, d), ~_exists(
            [child], child.c.parent_pk == rule.c.pk, self._in_force(child), self.matches(child, res, d)))

    # ------------------------------------------------------------------ the audit basis
    def deciding_consents(self, conn: Connection, pks: list[int], d: Decision, effect: str) -> list[str]:
        """Ids of the Consents whose rules decided (`effect`) for these resources."""
        if not pks or not d.any_rules:
            return []
        t = self._templates(d.purpose, tuple(d.actors))
        stmt = t.consents.where(t.row.c.pk.in_(pks), t.rule.c.effect == effect)
        return [r[0] for r in conn.execute(stmt).all()]

    def count_rules(self, conn: Connection) -> int:
        return conn.execute(select(func.count()).select_from(consent_rule)).scalar_one()

    @staticmethod
    def rules_exist(conn: Connection) -> bool:
        return conn.execute(_ANY_RULE).first() is not None


_ANY_RULE = select(consent_rule.c.pk).limit(1)


def _exists(tables: list[Any], *conds: ColumnElement[bool]) -> ColumnElement[bool]:
    """EXISTS over `tables`, correlated to every enclosing query for all other tables (SQLAlchemy
    would otherwise correlate only to the immediately enclosing SELECT)."""
    return select(literal(1)).select_from(*tables).where(*conds).correlate_except(*tables).exists()


def actor_digest(blind: Any) -> Callable[[str], str]:
    def digest(ref: str) -> str:
        return blind.digest(ACTOR_PARAM, "r", ref)

    return digest


def policy_entity(purpose: str, description: str) -> dict[str, Any]:
    return {
        "what": {"identifier": {"system": POLICY_SYSTEM, "value": f"default-policy:{purpose}"}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                 "display": "System Object"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13",
                 "display": "Security Resource"},
        "description": description,
    }


def consent_entity(consent_id: str, description: str) -> dict[str, Any]:
    return {
        "what": {"reference": f"Consent/{consent_id}"},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                 "display": "System Object"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13",
                 "display": "Security Resource"},
        "description": description,
    }

