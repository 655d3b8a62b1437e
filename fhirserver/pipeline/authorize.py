"""Authorization: may this principal ask this, and over which rows?

Scopes are checked before any data is touched (403 for an interaction no scope allows). What a
scope allows becomes an SQL predicate over the `resource` table -- the patient compartment of a
`patient/` scope, a v2 granular restriction such as `?category=laboratory` -- which the
executor ANDs into every query, so invisible rows are never read, counted or paged.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from sqlalchemy import ColumnElement, FromClause, and_, false, or_, select

from ..auth.principal import Principal
from ..auth.scopes import ResourceScope
from ..fhir.errors import FhirError
from ..fhir.ownership import owner_code, owner_query
from ..fhir.registry import TypeRegistry
from ..search.compiler import QueryCompiler, fresh_aliases
from ..search.params import ParamRegistry
from ..search.parser import parse_search
from ..search.sources import source_of

_MAX_RESTRICTIONS = 1024  # distinct (scope query, type) pairs kept compiled


def compartment_predicate(rtype: str, patient_ids: list[str], res: FromClause | None = None) -> ColumnElement[bool]:
    res = source_of(rtype).res if res is None else res
    if not patient_ids:
        return false()
    if rtype == "Patient":
        return res.c.id.in_(patient_ids)
    comp = source_of(rtype).compartment.alias()
    return res.c.pk.in_(select(comp.c.resource_pk).where(comp.c.patient_id.in_(patient_ids)))


READING_INTERACTIONS = frozenset({"read", "vread", "history-instance", "history-type", "search-type"})


class Authorizer:
    def __init__(self, params: ParamRegistry, compiler: QueryCompiler, types: TypeRegistry) -> None:
        self.params = params
        self.compiler = compiler
        self.types = types
        self._restrictions: dict[tuple[str, str], tuple[ColumnElement[bool], ...] | None] = {}

    def _restriction(self, query: str, rtype: str, res: FromClause) -> tuple[ColumnElement[bool], ...] | None:
        """A v2 scope's `?query` as predicates over `res`; None if it cannot be evaluated.

        Depends only on the scope text and the type, so it is compiled once per (query, type)
        over the `resource` table instead of parsing and compiling it on every request. Not
        cached: other aliases, chains and `_has` (they carry aliases of their own) and `ap`
        values (their tolerance depends on the current time)."""
        key = (query, rtype)
        if res is source_of(rtype).res and key in self._restrictions:
            return self._restrictions[key]
        try:
            parsed = parse_search(self.params, rtype, parse_qsl(query), 1, 1, strict=True)
            with fresh_aliases():  # kept and reused in other statements: never a pooled alias
                found: tuple[ColumnElement[bool], ...] | None = tuple(self.compiler.where(parsed, res))
        except FhirError:
            parsed, found = None, None
        cacheable = res is source_of(rtype).res and (parsed is None or not any(
            c.chain or c.has or any(v.startswith("ap") for v in c.values) for c in parsed.clauses))
        if cacheable:
            if len(self._restrictions) >= _MAX_RESTRICTIONS:
                self._restrictions.clear()
            self._restrictions[key] = found
        return found

    def _patients_for(self, principal: Principal, scope: ResourceScope) -> list[str] | None:
        """Patient ids a scope is confined to; None = not confined to a compartment."""
        if scope.context == "patient":
            return [principal.patient] if principal.patient else []
        if scope.context == "user":
            user = principal.fhir_user or ""
            if user.startswith("Patient/"):
                return [user.split("/", 1)[1], *principal.linked_patients]
            if user.startswith("RelatedPerson/"):  # a guardian or proxy: the patients linked to them
                return list(principal.linked_patients)
            if user.startswith(("Practitioner/", "PractitionerRole/")):
                return None
            return []  # a user scope without a known user grants nothing
        return None

    @staticmethod
    def _check_reader(principal: Principal, rtype: str, role: str | None, purposes: frozenset[str]) -> None:
        """Role and purpose rules of a type (docs/security.md). A patient reading records about
        themselves is not held to them: the consent stage confines those reads to their own."""
        if principal.reads_own_records:
            return
        if role and not principal.has_role(role):
            raise FhirError(403, "forbidden", f"Reading {rtype} is reserved to clients registered as {role} "
                                              f"(fhirserver client register --{role})")
        purpose = principal.purpose[0] if principal.purpose else ""
        if purposes and purpose not in purposes:
            raise FhirError(403, "forbidden", f"{rtype} may not be read for purpose of use '{purpose}' "
                                              f"(allowed: {', '.join(sorted(purposes))})")

    def _owned(self, principal: Principal, rtype: str, res: FromClause) -> ColumnElement[bool]:
        """A type whose rows are their writer's (fhir/ownership.py): the caller's own rows, in
        place of a patient compartment (patient apps subscribe too)."""
        code = owner_code(principal.client_id, principal.fhir_user, principal.patient)
        restriction = self._restriction(owner_query(code), rtype, res)
        return and_(*restriction) if restriction else false()

    def compartments(self, principal: Principal, rtype: str, interaction: str) -> list[str] | None:
        """The patients whose records the caller's scopes for `interaction` on `rtype` confine it
        to; None when one of them is not confined to a compartment."""
        spec = self.types.get(rtype)
        explicit = bool(spec is not None and spec.read_access and spec.read_access.explicit_scope)
        if spec is not None and spec.owned_by_client:
            return None  # owned rows are in no patient's compartment: the owner rule confines them
        out: list[str] = []
        for scope in principal.scopes.for_interaction(rtype, interaction, explicit_only=explicit):
            patients = self._patients_for(principal, scope)
            if patients is None:
                return None
            out.extend(p for p in patients if p not in out)
        return out

    def predicates(self, principal: Principal, rtype: str, interaction: str,
                   res: FromClause | None = None) -> list[ColumnElement[bool]]:
        """Raise 403 if no scope allows the interaction; else the row predicates (over `res`,
        by default the type's own table: search/sources.py)."""
        res = source_of(rtype).res if res is None else res
        spec = self.types.get(rtype)
        rule = spec.read_access if spec is not None else None
        explicit = bool(rule and rule.explicit_scope)
        scopes = principal.scopes.for_interaction(rtype, interaction, explicit_only=explicit)
        if not scopes:
            hint = f" (a wildcard scope does not grant {rtype}: name it, e.g. system/{rtype}.rs)" if explicit else ""
            raise FhirError(403, "forbidden",
                            f"The access token has no scope that permits '{interaction}' on {rtype}{hint}")
        if rule is not None and interaction in READING_INTERACTIONS:
            self._check_reader(principal, rtype, rule.client_role, rule.purposes)
        owned = self._owned(principal, rtype, res) if spec is not None and spec.owned_by_client else None
        alternatives: list[ColumnElement[bool]] = []
        for scope in scopes:
            conds: list[ColumnElement[bool]] = []
            patients = self._patients_for(principal, scope)
            if owned is not None:
                conds.append(owned)  # the caller's own rows, whatever the scope's context
            elif patients is not None:
                if not patients:
                    continue
                conds.append(compartment_predicate(rtype, patients, res))
            if scope.query:
                restriction = self._restriction(scope.query, rtype, res)
                if restriction is None:
                    continue  # a restriction we cannot evaluate grants nothing (fail closed)
                conds.extend(restriction)
            if not conds:
                return []  # unrestricted
            alternatives.append(and_(*conds))
        if not alternatives:
            raise FhirError(403, "forbidden", f"The access token's scopes grant no access to {rtype} in this context")
        return [or_(*alternatives)] if len(alternatives) > 1 else alternatives
