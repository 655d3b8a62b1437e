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

Cross-border transfer: a client registered with a jurisdiction other than the deployment's sees a
row in a patient's compartment only when a permit of that patient with the client's jurisdiction as
recipient (`rules.RECIPIENT_JURISDICTION`) decides for it -- ANDed to everything above, for every
mode but break-the-glass, and for the patient's own compartment too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
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
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import BindParameter, ClauseElement, FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal

from ..auth.principal import Decision, Principal
from ..clock import now_us
from ..crypto.blind_index import BlindIndexer
from ..db import raw as raw_sql
from ..db.schema import (
    compartment,
    consent_criterion,
    consent_rule,
    idx_date,
    idx_reference,
    idx_token,
    resource,
)
from ..search.sources import source_of
from .elements import ConsentElements
from .labels import SensitiveCodes
from .rules import ACTOR_PARAM, canonical_actor

NOT_FILTERED_TYPES = frozenset({"AuditEvent"})  # the audit trail is governed by scopes only
DEFAULT_OPT_OUT = ("TREAT", "HPAYMT", "HOPERAT")
BREAK_GLASS_PURPOSE = "ETREAT"


class now_micros(FunctionElement[int]):  # noqa: N801 - an SQL function
    """The database's current time in microseconds since the epoch (like every time column)."""

    type = BigInteger()
    inherit_cache = True
    name = "now_micros"


@compiles(now_micros, "sqlite")
def _now_sqlite(element: ClauseElement, compiler: SQLCompiler, **kw: object) -> str:
    return "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"


@compiles(now_micros)
def _now_default(element: ClauseElement, compiler: SQLCompiler, **kw: object) -> str:
    return "CAST(EXTRACT(EPOCH FROM now()) * 1000000 AS BIGINT)"


_Builder = Callable[[Sequence[FromClause], Sequence[BindParameter[Any]], tuple[Any, ...]], ColumnElement[bool]]


class _Deferred(ColumnElement[bool]):
    """A consent condition whose SQL tree is built only when its statement is compiled.

    SQLAlchemy looks a statement's compiled form up by hashing every element of the statement, at
    every execution, and the consent predicate (rule matching, for each rule and its exceptions)
    is most of a search statement. This element stands for it with a short cache key: the tables
    it is correlated to, the request's values as bound parameters (extracted at each execution like
    any other parameter), the builder's name and `shape`, which must hold everything else the
    builder depends on. The builder runs on a compiled-cache miss only.
    """

    inherit_cache = False
    type = Boolean()
    _traverse_internals = [
        ("tables", InternalTraversal.dp_clauseelement_list),
        ("bound", InternalTraversal.dp_clauseelement_list),
        ("shape", InternalTraversal.dp_plain_obj),
    ]

    def __init__(self, build: _Builder, tables: Sequence[FromClause], params: Sequence[BindParameter[Any]],
                 shape: tuple[Any, ...] = ()) -> None:
        self.build = build
        self.tables = list(tables)
        self.bound = list(params)
        self.shape = (build.__name__, *shape)


@compiles(_Deferred)
def _compile_deferred(element: _Deferred, compiler: SQLCompiler, **kw: Any) -> str:
    tree = element.build(element.tables, element.bound, element.shape[1:])
    return str(compiler.process(tree, **kw))


def registered_purposes(principal: Principal) -> list[str]:
    """The purposes of use the client was registered for, its default first (TREAT if none)."""
    listed = [p for p in principal.client_settings.get("purposes") or [] if isinstance(p, str)]
    return listed or ["TREAT"]


