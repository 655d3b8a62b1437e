"""Demo data for `fhirserver serve --demo`: a few patients with observations, questionnaire
responses and consents, plus a registered backend client whose private key is generated on first
start (never shipped in the repository)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .audit.events import AuditRecord
from .auth.assertion import generate_key, public_jwks, save_private_key
from .auth.clients import get_client, register_backend_client
from .clock import now_us
from .db.engine import read_connection
from .services import Services

DEMO_CLIENT_ID = "demo-backend"
LOINC = "http://loinc.org"
VITALS = [("8867-4", "Heart rate", "/min", 55, 100), ("8310-5", "Body temperature", "Cel", 36.1, 37.9),
          ("9279-1", "Respiratory rate", "/min", 12, 20), ("29463-7", "Body weight", "kg", 50, 110)]


def _patient(pid: str, given: str, family: str, birth: str, gender: str, mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient", "id": pid, "active": True,
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": mrn}],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": f"+1-555-01{random.randint(10, 99)}", "use": "home"}],
        "gender": gender, "birthDate": birth,
        "address": [{"line": [f"{random.randint(1, 999)} Demo Street"], "city": "Springfield",
                     "state": "IL", "postalCode": "62701", "country": "US"}],
    }


def _vital(pid: str, code: str, display: str, unit: str, low: float, high: float, day: int) -> dict[str, Any]:
    value = round(random.uniform(low, high), 1)
    return {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": f"2024-{(day % 12) + 1:02d}-{(day % 27) + 1:02d}T09:30:00Z",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def _consent(pid: str, purpose: str | None, provision_type: str) -> dict[str, Any]:
    provision: dict[str, Any] = {"type": provision_type, "period": {"start": "2024-01-15"}}
    if purpose:
        provision["purpose"] = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}]
    return {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2024-01-15",
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision,
    }


def _hiv_result(pid: str) -> dict[str, Any]:
    """A sensitive result: labelled HIV + R on write, hidden from everyone (TREAT included) unless
    a consent explicitly permits it; the patient, break-the-glass and exempt clients see it."""
    return {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory", "display": "Laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": "7918-6", "display": "HIV 1+2 Ab [Presence] in Serum"}]},
        "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2024-05-05T08:00:00Z",
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "260385009",
                                             "display": "Negative"}]},
    }


def _questionnaire_response(pid: str) -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse", "status": "completed",
        "questionnaire": "http://example.org/Questionnaire/phq-2",
        "subject": {"reference": f"Patient/{pid}"}, "authored": "2024-03-01T10:00:00Z",
        "item": [{"linkId": "1", "text": "Little interest or pleasure in doing things",
                  "answer": [{"valueInteger": random.randint(0, 3)}]},
                 {"linkId": "2", "text": "Feeling down, depressed, or hopeless",
                  "answer": [{"valueInteger": random.randint(0, 3)}]}],
    }


def demo_resources() -> list[dict[str, Any]]:
    random.seed(7)
    # consents (docs/consent.md): alice opts out of marketing and has a sensitive HIV result (in
    # place of her questionnaire); bob opts in to research; chloe is a minor whose guardian (demo
    # user guardian-chen) refused research; dev opted out of everything except treatment, and out
    # of treatment by the demo ED's organization (which sees him only when it breaks the glass)
    people = [("demo-alice", "Alice", "Anders", "1980-04-12", "female", "MRN-1001", "HMARKT", "deny"),
              ("demo-bob", "Bob", "Baker", "1975-09-30", "male", "MRN-1002", "HRESCH", "permit"),
              ("demo-chloe", "Chloe", "Chen", "2015-06-02", "female", "MRN-1003", "HRESCH", "deny"),
              ("demo-dev", "Dev", "Diaz", "1990-01-20", "other", "MRN-1004", None, "deny")]
    out: list[dict[str, Any]] = []
    for pid, given, family, birth, gender, mrn, purpose, ptype in people:
        out.append(_patient(pid, given, family, birth, gender, mrn))
        for day in range(5):
            for vital in VITALS:
                out.append(_vital(pid, *vital, day=day * 31 + len(pid)))
        out.append(_hiv_result(pid) if pid == "demo-alice" else _questionnaire_response(pid))
        consent = _consent(pid, purpose, ptype)
        if pid == "demo-dev":
            # deny everything; except treatment; except treatment by the demo ED's organization
            consent["provision"]["provision"] = [{
                "type": "permit",
                "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
                "provision": [{"type": "deny", "actor": [{
                    "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                         "code": "IRCP"}]},
                    "reference": {"reference": "Organization/demo-ed"}}]}]}]
        out.append(consent)
    return out


def load_demo(svc: Services) -> int:
    """Load the demo resources once (idempotent: skipped when demo patients exist)."""
    from sqlalchemy import select

    from .db.schema import resource

    with read_connection(svc.engine) as conn:
        if conn.execute(select(resource.c.pk).where(resource.c.type == "Patient", resource.c.id == "demo-alice")).first():
            return 0
    count = 0
    touched: list[str] = []
    for res in demo_resources():
        svc.validator.validate(res, res["resourceType"])
        prepared = svc.repo.prepare(res["resourceType"], res, res.get("id"))
        with svc.engine.begin() as conn:
            stored = svc.repo.create(conn, prepared)
        touched.append(f"{stored.type}/{stored.id}")
        count += 1
    rec = AuditRecord(interaction="create", request_id="demo-load", network_address="localhost",
                      recorded_us=now_us(), status=201, outcome_desc=f"demo data loaded: {count} resources")
    rec.subtype_code = ("http://hl7.org/fhir/restful-interaction", "create", "demo data import")
    rec.patients = sorted({r.split("/")[1] for r in touched if r.startswith("Patient/")})
    with svc.engine.begin() as conn:
        svc.audit.append(conn, rec)
    return count


def ensure_demo_client(svc: Services) -> Path:
    """Register the demo backend client; its private key is written to the data dir (0600)."""
    key_path = svc.settings.data_dir / "demo-client-key.json"
    if get_client(svc.engine, DEMO_CLIENT_ID) is None or not key_path.exists():
        key = generate_key("ES384")
        save_private_key(key, key_path)
        from sqlalchemy import delete

        from .auth.clients import set_disabled
        from .db.schema import client

        if get_client(svc.engine, DEMO_CLIENT_ID) is not None:
            with svc.engine.begin() as conn:
                conn.execute(delete(client).where(client.c.client_id == DEMO_CLIENT_ID))
        register_backend_client(svc.engine, "Demo backend service", "system/*.cruds system/*.read system/*.write",
                                jwks=public_jwks(key), organization="Organization/demo-hospital",
                                client_id=DEMO_CLIENT_ID)
        set_disabled(svc.engine, DEMO_CLIENT_ID, False)
    ensure_demo_consent_clients(svc, key_path)
    return key_path


# client_id, name, settings, organization (same key as the demo backend client)
DEMO_CONSENT_CLIENTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("demo-research", "Demo research client (purpose HRESCH)", {"purposes": ["HRESCH"]}, "Organization/demo-hospital"),
    ("demo-break-glass", "Demo emergency department of another hospital (break-the-glass)",
     {"purposes": ["TREAT"], "break_glass": True}, "Organization/demo-ed"),
    ("demo-consent-office", "Demo consent back office (consent-exempt)", {"consent_exempt": True},
     "Organization/demo-hospital"),
    ("demo-auditor", "Demo privacy office (auditor: reads AuditEvents, query values included)",
     {"auditor": True, "audit_query_values": True, "purposes": ["HOPERAT"]}, "Organization/demo-hospital"),
]


def ensure_demo_consent_clients(svc: Services, key_path: Path) -> None:
    """Clients showing purpose of use, break-the-glass and exemption (docs/consent.md)."""
    from .auth.assertion import load_private_key

    jwks = public_jwks(load_private_key(key_path))
    for client_id, name, settings, organization in DEMO_CONSENT_CLIENTS:
        existing = get_client(svc.engine, client_id)
        if existing is not None and existing.jwks == jwks:
            continue
        if existing is not None:
            from sqlalchemy import delete

            from .db.schema import client

            with svc.engine.begin() as conn:
                conn.execute(delete(client).where(client.c.client_id == client_id))
        scopes = "system/AuditEvent.rs" if settings.get("auditor") else "system/*.rs"
        register_backend_client(svc.engine, name, scopes, jwks=jwks, organization=organization,
                                client_id=client_id, settings=settings)
