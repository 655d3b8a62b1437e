"""HIPAA Safe Harbor de-identification (45 CFR 164.514(b)(2)) for exported resources.

The walk is generic over the JSON tree, driven by element names, so contained resources and
extensions (e.g. `patient-birthPlace.valueAddress`) get the same treatment as top-level elements:

- names, telecom, photos and attachments (a required one keeps only its content type), narrative,
  notes, free-text strings and the `display` of references are removed (free text may name anyone; Safe Harbor cannot vouch for it);
- addresses keep only state and country, and the first three ZIP digits (`000` for the
  three-digit zones with fewer than 20,000 people);
- every date and dateTime is reduced to its year; instants (`issued`, `meta.lastUpdated`,
  `DocumentReference.date`) are removed because FHIR does not allow a year-only instant, and a
  required one (`Provenance.recorded`) becomes the first instant of its year; a birth date more than 89 years ago
  is removed and replaced by a flag extension (Safe Harbor's "90 or older"), and a Quantity in
  years above 89 (an age) becomes ">= 90";
- resource ids, references and identifier values become keyed pseudonyms (HMAC-SHA-256), so
  references still link resources within one export but reveal nothing. The key is a data key
  of its own per export (`pseudonym:export:<job>`), so two exports cannot be linked, unless
  the client is registered with `--stable-pseudonyms`, which then shares one key per client
  (`pseudonym:client:<client>`), e.g. for longitudinal research.

Clinical content (codes, values, components, answers other than free text, categories,
statuses, gender) is kept. Every output resource carries the security labels PSEUDED and
REDACTED so a recipient knows what it got.
"""

from __future__ import annotations

import base64
import hmac
import re
from datetime import date
from hashlib import sha256
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..services import Services

PSEUDONYM_SYSTEM = "urn:fhirserver:pseudonym"
AGE_90_PLUS = "http://fhirserver.dev/StructureDefinition/deidentified-age-90-or-older"
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
LABELS = [
    {"system": OBSERVATION_VALUE, "code": "PSEUDED", "display": "pseudonymized"},
    {"system": OBSERVATION_VALUE, "code": "REDACTED", "display": "redacted"},
]
# three-digit ZIP areas with 20,000 or fewer people (2000 census; HHS guidance): reported as 000
RESTRICTED_ZIP3 = frozenset({"036", "059", "063", "102", "203", "556", "692", "790", "821", "823",
                             "830", "831", "878", "879", "884", "890", "893"})

# element names removed wherever they occur
REMOVED = frozenset({
    "name", "telecom", "photo", "note", "comment", "contact", "issued", "valueString", "valueMarkdown",
    "valueHumanName", "valueContactPoint", "valueAttachment", "valueUri", "valueUrl", "sourceAttachment",
    "presentedForm", "signature", "implicitRules", "alias",  # Location/Organization.alias: other names
})
# free-text string elements, replaced by "redacted" (some are required: PractitionerRole
# .notAvailable.description); a CodeableConcept of the same name (Goal.description) is kept
FREE_TEXT = frozenset({"description", "conclusion", "patientInstruction", "summary", "mitigation", "rationale",
                       "outcomeString"})
# required Attachments (DocumentReference.content.attachment: letters, scans) keep only their kind
ATTACHMENTS = frozenset({"attachment"})
# top-level elements of type instant (R4 schema) besides `issued`: None = removed, else kept as
# the first instant of the year (the element is required)
TYPE_REMOVED = frozenset({"Binary.data"})  # a document's bytes: free text, scans, letters
INSTANTS: dict[str, str | None] = {"DocumentReference.date": None, "Provenance.recorded": "year-start",
                                   "AuditEvent.recorded": "year-start"}
ADDRESSES = frozenset({"address", "valueAddress"})
# elements of type Identifier in the served types (R4 schema): all pseudonymized
IDENTIFIERS = frozenset({"identifier", "valueIdentifier", "accessionIdentifier", "groupIdentifier",
                         "masterIdentifier", "preAdmissionIdentifier", "requisition"})
