"""Scopes in plain words, for the approval page."""

from __future__ import annotations

from ..auth.scopes import InvalidScope, parse_resource_scope

OTHER = {
    "openid": "Confirm who you are to the app",
    "fhirUser": "Tell the app which person you are in the health record",
    "profile": "Tell the app which person you are in the health record",
    "launch": "Open in the context of the current health record",
    "launch/patient": "Choose which patient's record the app works with",
    "launch/encounter": "Know the current visit",
    "offline_access": "Keep access after you close the app (until you revoke it)",
    "online_access": "Keep access while you are signed in",
}
PERMS = [("c", "create"), ("r", "read"), ("u", "update"), ("d", "delete"), ("s", "search")]
TYPES = {
    "Patient": "demographics", "Observation": "observations (results, vital signs)",
    "QuestionnaireResponse": "questionnaire answers", "Consent": "privacy consents",
    "AuditEvent": "access logs", "*": "all health data",
}
WHOSE = {"patient": "the selected patient's", "user": "your", "system": "all"}


def describe_scope(scope: str) -> str:
    if scope in OTHER:
        return OTHER[scope]
    try:
        parsed = parse_resource_scope(scope)
    except InvalidScope:
        return scope
    verbs = [word for letter, word in PERMS if letter in parsed.perms]
    text = f"{', '.join(verbs).capitalize()} {WHOSE[parsed.context]} {TYPES.get(parsed.resource_type, parsed.resource_type)}"
    if parsed.query:
        text += f" (only where {parsed.query})"
    return text
