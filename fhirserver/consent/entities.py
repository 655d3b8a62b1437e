"""The AuditEvent entities that record why the consent stage disclosed or hid data: the
default policy (or exemption, break-the-glass, cross-border rule) applied, and the Consents that
decided."""

from __future__ import annotations

from typing import Any

POLICY_SYSTEM = "urn:fhirserver:consent-policy"


def policy_entity(purpose: str, description: str) -> dict[str, Any]:
    return {
        "what": {"identifier": {"system": POLICY_SYSTEM, "value": f"default-policy:{purpose}"}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                 "display": "System Object"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13",
                 "display": "Security Resource"},
        "description": description,
    }


def consent_entity(consent_id: str, description: str) -> dict[str, Any]:
    return {
        "what": {"reference": f"Consent/{consent_id}"},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                 "display": "System Object"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13",
                 "display": "Security Resource"},
        "description": description,
    }

