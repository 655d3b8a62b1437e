"""Build AuditEvent resources following IHE BALP (Basic Audit Log Patterns).

One AuditEvent per interaction: type `rest`, subtype the FHIR interaction, the requesting client
(and user, if any) with its network address, this server as source and observer, and as entities
the resources touched, the patients involved, the search query (base64) and the request id.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..search.dates import instant_text

DCM = "http://dicom.nema.org/resources/ontology/DCM"
BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_PROFILE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"

ACTIONS = {
    "create": "C", "read": "R", "vread": "R", "history-instance": "R", "update": "U", "delete": "D",
    "search-type": "E", "history-type": "E", "history-system": "E", "search-system": "E",
    "capabilities": "E", "operation": "E", "unknown": "E", "login": "E",
}
PROFILES = {
    "C": "IHE.BasicAudit.Create", "R": "IHE.BasicAudit.Read", "U": "IHE.BasicAudit.Update",
    "D": "IHE.BasicAudit.Delete", "E": "IHE.BasicAudit.Query",
}


def outcome_code(status: int) -> str:
    if status < 400:
        return "0"
    if status < 500:
        return "4"
    return "8"


@dataclass
class AuditRecord:
    """What the pipeline knows about one interaction, filled in as it progresses."""

    interaction: str
    request_id: str
    network_address: str
    recorded_us: int
    status: int = 200
    outcome_desc: str = ""
    client_id: str | None = None
    client_name: str | None = None
    user: str | None = None  # fhirUser reference of a signed-in user
    resources: list[str] = field(default_factory=list)  # Type/id/_history/v touched
    target: str | None = None  # Type/id the request addressed (named even when it failed)
    patients: list[str] = field(default_factory=list)  # patient ids involved
    query: str | None = None
    resource_type: str | None = None
    purpose: list[str] = field(default_factory=list)
    type_code: tuple[str, str, str] = ("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest",
                                       "Restful Operation")
    subtype_code: tuple[str, str, str] | None = None
    extra_entities: list[dict[str, Any]] = field(default_factory=list)


def build_audit_event(rec: AuditRecord, server_url: str) -> dict[str, Any]:
    action = ACTIONS.get(rec.interaction, "E")
    subtype = rec.subtype_code or ("http://hl7.org/fhir/restful-interaction", rec.interaction, rec.interaction)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [BALP_PROFILE + PROFILES[action]]},
        "type": {"system": rec.type_code[0], "code": rec.type_code[1], "display": rec.type_code[2]},
        "subtype": [{"system": subtype[0], "code": subtype[1], "display": subtype[2]}],
        "action": action,
        "recorded": instant_text(rec.recorded_us),
        "outcome": outcome_code(rec.status),
    }
    if rec.outcome_desc:
        event["outcomeDesc"] = rec.outcome_desc[:1000]
    if rec.purpose:
        event["purposeOfEvent"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]}
            for p in rec.purpose
        ]
    client_agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "requestor": True,
        "network": {"address": rec.network_address or "unknown", "type": "2"},
    }
    if rec.client_id:
        client_agent["who"] = {"reference": f"Device/{rec.client_id}", "display": rec.client_name or rec.client_id}
    else:
        client_agent["who"] = {"display": "unauthenticated client"}
    agents = [client_agent]
    if rec.user:
        agents.append({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass", "code": "PROV"
                                 if rec.user.startswith("Practitioner/") else "PAT", "display": "user"}]},
            "who": {"reference": rec.user},
            "requestor": True,
        })
    agents.append({
        "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
        "who": {"display": "fhirserver"},
        "requestor": False,
        "network": {"address": server_url, "type": "5"},
    })
    event["agent"] = agents
    event["source"] = {
        "site": server_url,
        "observer": {"display": "fhirserver"},
        "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                  "display": "Application Server"}],
    }
    entities: list[dict[str, Any]] = []
    for ref in rec.resources or ([rec.target] if rec.target else []):
        entities.append({
            "what": {"reference": ref},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
        })
    for pid in rec.patients:
        entities.append({
            "what": {"reference": f"Patient/{pid}"},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        })
    if rec.query is not None:
        entities.append({
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
            "query": base64.b64encode(rec.query.encode()).decode(),
        })
    entities.extend(rec.extra_entities)
    entities.append({
        "what": {"identifier": {"value": rec.request_id}},
        "type": {"system": BALP_ENTITY, "code": "XrequestId", "display": "X-Request-Id"},
    })
    event["entity"] = entities
    return event
