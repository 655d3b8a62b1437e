"""The CapabilityStatement, generated from the same registries the router and pipeline use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import __version__
from ..fhir.registry import TypeRegistry
from ..search.params import ParamRegistry


def smart_oauth_extension(root: str) -> dict[str, Any]:
    return {
        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
        "extension": [
            {"url": "token", "valueUri": f"{root}/auth/token"},
            {"url": "authorize", "valueUri": f"{root}/auth/authorize"},
            {"url": "register", "valueUri": f"{root}/auth/register"},
            {"url": "introspect", "valueUri": f"{root}/auth/introspect"},
            {"url": "revoke", "valueUri": f"{root}/auth/revoke"},
            {"url": "manage", "valueUri": f"{root}/api/openapi.json"},
        ],
    }


BACKPORT_SUBSCRIPTION = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"
TOPIC_EXTENSION = ("http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                   "capabilitystatement-subscriptiontopic-canonical")


def capability_statement(types: TypeRegistry, params: ParamRegistry, base_url: str, root: str,
                         software_date: str, profiles: Mapping[str, Sequence[str]] | None = None,
                         jurisdiction: str = "", topics: Sequence[str] = ()) -> dict[str, Any]:
    """`profiles`: shipped profile URLs by type (Validator.profiles.urls_by_type()); `jurisdiction`:
    the deployment's, when the cross-border rule is on; `topics`: the SubscriptionTopic canonicals
    served (advertised on Subscription, as the R4 Subscriptions Backport IG asks)."""
    supported = profiles or {}
    resources = []
    for t in types:
        entry: dict[str, Any] = {
            "type": t.name,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{t.name}",
            "interaction": [{"code": i} for i in sorted(t.interactions)],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": t.supports("update"),
            "conditionalCreate": t.conditional_create,
            "conditionalRead": "not-supported",
            "conditionalUpdate": t.conditional_update,
            "conditionalDelete": "single" if t.conditional_update else "not-supported",
            "searchParam": [
                {"name": p.code, "definition": p.url, "type": p.type,
                 **({"documentation": p.documentation} if p.documentation else {})}
                for p in sorted(params.for_type(t.name).values(), key=lambda p: p.code)
            ] + [
                {"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"},
                {"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
                 "type": "date"},
            ],
        }
        includes = [f"{t.name}:{p.code}" for p in sorted(params.for_type(t.name).values(), key=lambda p: p.code)
                    if p.type == "reference"]
        if includes:
            entry["searchInclude"] = includes
        rev = [f"{s.name}:{p.code}" for s in types for p in sorted(params.for_type(s.name).values(), key=lambda p: p.code)
               if p.type == "reference" and (not p.targets or t.name in p.targets)]
        if rev:
            entry["searchRevInclude"] = rev
        if supported.get(t.name):
            entry["supportedProfile"] = list(supported[t.name])
        if t.operations:
            entry["operation"] = [operation_entry(name, url) for name, _level, url in t.operations]
        if t.name == "Subscription" and topics:
            entry["supportedProfile"] = [*entry.get("supportedProfile", []), BACKPORT_SUBSCRIPTION]
            entry["extension"] = [{"url": TOPIC_EXTENSION, "valueCanonical": url} for url in topics]
            entry["documentation"] = ("Topic-based subscriptions (rest-hook); each Subscription is its owner's "
                                      "alone. docs/subscriptions.md")
        if t.server_written:
            entry["documentation"] = "Written only by the server: one AuditEvent per interaction."
        resources.append(entry)
    statement = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": software_date,
        "publisher": "fhirserver",
        "kind": "instance",
        "software": {"name": "fhirserver", "version": __version__},
        "implementation": {"description": "fhirserver FHIR R4 API", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json", "xml", "application/fhir+xml"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json", "application/merge-patch+json"],
        "rest": [{
            "mode": "server",
            "security": {
                "extension": [smart_oauth_extension(root)],
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]}],
                "description": "OAuth 2.0 bearer tokens per SMART App Launch / Backend Services; "
                               "see .well-known/smart-configuration." + (
                                   f" Data is held in jurisdiction {jurisdiction}: a client registered in another "
                                   "jurisdiction receives a patient's data only where the patient's Consent permits "
                                   "that transfer (a permit provision with the purpose and the extension "
                                   "https://fhirserver.dev/fhir/StructureDefinition/recipient-jurisdiction); "
                                   "other reads are refused with 403." if jurisdiction else ""),
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "operation": [operation_entry(name, definition)
                          for name, (definition, _methods) in sorted(types.system_operations.items())
                          if definition.startswith("http://hl7.org/fhir/uv/bulkdata/OperationDefinition")],
        }],
    }
    if jurisdiction:
        statement["jurisdiction"] = [{"coding": [{"system": "urn:iso:std:iso:3166", "code": jurisdiction}]}]
    return statement


DEIDENTIFY_EXTENSION = "http://fhirserver.dev/StructureDefinition/export-deidentify"


def operation_entry(name: str, definition: str) -> dict[str, Any]:
    """A CapabilityStatement operation; Bulk exports also document our `_deidentify` parameter."""
    entry: dict[str, Any] = {"name": name, "definition": definition}
    if definition.startswith("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/") and "export" in definition:
        entry["extension"] = [{"url": DEIDENTIFY_EXTENSION, "valueCode": "safe-harbor"}]
        entry["documentation"] = (
            "Also accepts `_deidentify=safe-harbor`: HIPAA Safe Harbor de-identification (names, contact "
            "details, addresses below state and 3-digit ZIP, free text removed; dates reduced to the year; "
            "ids, references and identifiers replaced by keyed pseudonyms stable within one export). "
            "Required for research (HRESCH) exports.")
    return entry


def smart_configuration(root: str, scopes: list[str]) -> dict[str, Any]:
    return {
        "issuer": root,
        "jwks_uri": f"{root}/auth/jwks",
        "authorization_endpoint": f"{root}/auth/authorize",
        "token_endpoint": f"{root}/auth/token",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post",
                                                  "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "registration_endpoint": f"{root}/auth/register",
        "introspection_endpoint": f"{root}/auth/introspect",
        "revocation_endpoint": f"{root}/auth/revoke",
        "management_endpoint": f"{root}/api/openapi.json",
        "scopes_supported": ["openid", "fhirUser", "profile", "launch", "launch/patient", "offline_access",
                             "online_access", *scopes],
        "response_types_supported": ["code"],
        "capabilities": [
            "launch-ehr", "launch-standalone", "authorize-post", "client-public", "client-confidential-symmetric",
            "client-confidential-asymmetric", "context-ehr-patient", "context-standalone-patient",
            "context-banner", "context-style", "permission-offline", "permission-online", "permission-patient",
            "permission-user", "permission-v1", "permission-v2", "sso-openid-connect",
        ],
        "code_challenge_methods_supported": ["S256"],
    }
