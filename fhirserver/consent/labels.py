"""Sensitive-data labelling on write (issue 6, rule 4; issue 14 for every record type).

A resource with a coding in a configured sensitive list -- in the elements that
`profiles/consent-elements.json` names for its type (an Observation's code, a Condition's code, a
MedicationRequest's medication, ...) -- or a QuestionnaireResponse of a configured questionnaire,
gets the category's `meta.security` label (v3-ActCode: HIV, PSY, SUD, SEX, STD, ...) plus the
confidentiality label R (v3-Confidentiality). A list entry is a code, or a `prefix` of codes in a
hierarchical system (ICD-10-CM `F10` covers F10.10, F10.20, ...). Labels the sender set are kept;
labels are only ever added (raised), never removed or lowered. The lists are data:
`profiles/sensitive-codes.json` and any `profiles/sensitive-codes-*.json` name each category's
ValueSet (`profiles/ValueSet-sensitivity-*.json`, or one an installed IG package brings, such as
a VSAC expansion) and may list codes inline. A category whose value set this server cannot decide
membership of stops the server at start: unlabelled sensitive data would be shown to everyone.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SettingsError
from ..fhir.bindings import Terminology
from .elements import ConsentElements

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
# v3-Confidentiality, lowest to highest: a label is never replaced by a lower one
CONFIDENTIALITY_ORDER = ["U", "L", "M", "N", "R", "V"]


@dataclass
class SensitiveCodes:
    label_system: str = ACT_CODE
    confidentiality: tuple[str, str] = (CONFIDENTIALITY, "R")
    by_code: dict[tuple[str, str], str] = field(default_factory=dict)  # (system, code) -> label
    by_prefix: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # system -> [(prefix, label)]
    by_questionnaire: dict[str, str] = field(default_factory=dict)  # canonical URL -> label
    value_sets: list[tuple[str, str]] = field(default_factory=list)  # (ValueSet canonical, label)
    labels: dict[str, str] = field(default_factory=dict)  # label code -> display

    @property
    def label_pairs(self) -> list[tuple[str, str]]:
        """The sensitivity labels: data carrying one is denied unless a consent permits it."""
        return [(self.label_system, code) for code in sorted(self.labels)]


def load_sensitive_codes(profiles_dir: Path) -> SensitiveCodes:
    out = SensitiveCodes()
    files = sorted(profiles_dir.glob("sensitive-codes*.json"))
    for path in files:
        data = json.loads(path.read_text())
        out.label_system = data.get("labelSystem", out.label_system)
        conf = data.get("confidentiality")
        if conf:
            out.confidentiality = (conf["system"], conf["code"])
        for cat in data.get("categories", []):
            label = cat["label"]
            out.labels[label] = cat.get("display", label)
            for coding in cat.get("codes", []):
                if "prefix" in coding:
                    out.by_prefix.setdefault(coding["system"], []).append((coding["prefix"], label))
                else:
                    out.by_code[(coding["system"], coding["code"])] = label
            for url in cat.get("questionnaires", []):
                out.by_questionnaire[url.split("|")[0]] = label
            sets = cat.get("valueSet", [])
            for url in [sets] if isinstance(sets, str) else sets:
                out.value_sets.append((url, label))
    return out


class Labeller:
    def __init__(self, codes: SensitiveCodes, elements: ConsentElements, terms: Terminology | None = None) -> None:
        self.codes = codes
        self.elements = elements
        self.terms = terms or Terminology(())
        for url, label in codes.value_sets:
            if not self.terms.decidable(url):
                raise SettingsError(f"sensitive-codes: the value set {url} of label {label} is not available here or "
                                    "its membership cannot be decided (install the IG package that defines it, with "
                                    "its code systems, or list the codes)")

    def label_of(self, system: str, code: str) -> str | None:
        label = self.codes.by_code.get((system, code))
        if label is None:
            label = next((lb for prefix, lb in self.codes.by_prefix.get(system, ()) if code.startswith(prefix)), None)
        if label is None:
            label = next((lb for url, lb in self.codes.value_sets if self.terms.member(url, system, code)), None)
        return label

    def labels_for(self, rtype: str, body: dict[str, Any]) -> list[str]:
        found: list[str] = []
        for concept in self.elements.concepts(rtype, body):
            for coding in concept.get("coding") or []:
                if isinstance(coding, dict):
                    label = self.label_of(str(coding.get("system")), str(coding.get("code")))
                    if label and label not in found:
                        found.append(label)
        canonical_element = self.elements.of(rtype).labelled_canonical
        q = body.get(canonical_element) if canonical_element else None
        if isinstance(q, str):
            label = self.codes.by_questionnaire.get(q.split("|")[0])
            if label and label not in found:
                found.append(label)
        return found

    def label(self, rtype: str, body: dict[str, Any]) -> dict[str, Any]:
        """The body with sensitivity labels added (a copy when something was added)."""
        found = self.labels_for(rtype, body)
        if not found:
            return body
        body = dict(body)
        meta = copy.deepcopy(body.get("meta") or {})
        security: list[dict[str, Any]] = meta.get("security") or []
        have = {(s.get("system"), s.get("code")) for s in security if isinstance(s, dict)}
        for label in found:
            if (self.codes.label_system, label) not in have:
                security.append({"system": self.codes.label_system, "code": label,
                                 "display": self.codes.labels.get(label, label)})
        conf_system, conf_code = self.codes.confidentiality
        levels = [s.get("code") for s in security if isinstance(s, dict) and s.get("system") == conf_system]
        wanted = CONFIDENTIALITY_ORDER.index(conf_code) if conf_code in CONFIDENTIALITY_ORDER else 0
        highest = max((CONFIDENTIALITY_ORDER.index(c) for c in levels if c in CONFIDENTIALITY_ORDER), default=-1)
        if highest < wanted:
            # raise the confidentiality level (one code of v3-Confidentiality per resource);
            # a higher level set by the sender (V) is kept as it is
            security = [s for s in security if not (isinstance(s, dict) and s.get("system") == conf_system)]
            security.append({"system": conf_system, "code": conf_code, "display": "restricted"})
        meta["security"] = security
        body["meta"] = meta
        return body
