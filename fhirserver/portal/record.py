"""What the "My record" and "Who accessed my data" pages show, computed from FHIR resources the
portal read through the API: demographics, latest results, trends drawn as inline SVG (no script,
so the pages keep a CSP without `unsafe-inline`), questionnaire answers, and access rows."""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..fhir.concepts import concept_text

CHART_W, CHART_H, PAD = 320, 120, 8


def name_of(patient: dict[str, Any]) -> str:
    for n in patient.get("name", []) or []:
        if n.get("text"):
            return str(n["text"])
        parts = [*(n.get("given") or []), n.get("family") or ""]
        if any(parts):
            return " ".join(p for p in parts if p)
    return "(no name on record)"


@dataclass
class Series:
    code: str
    label: str
    unit: str
    points: list[tuple[str, float]] = field(default_factory=list)  # (date, value), oldest first

    def svg_points(self) -> str:
        """The polyline of the trend chart, scaled into the chart box."""
        values = [v for _d, v in self.points]
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        n = len(values)
        xs = [PAD + i * (CHART_W - 2 * PAD) / max(n - 1, 1) for i in range(n)]
        ys = [CHART_H - PAD - (v - low) * (CHART_H - 2 * PAD) / span for v in values]
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))

    @property
    def low(self) -> float:
        return min(v for _d, v in self.points)

    @property
    def high(self) -> float:
        return max(v for _d, v in self.points)


def _when(obs: dict[str, Any]) -> str:
    for key in ("effectiveDateTime", "issued"):
        if isinstance(obs.get(key), str):
            return str(obs[key])
    period = obs.get("effectivePeriod") or {}
    return str(period.get("start") or "")


def _numeric(obs: dict[str, Any]) -> list[tuple[str, str, float, str]]:
    """(code, label, value, unit) of the Observation and of each numeric component."""
    out = []
    for item, label_from in ((obs, obs), *((c, c) for c in obs.get("component", []) or [])):
        q = item.get("valueQuantity")
        if isinstance(q, dict) and isinstance(q.get("value"), (int, float)):
            coding: dict[str, Any] = next(iter((item.get("code") or {}).get("coding", []) or [{}]), {})
            out.append((f"{coding.get('system', '')}|{coding.get('code', '')}", concept_text(label_from.get("code")),
                        float(q["value"]), str(q.get("unit") or q.get("code") or "")))
    return out


@dataclass
class Record:
    patient: dict[str, Any]
    latest: list[dict[str, Any]]
    trends: list[Series]
    answers: list[dict[str, Any]]
    lists: dict[str, list[str]]


LISTED = {"Condition": "Problems", "AllergyIntolerance": "Allergies", "MedicationRequest": "Medications",
          "Immunization": "Immunizations"}


def build_record(resources: list[dict[str, Any]]) -> Record:
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), {})
    series: dict[str, Series] = {}
    latest: dict[str, dict[str, Any]] = {}
    lists: dict[str, list[str]] = defaultdict(list)
    answers = []
    for r in resources:
        rtype = r.get("resourceType")
        if rtype == "Observation":
            when = _when(r)
            key = concept_text(r.get("code"))
            shown = ", ".join(f"{v:g} {u}".strip() for _c, _l, v, u in _numeric(r)) or concept_text(r.get("valueCodeableConcept")) \
                or str(r.get("valueString") or "")
            if key and (key not in latest or when > latest[key]["when"]):
                latest[key] = {"name": key, "when": when[:10], "value": shown,
                               "category": concept_text(next(iter(r.get("category", []) or []), {}))}
            for code, label, value, unit in _numeric(r):
                series.setdefault(code, Series(code, label, unit)).points.append((when, value))
        elif rtype == "QuestionnaireResponse":
            items = [i for i in r.get("item", []) or [] if isinstance(i, dict)]
            answers.append({"questionnaire": str(r.get("questionnaire") or "questionnaire").rsplit("/", 1)[-1],
                            "authored": str(r.get("authored") or "")[:10], "status": r.get("status", ""),
                            "items": [(i.get("text") or i.get("linkId"), ", ".join(
                                _answer(a) for a in i.get("answer", []) or [])) for i in items]})
        elif rtype in LISTED:
            name = concept_text(r.get("code") or r.get("medicationCodeableConcept") or r.get("vaccineCode"))
            if name:
                lists[LISTED[rtype]].append(name)
    trends = []
    for s in series.values():
        s.points.sort()
        if len(s.points) >= 2:
            trends.append(s)
    return Record(patient, sorted(latest.values(), key=lambda x: x["name"]),
                  sorted(trends, key=lambda s: s.label), answers, dict(lists))


def _answer(a: dict[str, Any]) -> str:
    for key, value in a.items():
        if key.startswith("value"):
            if isinstance(value, dict):
                return concept_text(value) or str(value.get("value", value.get("display", "")))
            return str(value)
    return ""


ACTION_WORDS = {"read": "opened", "vread": "opened an earlier version", "search-type": "searched",
                "search-system": "searched", "history-instance": "looked at the history",
                "history-type": "looked at the history", "operation": "opened the record", "create": "added",
                "update": "changed", "patch": "changed", "delete": "deleted", "110122": "signed in",
                "authorize": "was allowed by you", "110123": "signed out"}
