"""Sharing choices as Consent resources (docs/portal.md).

One Consent per choice -- per purpose ("may researchers use my data?") and per sensitive category
("may the clinicians treating me see my HIV information?") -- each tagged
`urn:fhirserver:portal|<choice>` so the portal finds it again. One Consent per choice, rather than
one with many provisions, because each choice then has its own history, its own period, and is
withdrawn by one write (status `inactive`) that takes effect on the very next request of every
client (the consent engine replaces a Consent's rules in the transaction that writes it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..clock import now_us
from ..fhir.dates import instant_text

TAG_SYSTEM = "urn:fhirserver:portal"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}
CATEGORY = [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}]


@dataclass
class Choice:
    key: str  # purpose-HRESCH, label-HIV
    title: str
    who: str  # how the effect sentence names the recipients
    default_allowed: bool
    purpose: str
    label: tuple[str, str] | None = None  # (system, code) of a sensitivity category
    allowed: bool = False
    until: str = ""
    consent_id: str | None = None

    def effect(self, allowed: bool, until: str = "", _: Callable[..., str] | None = None) -> str:
        """The change in words ("Researchers ... will receive your data until 2030-01-01.");
        `_` translates (the portal's gettext), English without it."""
        tr = _ or (lambda text, **kw: text % kw if kw else text)
        who, what = tr(self.who), tr("this information" if self.label else "your data")
        if not allowed:
            return str(tr("%(who)s will no longer receive %(what)s.", who=who, what=what))
        if until:
            return str(tr("%(who)s will receive %(what)s until %(date)s.", who=who, what=what, date=until))
        return str(tr("%(who)s will receive %(what)s.", who=who, what=what))


PURPOSES = [
    ("TREAT", "Treatment", "Doctors and nurses treating you"),
    ("HPAYMT", "Payment", "Billing and your insurer"),
    ("HOPERAT", "Running the service", "Staff checking quality and safety"),
    ("HRESCH", "Research", "Researchers (only de-identified data)"),
    ("HMARKT", "Marketing", "Marketing"),
    ("PUBHLTH", "Public health", "Public health authorities"),
]


def choices(opt_out: frozenset[str], categories: list[tuple[str, str, str]]) -> list[Choice]:
    """Every choice with the server's default; `categories`: (system, label code, display)."""
    out = [Choice(f"purpose-{code}", title, who, code in opt_out, code) for code, title, who in PURPOSES]
    for system, code, display in categories:
        title = " ".join(display.replace(" information sensitivity", "").replace("disorder", "").split())
        title = title[:1].upper() + title[1:]
        out.append(Choice(f"label-{code}", f"{title} information", "Doctors and nurses treating you", False,
                          "TREAT", (system, code)))
    return out


def apply_current(all_choices: list[Choice], consents: list[dict[str, Any]]) -> list[Choice]:
    """The state each choice is in: the newest active portal Consent for it, else the default."""
    by_key = {c.key: c for c in all_choices}
    for c in all_choices:
        c.allowed = c.default_allowed
    for consent in sorted(consents, key=lambda x: str(x.get("meta", {}).get("lastUpdated", ""))):
        key = next((t.get("code") for t in consent.get("meta", {}).get("tag", []) or []
                    if t.get("system") == TAG_SYSTEM), None)
        choice = by_key.get(str(key))
        if choice is None or consent.get("status") != "active":
            continue
        provision = consent.get("provision") or {}
        choice.allowed = provision.get("type") == "permit"
        choice.until = str((provision.get("period") or {}).get("end") or "")[:10]
        choice.consent_id = consent.get("id")
    return all_choices


def consent_body(choice: Choice, patient: str, allowed: bool, until: str = "") -> dict[str, Any]:
    provision: dict[str, Any] = {"type": "permit" if allowed else "deny",
                                 "period": {"start": instant_text(now_us())[:10]},
                                 "purpose": [{"system": ACT_REASON, "code": choice.purpose}]}
    if allowed and until:
        provision["period"]["end"] = until
    if choice.label:
        provision["securityLabel"] = [{"system": choice.label[0], "code": choice.label[1]}]
    body: dict[str, Any] = {
        "resourceType": "Consent", "status": "active", "scope": SCOPE, "category": CATEGORY,
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": choice.key}]},
        "patient": {"reference": f"Patient/{patient}"}, "dateTime": instant_text(now_us()),
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                   "code": "OPTIN" if allowed else "OPTOUT"}]},
        "provision": provision,
    }
    if choice.consent_id:
        body["id"] = choice.consent_id
    return body


def org_block_body(patient: str, org_ref: str) -> dict[str, Any]:
    """"Do not share with Organization X": a deny for every request of that organization's clients."""
    return {
        "resourceType": "Consent", "status": "active", "scope": SCOPE, "category": CATEGORY,
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": f"org-{org_ref.split('/', 1)[1]}"}]},
        "patient": {"reference": f"Patient/{patient}"}, "dateTime": instant_text(now_us()),
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"type": "deny", "period": {"start": instant_text(now_us())[:10]}, "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                 "code": "IRCP", "display": "information recipient"}]},
            "reference": {"reference": org_ref}}]},
    }


def blocked(consents: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The organizations the patient blocked (active portal Consents tagged org-<id>)."""
    out = []
    for c in consents:
        tag = next((t.get("code") for t in c.get("meta", {}).get("tag", []) or [] if t.get("system") == TAG_SYSTEM), "")
        if c.get("status") == "active" and str(tag).startswith("org-"):
            out.append({"key": str(tag), "org": f"Organization/{str(tag)[4:]}", "consent": str(c.get("id"))})
    return out