class ConsentEngine:
    def __init__(self, codes: SensitiveCodes, digest: Callable[[str], str],
                 opt_out_purposes: tuple[str, ...] = DEFAULT_OPT_OUT,
                 elements: ConsentElements | None = None, jurisdiction: str = "",
                 owned_types: frozenset[str] = frozenset()) -> None:
        self.codes = codes
        # types whose rows are their writer's own configuration, not a patient's data (the registry's
        # ownedByClient: Subscription): the owner rule governs them, patients' Consents do not
        self.unfiltered = NOT_FILTERED_TYPES | owned_types
        self.home = jurisdiction
        self.elements = elements or ConsentElements()
        self.digest = digest
        self.opt_out = frozenset(opt_out_purposes)
        self._rules_seen = False  # a Consent rule was stored at some point (rules_exist)
        # the audit-basis query without its conditions (building its aliases per call cost ~0.7 ms)
        row, comp, rule, cres = resource.alias(), compartment.alias(), consent_rule.alias(), resource.alias()
        joined = (row.join(comp, comp.c.resource_pk == row.c.pk).join(rule, rule.c.patient_id == comp.c.patient_id)
                  .join(cres, cres.c.pk == rule.c.consent_pk))
        self._consents = (select(cres.c.id).distinct().select_from(joined).order_by(cres.c.id).limit(100), row, rule)

    # ------------------------------------------------------------------ who is asking, for what
    def decide(self, principal: Principal, purpose: str | None = None, break_glass_reason: str = "") -> Decision:
        """The decision for `principal` asking for `purpose` (None: its registered default;
        ETREAT: break-the-glass, with its reason). The consent stage has checked the purpose
        against the client's registration (consent/stage._asked_purpose)."""
        settings = principal.client_settings or {}
        purpose = purpose or registered_purposes(principal)[0]
        reason = break_glass_reason
        mode = "break-glass" if purpose == BREAK_GLASS_PURPOSE else "filter"
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
        place = str(settings.get("jurisdiction") or self.home).upper() if self.home else ""
        return Decision(purpose, mode, reason[:500] or None, [self.digest(a) for a in actors], own, now_us(),
                        jurisdiction=place, transfer=place != self.home)

    def decision_of(self, principal: Principal) -> Decision:
        """The request's decision (attached by the pipeline), or the client's defaults for a
        principal outside a request (an export job re-applying its caller's rules)."""
        decision = principal.consent
        return decision if decision is not None else self.decide(principal)

    # ------------------------------------------------------------------ the predicates
    def predicates(self, principal: Principal, resource_type: str, interaction: str,
                   res: FromClause | None = None) -> list[ColumnElement[bool]]:
        d = self.decision_of(principal)
        source = source_of(resource_type)
        res = source.res if res is None else res
        if resource_type == "AuditEvent" and d.own_patients:
            # transparency: a patient (or guardian) sees every AuditEvent about their own data,
            # also those that touched several patients at once -- each rendered as its
            # per-patient projection (audit/projection.py), never naming anyone else
            comp = source.compartment.alias()
            return [_exists([comp], comp.c.resource_pk == res.c.pk, comp.c.patient_id.in_(d.own_patients))]
        if resource_type in self.unfiltered:
            return []
        preds = [self.transfer_permitted(res, d)] if d.transfer and d.mode != "break-glass" else []
        if d.mode != "filter":
            return preds
        pred = self.visible(res, d)
        if d.own_patients:
            comp = compartment.alias()
            own = res.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id.in_(d.own_patients)))
            pred = or_(own, pred)
        return [pred, *preds]

    def transfer_permitted(self, res: FromClause, d: Decision) -> ColumnElement[bool]:
        """The row is in no patient's compartment, or every patient whose compartment holds it has
        a permit for the client's jurisdiction that decides for it (purpose, actor, data...)."""
        return _Deferred(self._transfer_sql, [res], _request_params(d))

    def _transfer_sql(self, tables: Sequence[FromClause], params: Sequence[BindParameter[Any]],
                      shape: tuple[Any, ...]) -> ColumnElement[bool]:
        (res,), (purpose, place, *actors) = tables, params
        comp, rule, where = compartment.alias(), consent_rule.alias(), consent_criterion.alias()
        permit = _exists([rule, where], rule.c.patient_id == comp.c.patient_id, rule.c.effect == "permit",
                         where.c.rule_pk == rule.c.pk, where.c.kind == "jurisdiction", where.c.value == place,
                         *self._deciding(rule, res, purpose, place, actors))
        return ~_exists([comp], comp.c.resource_pk == res.c.pk, ~permit)

    def visible(self, res: FromClause, d: Decision) -> ColumnElement[bool]:
        """One correlated score per row: the strongest deciding rule (4 deny, 2 explicit permit,
        1 permit, 0/NULL none), compared with the least the row needs (0 opt-out, 1 opt-in, 2 when
        it carries a sensitivity label). Kept flat: SQLite's parser limits nesting depth, and this
        predicate is nested again inside chains, _has and includes."""
        shape = (d.purpose in self.opt_out, tuple(self.codes.label_pairs))
        if not d.any_rules:
            # no Consent anywhere: every row scores 0, so only the defaults apply (same result,
            # without the per-row rule probes and their cost in every statement)
            return _Deferred(self._default_sql, [res], [], shape)
        return _Deferred(self._visible_sql, [res], _request_params(d), shape)

    def _default_sql(self, tables: Sequence[FromClause], params: Sequence[BindParameter[Any]],
                     shape: tuple[Any, ...]) -> ColumnElement[bool]:
        opt_out, labels = shape
        return ~self._sensitive(tables[0], labels) if opt_out else false()

    def _visible_sql(self, tables: Sequence[FromClause], params: Sequence[BindParameter[Any]],
                     shape: tuple[Any, ...]) -> ColumnElement[bool]:
        (res,), (purpose, place, *actors), (opt_out, labels) = tables, params, shape
        comp, rule = compartment.alias(), consent_rule.alias()
        value = case((rule.c.effect == "deny", 4), (rule.c.explicit.is_(True), 2), else_=1)
        score = func.coalesce(
            select(func.max(value)).select_from(comp.join(rule, rule.c.patient_id == comp.c.patient_id))
            .where(comp.c.resource_pk == res.c.pk, *self._deciding(rule, res, purpose, place, actors))
            .correlate_except(comp, rule).scalar_subquery(), 0)
        sensitive = self._sensitive(res, labels)
        # CASE <score> WHEN ...: SQLite evaluates a correlated sub-query at every mention, so the
        # score is mentioned once; the label probe runs only for the scores it can change
        if opt_out:
            return case({4: false(), 2: true()}, value=score, else_=~sensitive)
        return case({2: true(), 1: ~sensitive}, value=score, else_=false())

    def _sensitive(self, res: FromClause, labels: tuple[tuple[str, str], ...]) -> ColumnElement[bool]:
        tok = idx_token.alias()
        systems: dict[str, list[str]] = {}
        for system, code in labels:
            systems.setdefault(system, []).append(code)
        labelled = or_(*[and_(tok.c.system == s, _one_of(tok.c.code, codes)) for s, codes in systems.items()]) \
            if systems else false()
        return _exists([tok], tok.c.param == "_security", labelled, tok.c.resource_pk == res.c.pk)

    def _in_force(self, rule: FromClause) -> ColumnElement[bool]:
        now = now_micros()
        return and_(rule.c.start_us <= now, rule.c.end_us >= now)

    def _deciding(self, rule: FromClause, row: FromClause, purpose: BindParameter[Any], place: BindParameter[Any],
                  actors: Sequence[BindParameter[Any]]) -> list[ColumnElement[bool]]:
        """`rule` decides for `row`: it has an effect, is in force, matches, and none of its
        nested provisions (exceptions) in force matches."""
        child = consent_rule.alias()
        return [rule.c.effect != "none", self._in_force(rule), self._matches(rule, row, purpose, place, actors),
                ~_exists([child], child.c.parent_pk == rule.c.pk, self._in_force(child),
                         self._matches(child, row, purpose, place, actors))]

    def _matches(self, rule: FromClause, row: FromClause, purpose: BindParameter[Any], place: BindParameter[Any],
                 actors: Sequence[BindParameter[Any]]) -> ColumnElement[bool]:
        """Every criterion group of `rule` has a value matching `row` and the request: the number
        of distinct groups with a matching value equals the rule's group count. Row-independent
        kinds are tested first; the index probes are EXISTS terms of the same OR, so a criterion
        probes the index of its own kind only."""
        item = consent_criterion.alias()
        tok, ref, dat = idx_token.alias(), idx_reference.alias(), idx_date.alias()
        kind = item.c.kind
        el = self.elements
        code = [tok.c.resource_pk == row.c.pk, el.param_of("codes", tok.c.param, row.c.type), tok.c.code == item.c.value]
        label = [tok.c.resource_pk == row.c.pk, tok.c.param == "_security", tok.c.code == item.c.value]
        one = or_(
            and_(kind == "purpose", item.c.value == purpose),
            and_(kind == "jurisdiction", item.c.value == place),
            and_(kind == "actor", _one_of(item.c.value, actors)),
            and_(kind == "class", item.c.value == row.c.type),
            and_(kind == "data", item.c.system == row.c.type, item.c.value == row.c.id),
            # split on the system, so that a criterion with one is a single seek in ix_token_code
            and_(kind == "label", or_(and_(item.c.system.is_(None), _exists([tok], *label)),
                                      _exists([tok], *label, tok.c.system == item.c.system))),
            and_(kind == "code", or_(and_(item.c.system.is_(None), _exists([tok], *code)),
                                     _exists([tok], *code, tok.c.system == item.c.system))),
            and_(kind == "code", _exists([ref], ref.c.resource_pk == row.c.pk,
                                         el.param_of("canonicals", ref.c.param, row.c.type),
                                         ref.c.url == item.c.value)),
            and_(kind == "period", _exists([dat], dat.c.resource_pk == row.c.pk,
                                           el.param_of("dates", dat.c.param, row.c.type),
                                           dat.c.low_us >= item.c.low_us, dat.c.high_us <= item.c.high_us)),
        )
        matched = (select(func.count(item.c.grp.distinct())).select_from(item)
                   .where(item.c.rule_pk == rule.c.pk, one)
                   .correlate_except(item).scalar_subquery())
        return matched == rule.c.n_groups

    def _deciding_sql(self, tables: Sequence[FromClause], params: Sequence[BindParameter[Any]],
                      shape: tuple[Any, ...]) -> ColumnElement[bool]:
        (rule, row), (purpose, place, *actors) = tables, params
        return and_(*self._deciding(rule, row, purpose, place, actors))

    # ------------------------------------------------------------------ the audit basis
    def deciding_consents(self, conn: Connection, pks: list[int], d: Decision, effect: str) -> list[str]:
        """Ids of the Consents whose rules decided (`effect`) for these resources."""
        if not pks or not d.any_rules:
            return []
        stmt, row, rule = self._consents
        deciding = _Deferred(self._deciding_sql, [rule, row], _request_params(d))
        return [r[0] for r in conn.execute(stmt.where(row.c.pk.in_(pks), rule.c.effect == effect, deciding)).all()]

    def rules_exist(self, conn: Connection) -> bool:
        """Whether any Consent rule is stored. Once one was seen, this process answers True
        without asking again: a stale True only sends a request down the filtering path (the
        same answers, slower); only False is asked of the database every time, since a stale
        False would skip a rule."""
        if self._rules_seen:
            return True
        self._rules_seen = raw_sql.fetchone(conn, "SELECT 1 FROM consent_rule LIMIT 1") is not None
        return self._rules_seen


