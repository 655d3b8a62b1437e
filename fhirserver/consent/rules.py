"""Materialize privacy Consents into rule rows at Consent write time.

Consent bodies are stored encrypted, so the query compiler cannot look into them. Whenever a
Consent is created, updated, deleted or reindexed, its rules are replaced -- in the same
transaction as the write -- by rows of `consent_rule` (one per provision, nested provisions
pointing at their parent) and `consent_criterion` (one per criterion value). Only Consents with
`status = active`, scope `patient-privacy` and a `patient` produce rules, so setting a Consent
`inactive` (or deleting it) withdraws it for the very next request.

A criterion group is (nesting level, kind): a rule matches a resource when every group of its
criteria has a matching row. A nested provision carries its parents' groups as well, so it can
only narrow its parent (FHIR: nested provisions are exceptions within the parent's scope).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from ..db.schema import consent_criterion, consent_rule
from ..fhir.dates import MAX_US, MIN_US, parse_range
from ..search.values import parse_reference

KINDS = ("actor", "purpose", "class", "code", "label", "data", "period", "jurisdiction")
PRIVACY_SCOPE = "patient-privacy"
# A provision's recipient jurisdiction (PIPL art. 38-39 separate consent to a cross-border
# transfer): valueCode, an ISO 3166 country code or a union such as EU (docs/consent.md).
RECIPIENT_JURISDICTION = "https://fhirserver.dev/fhir/StructureDefinition/recipient-jurisdiction"
ACTOR_PARAM = "consent-actor"


@dataclass
class Criterion:
    grp: int
    kind: str
    system: str | None = None
    value: str | None = None
    low_us: int | None = None
    high_us: int | None = None


@dataclass
class Rule:
    """One provision, flattened: what the database holds for it (used by the reference tests too)."""

    index: int
    parent: int | None
    effect: str  # permit | deny | none (a root provision without a type only groups exceptions)
    start_us: int
    end_us: int
    criteria: list[Criterion]
    explicit: bool


def _period(value: object) -> tuple[int, int] | None:
    if not isinstance(value, dict):
        return None
    try:
        low = parse_range(value["start"])[0] if isinstance(value.get("start"), str) else MIN_US
        high = parse_range(value["end"])[1] if isinstance(value.get("end"), str) else MAX_US
    except ValueError:
        return None
    return low, high


def _codings(value: object) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        if "coding" in value:
            return [c for c in value.get("coding", []) if isinstance(c, dict)]
        return [value]
    return []


def is_privacy_consent(body: dict[str, Any]) -> str | None:
    """The patient id when the Consent is an active patient-privacy consent, else None."""
    if body.get("resourceType", "Consent") != "Consent" or body.get("status") != "active":
        return None
    scope = body.get("scope")
    if not any(c.get("code") == PRIVACY_SCOPE for c in _codings(scope)):
        return None
    ref = (body.get("patient") or {}).get("reference")
    if not isinstance(ref, str):
        return None
    rtype, rid, _url = parse_reference(ref, "")
    return rid if rtype == "Patient" and rid else None


def canonical_actor(ref: str) -> str:
    """`Practitioner/1`, `https://host/fhir/Practitioner/1` and `Practitioner/1/_history/2` alike."""
    parts = [p for p in ref.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


def flatten(body: dict[str, Any], digest: Callable[[str], str]) -> list[Rule]:
    """The rules of one active privacy Consent (empty for any other Consent)."""
    if is_privacy_consent(body) is None or not isinstance(body.get("provision"), dict):
        return []
    rules: list[Rule] = []

    def walk(prov: dict[str, Any], parent: Rule | None, level: int) -> None:
        groups: list[Criterion] = list(parent.criteria) if parent else []
        explicit = parent.explicit if parent else False
        base = level * len(KINDS)

        def add(kind: str, rows: list[Criterion]) -> None:
            grp = base + KINDS.index(kind)
            if not rows:
                # the criterion is present but nothing in it is usable: it matches nothing
                rows = [Criterion(grp, "never")]
            for row in rows:
                row.grp = grp
            groups.extend(rows)

        if prov.get("actor"):
            refs = [a.get("reference", {}).get("reference") for a in prov["actor"] if isinstance(a, dict)]
            add("actor", [Criterion(0, "actor", None, digest(canonical_actor(r))) for r in refs if isinstance(r, str)])
        if prov.get("purpose"):
            add("purpose", [Criterion(0, "purpose", c.get("system"), c["code"]) for c in prov["purpose"]
                            if isinstance(c, dict) and isinstance(c.get("code"), str)])
        if prov.get("class"):
            add("class", [Criterion(0, "class", c.get("system"), c["code"]) for c in prov["class"]
                          if isinstance(c, dict) and isinstance(c.get("code"), str)])
        if prov.get("code"):
            add("code", [Criterion(0, "code", c.get("system"), c["code"]) for cc in prov["code"]
                         for c in _codings(cc) if isinstance(c.get("code"), str)])
            explicit = True
        if prov.get("securityLabel"):
            add("label", [Criterion(0, "label", c.get("system"), c["code"]) for c in prov["securityLabel"]
                          if isinstance(c, dict) and isinstance(c.get("code"), str)])
            explicit = True
        places = [e.get("valueCode") for e in prov.get("extension") or []
                  if isinstance(e, dict) and e.get("url") == RECIPIENT_JURISDICTION]
        if places:
            add("jurisdiction", [Criterion(0, "jurisdiction", None, p.strip().upper()) for p in places
                                 if isinstance(p, str) and p.strip()])
        if prov.get("dataPeriod"):
            dp = _period(prov["dataPeriod"])
            add("period", [Criterion(0, "period", None, None, dp[0], dp[1])] if dp else [])
        if prov.get("data"):
            rows = []
            for d in prov["data"]:
                ref = (d.get("reference") or {}).get("reference") if isinstance(d, dict) else None
                if isinstance(ref, str):
                    rtype, rid, _url = parse_reference(canonical_actor(ref), "")
                    if rtype and rid:
                        rows.append(Criterion(0, "data", rtype, rid))
            add("data", rows)
        start, end = parent.start_us if parent else MIN_US, parent.end_us if parent else MAX_US
        if prov.get("period") is not None:
            own = _period(prov["period"]) or (MAX_US, MIN_US)  # unusable period: never in force
            start, end = max(start, own[0]), min(end, own[1])
        ptype = prov.get("type")
        effect = ptype if ptype in ("permit", "deny") else (parent.effect if parent else "none")
        rule = Rule(len(rules), parent.index if parent else None, effect, start, end, groups, explicit)
        rules.append(rule)
        for child in prov.get("provision", []) or []:
            if isinstance(child, dict):
                walk(child, rule, level + 1)

    walk(body["provision"], None, 0)
    return rules


def clear(conn: Connection, consent_pk: int) -> None:
    old = select(consent_rule.c.pk).where(consent_rule.c.consent_pk == consent_pk).scalar_subquery()
    conn.execute(delete(consent_criterion).where(consent_criterion.c.rule_pk.in_(old)))
    conn.execute(delete(consent_rule).where(consent_rule.c.consent_pk == consent_pk))


def materialize(conn: Connection, consent_pk: int, body: dict[str, Any] | None,
                digest: Callable[[str], str]) -> int:
    """Replace the rules of one Consent (None: deleted). Returns the number of rules written."""
    clear(conn, consent_pk)
    if body is None:
        return 0
    patient = is_privacy_consent(body)
    rules = flatten(body, digest)
    if patient is None or not rules:
        return 0
    pks: dict[int, int] = {}
    for rule in rules:
        key = conn.execute(insert(consent_rule).values(
            consent_pk=consent_pk, patient_id=patient, parent_pk=pks.get(rule.parent) if rule.parent is not None
            else None, effect=rule.effect, start_us=rule.start_us, end_us=rule.end_us, explicit=rule.explicit,
            n_groups=len({c.grp for c in rule.criteria}),
        )).inserted_primary_key
        assert key is not None
        pk = pks[rule.index] = key[0]
        if rule.criteria:
            conn.execute(insert(consent_criterion), [
                {"rule_pk": pk, "grp": c.grp, "kind": c.kind, "system": c.system, "value": c.value,
                 "low_us": c.low_us, "high_us": c.high_us} for c in rule.criteria])
    return len(rules)