TEXTS = frozenset({"text", "display"})  # the kept texts of concepts and codings
EMBEDDED_DATE_RE = re.compile(r"\b((?:18|19|20)\d{2})-(?:0[1-9]|1[0-2])(?:-(?:0[1-9]|[12]\d|3[01]))?"
                              r"(?:T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?(?![\d-])")
DATE_RE = re.compile(r"^(\d{4})(-\d{2}(-\d{2}(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?)?)?$")
REF_RE = re.compile(r"^(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


class Deidentifier:
    """Safe Harbor transform keyed by one pseudonym key (see the module docstring for scoping)."""

    def __init__(self, key: bytes, today: date | None = None) -> None:
        self._key = key
        self._year = (today or date.today()).year

    @classmethod
    def for_export(cls, svc: Services, job_id: str, client_id: str) -> Deidentifier:
        """The export's own key, or the client's when it is registered with stable pseudonyms."""
        from ..auth.clients import get_client

        client = get_client(svc.engine, client_id)
        stable = bool(client and client.settings.get("stable_pseudonyms"))
        scope = f"pseudonym:client:{client_id}" if stable else f"pseudonym:export:{job_id}"
        return cls(svc.keys.ensure(scope)[1])

    def pseudonym(self, value: str) -> str:
        mac = hmac.new(self._key, value.encode(), sha256).digest()
        return base64.b32encode(mac[:20]).decode().lower()

    def apply(self, resource: dict[str, Any]) -> dict[str, Any]:
        """A de-identified copy of one resource (the input is not modified)."""
        out = self._resource(resource)
        meta = {k: v for k, v in (resource.get("meta") or {}).items() if k in ("profile", "tag")}
        meta["security"] = [s for s in (resource.get("meta") or {}).get("security", [])
                            if s.get("code") not in ("PSEUDED", "REDACTED")] + [dict(x) for x in LABELS]
        out["meta"] = meta
        return _order(out, resource)

    # -- the walk ---------------------------------------------------------------------------

    def _resource(self, res: dict[str, Any], contained: bool = False) -> dict[str, Any]:
        rtype = str(res.get("resourceType", ""))
        out: dict[str, Any] = {"resourceType": rtype}
        if "id" in res:
            out["id"] = res["id"] if contained else self.pseudonym(f"{rtype}/{res['id']}")
        for key, value in res.items():
            if key in ("resourceType", "id", "meta", "text"):
                continue
            if key == "contained":
                out[key] = [self._resource(c, contained=True) for c in value if isinstance(c, dict)]
            elif f"{rtype}.{key}" in TYPE_REMOVED:
                continue
            elif f"{rtype}.{key}" in INSTANTS:
                if INSTANTS[f"{rtype}.{key}"] and isinstance(value, str) and value[:4].isdigit():
                    out[key] = f"{value[:4]}-01-01T00:00:00Z"
            elif key == "birthDate" and isinstance(value, str):
                if value[:4].isdigit() and self._year - int(value[:4]) > 89:
                    out.setdefault("extension", []).append({"url": AGE_90_PLUS, "valueBoolean": True})
                else:
                    out[key] = value[:4]
            else:
                kept = self._element(key, value)
                if kept is not None:
                    if key == "extension" and "extension" in out:
                        out[key] = out[key] + kept
                    else:
                        out[key] = kept
        return out

    def _element(self, key: str, value: object) -> Any:
        if key in REMOVED or key.startswith("_"):
            return None  # `_x` primitive extensions can carry the removed text too
        if key in FREE_TEXT and isinstance(value, str):
            return "redacted"
        if isinstance(value, list):
            items = [self._element(key, v) for v in value]
            items = [v for v in items if v is not None]
            return items or None
        if key in ATTACHMENTS and isinstance(value, dict):
            kept = {k: value[k] for k in ("contentType", "language") if isinstance(value.get(k), str)}
            return kept or {"contentType": "application/octet-stream"}
        if key in ADDRESSES and isinstance(value, dict):
            return self._address(value)
        if key in IDENTIFIERS and isinstance(value, dict):
            return self._identifier(value)
        if isinstance(value, dict):
            if "resourceType" in value:
                return self._resource(value)
            return self._complex(value)
        if isinstance(value, str):
            return _scrub_dates(value) if key in TEXTS else _year_only(value)
        return value

    def _complex(self, node: dict[str, Any]) -> dict[str, Any] | None:
        is_reference = "reference" in node or ("display" in node and not ("code" in node or "system" in node))
        out: dict[str, Any] = {}
        for key, value in node.items():
            if is_reference and key == "display":
                continue
            if key == "reference" and isinstance(value, str):
                out[key] = self._reference(value)
                continue
            kept = self._element(key, value)
            if kept is not None:
                out[key] = kept
        if _is_age_over_89(out):
            out["value"], out["comparator"] = 90, ">="  # Safe Harbor: "90 or older", never the age
        if "url" in node and "extension" not in out and not any(k.startswith("value") for k in out):
            return None  # an extension whose value was removed is no longer valid FHIR
        if is_reference and set(out) <= {"type"}:
            # a reference by display only ("Dr. Smith"): kept as a redacted one, since the element
            # may be required (Encounter.location.location) and the reader learns it existed
            return {**out, "display": "redacted"}
        return out or None

    def _reference(self, ref: str) -> str:
        if ref.startswith("#"):
            return ref
        match = REF_RE.match(ref)
        if match:
            return f"{match.group(1)}/{self.pseudonym(f'{match.group(1)}/{match.group(2)}')}"
        return f"urn:uuid:{_uuid(self.pseudonym(ref))}"

    def _address(self, addr: dict[str, Any]) -> dict[str, Any] | None:
        out: dict[str, Any] = {k: addr[k] for k in ("use", "type", "state", "country") if k in addr}
        digits = "".join(c for c in str(addr.get("postalCode", "")) if c.isdigit())
        if len(digits) >= 3 and (str(addr.get("country", "US")).upper() in ("US", "USA", "UNITED STATES")):
            zip3 = digits[:3]
            out["postalCode"] = "000" if zip3 in RESTRICTED_ZIP3 else zip3
        return out or None

    def _identifier(self, ident: dict[str, Any]) -> dict[str, Any] | None:
        if "value" not in ident:
            return None
        out: dict[str, Any] = {k: v for k, v in ident.items() if k in ("use", "type")}
        out["system"] = PSEUDONYM_SYSTEM
        out["value"] = self.pseudonym(f"{ident.get('system', '')}|{ident['value']}")
        if "type" in out:
            out["type"] = {k: v for k, v in out["type"].items() if k == "coding"} or None
            if out["type"] is None:
                del out["type"]
        return out


YEARS = frozenset({"a", "yr", "yrs", "year", "years", "y"})


def _is_age_over_89(quantity: dict[str, Any]) -> bool:
    """A Quantity in years above 89 (an age, for any clinical purpose we serve)."""
    unit = str(quantity.get("code") or quantity.get("unit") or "").strip().lower()
    value = quantity.get("value")
    return unit in YEARS and isinstance(value, (int, float)) and value > 89


def _scrub_dates(text: str) -> str:
    """Dates written inside a concept's text ("ROS 5 days - 2013-04-10") reduced to their year."""
    return EMBEDDED_DATE_RE.sub(lambda m: m.group(1), text)


def _year_only(value: str) -> str:
    """A date or dateTime reduced to its year; any other string unchanged."""
    match = DATE_RE.match(value)
    return match.group(1) if match and match.group(2) else value


def _uuid(hex32: str) -> str:
    digest = sha256(hex32.encode()).hexdigest()[:32]
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def _order(out: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """Keep the input's element order (resourceType, id, meta first) for readable output."""
    first = [k for k in ("resourceType", "id", "meta") if k in out]
    rest = [k for k in like if k in out and k not in first] + [k for k in out if k not in like and k not in first]
    return {k: out[k] for k in first + rest}