def _exists(tables: list[Any], *conds: ColumnElement[bool]) -> ColumnElement[bool]:
    """EXISTS over `tables`, correlated to every enclosing query for all other tables (SQLAlchemy
    would otherwise correlate only to the immediately enclosing SELECT)."""
    return select(literal(1)).select_from(*tables).where(*conds).correlate_except(*tables).exists()


def _request_params(d: Decision) -> list[BindParameter[Any]]:
    """The request's purpose, jurisdiction and actor digests as bound parameters (values vary
    per request)."""
    return [literal(d.purpose), literal(d.jurisdiction), *(literal(a) for a in d.actors)]


def _one_of(col: ColumnElement[Any], values: Iterable[object]) -> ColumnElement[bool]:
    """`col IN (?, ?, ...)` with one bound parameter per value: an expanding IN (the default for
    a list) is re-rendered into the statement's text at every execution."""
    items = [v if isinstance(v, ClauseElement) else literal(v) for v in values]
    return col.in_(items) if items else false()


ACTOR_DIGESTS_KEPT = 4096  # actors (clients, organizations, users) whose digest is remembered


def actor_digest(blind: BlindIndexer) -> Callable[[str], str]:
    """The blind-index digest of an actor reference, remembered: every request's decision digests
    its client and user (an HMAC each), and the key does not change while the indexer lives."""

    @functools.lru_cache(maxsize=ACTOR_DIGESTS_KEPT)
    def digest(ref: str) -> str:
        return blind.digest(ACTOR_PARAM, "r", ref)

    return digest