PURPOSE_WORDS = {"TREAT": "treatment", "ETREAT": "emergency treatment", "HPAYMT": "payment",
                 "HOPERAT": "running the service", "HRESCH": "research", "HMARKT": "marketing",
                 "PUBHLTH": "public health"}


def access_rows(events: list[dict[str, Any]], me: str = "") -> list[dict[str, Any]]:
    """One row per AuditEvent (already projected to the reader by the server), in plain words;
    `me` is the reader's own reference (shown as "you")."""
    rows = []
    for e in events:
        agents = e.get("agent", []) or []
        app = next((a.get("who", {}).get("display") for a in agents
                    if str(a.get("who", {}).get("reference", "")).startswith("Device/")), None)
        user = next((a.get("who", {}).get("reference") or a.get("who", {}).get("display") for a in agents
                     if a.get("requestor") and not str(a.get("who", {}).get("reference", "")).startswith("Device/")
                     and a.get("who", {}).get("display") != "unauthenticated client"), None)
        entities = e.get("entity", []) or []
        kinds: dict[str, int] = defaultdict(int)
        for x in entities:
            ref = str(x.get("what", {}).get("reference", ""))
            if ref and (x.get("role") or {}).get("code") == "4":  # a domain resource touched
                kinds[ref.split("/", 1)[0]] += 1
        note = next((x.get("description") for x in entities if "others are not shown" in str(x.get("description"))), "")
        count = re.search(r"involved (\d+)", str(note or ""))
        involved = int(count.group(1)) if count else 0
        glass = next((x for x in entities if x.get("what", {}).get("identifier", {}).get("value") == "break-the-glass"),
                     None)
        reason = next((d.get("valueString") for d in (glass or {}).get("detail", []) or []
                       if d.get("type") == "break-glass-reason"), None)
        subtype: dict[str, Any] = next(iter(e.get("subtype", []) or []), {})
        rows.append({
            "when": str(e.get("recorded", ""))[:19].replace("T", " "), "app": app or "this server",
            "user": "you" if user and user == me else user, "action": ACTION_WORDS.get(str(subtype.get("code")), str(subtype.get("display") or subtype.get("code") or "")),
            "what": ", ".join(f"{n} {t}" for t, n in sorted(kinds.items())) or "—", "note": note, "involved": involved,
            "purpose": ", ".join(PURPOSE_WORDS.get(concept_text(p), concept_text(p)) for p in e.get("purposeOfEvent", []) or []),
            "allowed": e.get("outcome") == "0", "break_glass": glass is not None, "reason": reason,
        })
    return rows


def details_of(patient: dict[str, Any]) -> dict[str, str]:
    """The editable demographic fields (first name, phone, address)."""
    name: dict[str, Any] = next(iter(patient.get("name", []) or []), {})
    address: dict[str, Any] = next(iter(patient.get("address", []) or []), {})
    phone = next((t.get("value") for t in patient.get("telecom", []) or [] if t.get("system") == "phone"), "")
    return {"given": " ".join(name.get("given", []) or []), "family": str(name.get("family") or ""),
            "phone": str(phone or ""), "line": ", ".join(address.get("line", []) or []),
            "city": str(address.get("city") or ""), "postal": str(address.get("postalCode") or "")}


def with_details(patient: dict[str, Any], form: Mapping[str, str]) -> dict[str, Any]:
    """The Patient with the form's corrections. A field left empty, or sent back as shown, leaves
    its element as it is; a correction changes only what the form shows (the first name's given
    and family names, the first phone number, the first address's line, city and postal code) and
    drops nothing else -- other names, phones, addresses and their parts stay. A name's or an
    address's `text`, when there is one, is composed again from the corrected parts."""
    body = copy.deepcopy({k: v for k, v in patient.items() if k != "meta"})
    shown = details_of(patient)
    value = {k: str(form.get(k, "")).strip()[:200] for k in shown}
    new = {k: v for k, v in value.items() if v and v != shown[k]}
    if "given" in new or "family" in new:
        names = list(body.get("name") or [{}])
        first = dict(names[0])
        if "given" in new:
            first["given"] = new["given"].split()
        if "family" in new:
            first["family"] = new["family"]
        if "text" in first:
            first["text"] = " ".join([*first.get("given", []), str(first.get("family", ""))]).strip()
        body["name"] = [first, *names[1:]]
    if "phone" in new:
        telecom = list(body.get("telecom") or [])
        at = next((i for i, t in enumerate(telecom) if isinstance(t, dict) and t.get("system") == "phone"), None)
        if at is None:
            telecom.insert(0, {"system": "phone", "value": new["phone"]})
        else:
            telecom[at] = {**telecom[at], "value": new["phone"]}
        body["telecom"] = telecom
    if {"line", "city", "postal"} & new.keys():
        addresses = list(body.get("address") or [{}])
        home = dict(addresses[0])
        if "line" in new:
            home["line"] = [new["line"]]
        if "city" in new:
            home["city"] = new["city"]
        if "postal" in new:
            home["postalCode"] = new["postal"]
        if "text" in home:
            parts = [*home.get("line", []), *(str(home[k]) for k in ("city", "postalCode") if home.get(k))]
            home["text"] = ", ".join(parts)
        body["address"] = [home, *addresses[1:]]
    return body
