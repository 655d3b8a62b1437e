"""A plain-Python reference evaluation of the consent rules (docs/consent.md), written directly
over the FHIR JSON of the Consents and resources -- independent of the engine's rule tables and
SQL -- so the tests compare the server against the contract, not against itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhirserver.clock import now_us
from fhirserver.fhir.dates import parse_range

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SENSITIVE = {"HIV", "STD", "PSY", "SUD", "GDIS", "SEX"}
OPT_OUT = {"TREAT", "HPAYMT", "HOPERAT"}


@dataclass
class Request:
    purpose: str = "TREAT"
    mode: str = "filter"  # filter | exempt | break-glass
    actors: set[str] = field(default_factory=set)  # Device/<id>, Organization/x, Practitioner/y
    own: set[str] = field(default_factory=set)  # unfiltered compartments (patient self, guardian)
    scope_patients: set[str] | None = None  # a patient/user scope confines to these compartments


def ref_id(ref: Any, rtype: str = "Patient") -> str | None:
    if isinstance(ref, dict):
        ref = ref.get("reference")
    if isinstance(ref, str) and ref.startswith(rtype + "/"):
        return ref.split("/")[1]
    return None


def patients_of(res: dict[str, Any]) -> set[str]:
    """The patient compartments a resource is in (as the CompartmentDefinition says)."""
    t = res["resourceType"]
    refs: list[Any] = []
    if t == "Patient":
        return {res["id"]}
    if t == "Observation":
        refs = [res.get("subject"), *res.get("performer", [])]
    elif t == "QuestionnaireResponse":
        refs = [res.get("subject"), res.get("author")]
    elif t == "Consent":
        refs = [res.get("patient")]
    elif t == "Condition":
        refs = [res.get("subject"), res.get("asserter")]
    elif t in ("Encounter", "DiagnosticReport"):
        refs = [res.get("subject")]
    return {p for p in (ref_id(r) for r in refs) if p}


def clinical_ranges(res: dict[str, Any]) -> list[tuple[int, int]]:
    """The resource's clinical dates (a dataPeriod matches when one of them lies within it)."""
    t = res["resourceType"]
    if t == "Encounter" and "period" in res:
        return [(parse_range(res["period"]["start"])[0], parse_range(res["period"]["end"])[1])]
    keys = {"Observation": ["effectiveDateTime"], "QuestionnaireResponse": ["authored"], "Consent": ["dateTime"],
            "Condition": ["onsetDateTime", "recordedDate"], "DiagnosticReport": ["effectiveDateTime"]}.get(t, [])
    return [parse_range(res[k]) for k in keys if isinstance(res.get(k), str)]


def codes(res: dict[str, Any]) -> set[tuple[str | None, str]]:
    """The codes a `code` criterion is matched against, per type (profiles/consent-elements.json)."""
    t = res["resourceType"]
    concepts: list[Any] = {"Observation": [res.get("code")], "Condition": [res.get("code")],
                           "DiagnosticReport": [res.get("code")],
                           "Encounter": [*res.get("type", []), *res.get("reasonCode", [])]}.get(t, [])
    return {(c.get("system"), c["code"]) for cc in concepts if isinstance(cc, dict) for c in cc.get("coding", [])}


def _period_ok(period: dict[str, Any] | None, now: int) -> bool:
    if period is None:
        return True
    low = parse_range(period["start"])[0] if "start" in period else -(2**62)
    high = parse_range(period["end"])[1] if "end" in period else 2**62
    return low <= now <= high


def _matches(prov: dict[str, Any], res: dict[str, Any], req: Request, now: int) -> bool:
    if not _period_ok(prov.get("period"), now):
        return False
    if "actor" in prov and not any(a["reference"]["reference"] in req.actors for a in prov["actor"]):
        return False
    if "purpose" in prov and not any(p["code"] == req.purpose for p in prov["purpose"]):
        return False
    if "class" in prov and not any(c["code"] == res["resourceType"] for c in prov["class"]):
        return False
    if "code" in prov:
        wanted = {(c.get("system"), c["code"]) for cc in prov["code"] for c in cc["coding"]}
        have = codes(res)
        ok = any((system is None and any(c == code for _s, c in have)) or (system, code) in have
                 for system, code in wanted)
        if res["resourceType"] == "QuestionnaireResponse":
            ok = any(code == res.get("questionnaire") for _s, code in wanted)
        if not ok:
            return False
    if "securityLabel" in prov:
        labels = {(s.get("system"), s["code"]) for s in res.get("meta", {}).get("security", [])}
        if not any((lb.get("system"), lb["code"]) in labels for lb in prov["securityLabel"]):
            return False
    if "dataPeriod" in prov:
        dp = prov["dataPeriod"]
        low = parse_range(dp["start"])[0] if "start" in dp else -(2**62)
        high = parse_range(dp["end"])[1] if "end" in dp else 2**62
        if not any(rng[0] >= low and rng[1] <= high for rng in clinical_ranges(res)):
            return False
    if "data" in prov:
        me = f"{res['resourceType']}/{res['id']}"
        if not any(d["reference"]["reference"] == me for d in prov["data"]):
            return False
    return True


def _decisions(prov: dict[str, Any], res: dict[str, Any], req: Request, now: int, inherited: str,
               explicit: bool) -> list[tuple[str, bool]] | None:
    """(effect, explicit) of the deepest matching provisions under `prov`; None if it does not match."""
    if not _matches(prov, res, req, now):
        return None
    effect = prov.get("type", inherited)
    explicit = explicit or "code" in prov or "securityLabel" in prov
    below: list[tuple[str, bool]] = []
    for child in prov.get("provision", []):
        got = _decisions(child, res, req, now, effect, explicit)
        if got is not None:
            below.extend(got)
    return below or [(effect, explicit)]


def applies(consent: dict[str, Any], patients: set[str]) -> bool:
    return (consent.get("status") == "active"
            and any(c["code"] == "patient-privacy" for c in consent["scope"]["coding"])
            and ref_id(consent.get("patient")) in patients and "provision" in consent)


def sensitive(res: dict[str, Any]) -> bool:
    return any(s.get("system") == ACT and s.get("code") in SENSITIVE for s in res.get("meta", {}).get("security", []))


def visible(res: dict[str, Any], consents: list[dict[str, Any]], req: Request) -> bool:
    pats = patients_of(res)
    if req.scope_patients is not None and not (pats & req.scope_patients):
        return False
    if req.mode != "filter" or res["resourceType"] == "AuditEvent" or pats & req.own:
        return True
    now = now_us()
    decisions: list[tuple[str, bool]] = []
    for consent in consents:
        if applies(consent, pats):
            decisions.extend(_decisions(consent["provision"], res, req, now, "none", False) or [])
    if any(e == "deny" for e, _x in decisions):
        return False
    if req.purpose not in OPT_OUT and not any(e == "permit" for e, _x in decisions):
        return False
    return not sensitive(res) or any(e == "permit" and x for e, x in decisions)
