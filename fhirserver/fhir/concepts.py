"""Plain text of FHIR data types for people: a CodeableConcept or Coding as its text, display or code."""

from __future__ import annotations


def concept_text(concept: object) -> str:
    """`text`, else the first coding's display, else its code ("" for anything else)."""
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for c in concept.get("coding", []) or []:
        if isinstance(c, dict) and (c.get("display") or c.get("code")):
            return str(c.get("display") or c.get("code"))
    return ""
