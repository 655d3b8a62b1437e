"""Build AuditEvent resources following IHE BALP (Basic Audit Log Patterns).

One AuditEvent per interaction: type `rest`, subtype the FHIR interaction, the requesting client
(and user, if any) with its network address, this server as source and observer, and as entities
the resources touched, the patients involved, the search query (base64) and the request id.

Every request writes one, so its index rows are taken straight from the event the server just
built (`AuditIndexer`) instead of evaluating the ~22 AuditEvent SearchParameter expressions; the
rows themselves come from the same Indexer code, and tests/functional/audit/test_audit_index.py checks that both
routes agree for any record.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..fhir.dates import instant_text
from ..fhir.fhirpath import Node, child_nodes, resolves_to
from ..search.indexer import Indexer
from ..search.params import SearchParam
from ..search.values import IndexRows
from ..storage.codec import dump_json

DCM = "http://dicom.nema.org/resources/ontology/DCM"
BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_PROFILE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"

ACTIONS = {
    "create": "C", "read": "R", "vread": "R", "history-instance": "R", "update": "U", "patch": "U", "delete": "D",
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

    def named(self) -> list[str]:
        """The resources the event names as entities: those touched, else the one addressed."""
        return self.resources or ([self.target] if self.target else [])


def build_audit_event(rec: AuditRecord, server_url: str, event_id: str | None = None) -> dict[str, Any]:
    action = ACTIONS.get(rec.interaction, "E")
    subtype = rec.subtype_code or ("http://hl7.org/fhir/restful-interaction", rec.interaction, rec.interaction)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event_id or str(uuid.uuid4()),
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
    for ref in rec.named():
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


# The AuditEvent SearchParameters (type, expression) whose nodes AuditIndexer knows how to find
# in a built event. Any other set (a custom SearchParameter, a changed expression) makes it fall
# back to the generic FHIRPath route, so a registry change can never silently drop index rows.
_KNOWN_PARAMS: dict[str, tuple[str, str]] = {
    "_profile": ("uri", "Resource.meta.profile"),
    "_security": ("token", "Resource.meta.security"),
    "_source": ("uri", "Resource.meta.source"),
    "_tag": ("token", "Resource.meta.tag"),
    "action": ("token", "AuditEvent.action"),
    "address": ("string", "AuditEvent.agent.network.address"),
    "agent": ("reference", "AuditEvent.agent.who"),
    "agent-name": ("string", "AuditEvent.agent.name"),
    "agent-role": ("token", "AuditEvent.agent.role"),
    "altid": ("token", "AuditEvent.agent.altId"),
    "date": ("date", "AuditEvent.recorded"),
    "entity": ("reference", "AuditEvent.entity.what"),
    "entity-name": ("string", "AuditEvent.entity.name"),
    "entity-role": ("token", "AuditEvent.entity.role"),
    "entity-type": ("token", "AuditEvent.entity.type"),
    "outcome": ("token", "AuditEvent.outcome"),
    "patient": ("reference", "AuditEvent.agent.who.where(resolve() is Patient) | "
                             "AuditEvent.entity.what.where(resolve() is Patient)"),
    "policy": ("uri", "AuditEvent.agent.policy"),
    "site": ("token", "AuditEvent.source.site"),
    "source": ("reference", "AuditEvent.source.observer"),
    "subtype": ("token", "AuditEvent.subtype"),
    "type": ("token", "AuditEvent.type"),
}
# parameter types whose rows depend on the values alone (no compartments, no per-record parts)
_VALUE_TYPES = frozenset({"token", "uri", "string"})
_MEMO_SIZE = 4096  # distinct (parameter, values) kept; cleared when full

# elements build_audit_event never writes (meta has only `profile`; an agent has only type, who,
# requestor and network), so these parameters never have a value
_ABSENT = frozenset({"_security", "_source", "_tag", "agent-name", "agent-role", "altid", "policy"})


class AuditIndexer:
    """Index rows of an AuditEvent made by `build_audit_event`, without FHIRPath.

    The server built the event, so it knows where each parameter's values are: the nodes are read
    from the known structure (entities, whose extra entries come from other modules, through the
    same child-navigation the FHIRPath evaluator uses) and handed to `Indexer.rows_from_nodes`,
    the same row code as every other resource. About 60 us instead of 100 us per request."""

    def __init__(self, indexer: Indexer) -> None:
        self.indexer = indexer
        params = indexer.params.for_type("AuditEvent")
        self.params = [p for p in params.values() if p.extract is not None]
        self.direct = {p.code: (p.type, p.expression) for p in self.params} == _KNOWN_PARAMS
        self._memo: dict[tuple[str, bytes, tuple[str | None, ...]], tuple[tuple[str, dict[str, Any]], ...]] = {}

    def index(self, event: dict[str, Any]) -> IndexRows:
        """Rows for `event`, which must be `build_audit_event`'s output (unmodified).

        The rows of a token, uri or string parameter depend on its values alone (and the
        process's blind-index key), and those values repeat from record to record (codes, the
        client's address, entity types and roles): they are computed once per distinct value
        list and kept (~20 of a read's 22 rows; the references and the date are per record)."""
        if not self.direct:
            return self.indexer.index("AuditEvent", event)
        out = IndexRows()
        patients: list[str] = []
        for p, nodes in self._nodes(event):
            if p.type in _VALUE_TYPES and nodes:
                key = (p.code, dump_json([v for v, _t in nodes]), tuple(t for _v, t in nodes))
                rows = self._memo.get(key)
                if rows is None:
                    part = self.indexer.rows_from_nodes("AuditEvent", [(p, nodes)], [])
                    rows = tuple((tbl, row) for tbl, found in part.rows.items() for row in found)
                    if len(self._memo) >= _MEMO_SIZE:
                        self._memo.clear()
                    self._memo[key] = rows
            else:  # references (and the compartments they make) and the date: per record
                part = self.indexer.rows_from_nodes("AuditEvent", [(p, nodes)], patients)
                rows = tuple((tbl, row) for tbl, found in part.rows.items() for row in found)
            for tbl, row in rows:
                out.rows.setdefault(tbl, []).append(row)
        out.patients = patients
        return out

    def _nodes(self, event: dict[str, Any]) -> Iterator[tuple[SearchParam, list[Node]]]:
        agents: list[dict[str, Any]] = event["agent"]
        entities: list[Node] = [(e, None) for e in event["entity"]]
        whats: list[Node] | None = None
        for p in self.params:
            code = p.code
            if code in _ABSENT:
                continue
            nodes: list[Node]
            if code == "address":
                nodes = [(a["network"]["address"], None) for a in agents if "network" in a]
            elif code == "agent":
                nodes = [(a["who"], None) for a in agents]
            elif code == "patient":
                whats = whats if whats is not None else child_nodes(entities, "what")
                nodes = [(a["who"], None) for a in agents if resolves_to(a["who"], "Patient")]
                nodes += [n for n in whats if resolves_to(n[0], "Patient")]
            elif code == "entity":
                whats = whats if whats is not None else child_nodes(entities, "what")
                nodes = whats
            elif code in ("entity-name", "entity-role", "entity-type"):
                nodes = child_nodes(entities, code[7:])
            elif code == "_profile":
                nodes = [(v, None) for v in event["meta"]["profile"]]
            elif code == "date":
                nodes = [(event["recorded"], None)]
            elif code == "site":
                nodes = [(event["source"]["site"], None)]
            elif code == "source":
                nodes = [(event["source"]["observer"], None)]
            elif code == "subtype":
                nodes = [(v, None) for v in event["subtype"]]
            else:  # action, outcome, type: single top-level elements
                nodes = [(event[code], None)]
            yield p, nodes
