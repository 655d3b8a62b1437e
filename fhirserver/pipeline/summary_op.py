"""Patient/[id]/$summary: an International Patient Summary-shaped document Bundle (issue 16).

A `Composition` (LOINC 60591-5, Patient summary Document) with the IPS sections this server has
types for -- problems, allergies, medications, immunizations, results, vital signs -- each with a
generated narrative, its entries, or an `emptyReason`; then the Patient and every resource the
sections reference. Built from the same visible rows as `$everything` (the caller's scopes and the
patient's consents apply), the newest `PER_SECTION` of each; audited like a search.
"""

from __future__ import annotations

import html
import uuid
from typing import Any

from sqlalchemy import Connection

from ..clock import now_us
from ..fhir.concepts import concept_text
from ..fhir.dates import instant_text
from ..storage.codec import dump_json, parse_json
from ..storage.repository import Stored
from .context import RequestContext, Result
from .handler import Handler
from .render import output_body

LOINC = "http://loinc.org"
PER_SECTION = 50
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
# (title, LOINC section code, resource types, Observation category or None, required by IPS)
SECTIONS = [
    ("Problems", "11450-4", ("Condition",), None, True),
    ("Allergies and intolerances", "48765-2", ("AllergyIntolerance",), None, True),
    ("Medications", "10160-0", ("MedicationRequest", "MedicationStatement"), None, True),
    ("Immunizations", "11369-6", ("Immunization",), None, False),
    ("Results", "30954-2", ("Observation",), "laboratory", False),
    ("Vital signs", "8716-3", ("Observation",), "vital-signs", False),
]


def describe(res: dict[str, Any]) -> str:
    """One line of a section's narrative."""
    what = concept_text(res.get("code") or res.get("medicationCodeableConcept") or res.get("vaccineCode")) or res["resourceType"]
    q = res.get("valueQuantity")
    value = f": {q.get('value')} {q.get('unit', '')}".rstrip() if isinstance(q, dict) else ""
    when = str(res.get("effectiveDateTime") or res.get("onsetDateTime") or res.get("occurrenceDateTime")
               or res.get("authoredOn") or res.get("recordedDate") or "")[:10]
    return f"{what}{value}" + (f" ({when})" if when else "")


class Summary(Handler):
    reads_only = True

    def execute(self, ctx: RequestContext, conn: Connection) -> Result:
        s = ctx.services
        pid = ctx.interaction.id or ""
        patient = ctx.gate.patient(conn, pid)
        base = s.settings.fhir_base
        sections, included, disclosed = [], {}, [patient]
        for title, code, types, category, required in SECTIONS:
            rows = self._section(ctx, conn, pid, types, category)
            disclosed += [st for st, _body in rows]
            found = [body for _st, body in rows]
            section: dict[str, Any] = {"title": title, "code": {"coding": [{"system": LOINC, "code": code}]}}
            if found:
                items = "".join(f"<li>{html.escape(describe(r))}</li>" for r in found)
                section["text"] = {"status": "generated",
                                   "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><ul>{items}</ul></div>'}
                section["entry"] = [{"reference": f"{r['resourceType']}/{r['id']}"} for r in found]
                included.update({f"{r['resourceType']}/{r['id']}": r for r in found})
            elif required:
                section["text"] = {"status": "generated",
                                   "div": '<div xmlns="http://www.w3.org/1999/xhtml">No information available.</div>'}
                section["emptyReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
                                                      "code": "unavailable"}]}
            else:
                continue
            sections.append(section)
        now = instant_text(now_us())
        composition = {
            "resourceType": "Composition", "id": str(uuid.uuid4()), "status": "final",
            "type": {"coding": [{"system": LOINC, "code": "60591-5", "display": "Patient summary Document"}]},
            "subject": {"reference": f"Patient/{pid}"}, "date": now, "author": [{"display": "fhirserver"}],
            "title": "Patient Summary", "confidentiality": "N", "section": sections,
        }
        patient_body = parse_json(output_body(ctx, patient))
        entries = [{"fullUrl": f"urn:uuid:{composition['id']}", "resource": composition},
                   {"fullUrl": f"{base}/Patient/{pid}", "resource": patient_body},
                   *({"fullUrl": f"{base}/{ref}", "resource": body} for ref, body in included.items())]
        # a resource in two sections is one disclosure
        ctx.capture.disclosed(list({(st.type, st.id): st for st in disclosed}.values()), patients=[pid])
        bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "document",
                  "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
                  "timestamp": now, "entry": entries}
        return Result(200, dump_json(bundle))

    def _section(self, ctx: RequestContext, conn: Connection, pid: str, types: tuple[str, ...],
                 category: str | None) -> list[tuple[Stored, dict[str, Any]]]:
        out: list[tuple[Stored, dict[str, Any]]] = []
        for rtype in types:
            if rtype not in ctx.services.types.names():
                continue  # no scope for a type: the gate finds nothing, the section stays empty
            rows = ctx.gate.newest(conn, pid, rtype, (CATEGORY, category) if category is not None else None,
                                   PER_SECTION)
            out += [(st, parse_json(output_body(ctx, st))) for st in rows]
        return out
