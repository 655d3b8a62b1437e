"""_summary and _elements: return a subset of a resource, tagged SUBSETTED as FHIR requires."""

from __future__ import annotations

from typing import Any

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
             "display": "subsetted"}
ALWAYS = {"resourceType", "id", "meta"}


def _matches(key: str, names: set[str]) -> bool:
    if key in names:
        return True
    # choice elements: value -> valueQuantity
    return any(key.startswith(n) and len(key) > len(n) and key[len(n)].isupper() for n in names)


def _tag(out: dict[str, Any]) -> dict[str, Any]:
    meta = dict(out.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if not any(t.get("code") == "SUBSETTED" for t in tags):
        tags.append(SUBSETTED)
    meta["tag"] = tags
    out["meta"] = meta
    return out


def apply_subsetting(body: dict[str, Any], summary: str | None, elements: list[str] | None,
                     summary_elements: dict[str, Any]) -> dict[str, Any]:
    if summary in (None, "false") and not elements:
        return body
    spec = summary_elements.get(body.get("resourceType", ""), {"summary": [], "mandatory": []})
    mandatory = set(spec["mandatory"])
    if summary == "true":
        keep = set(spec["summary"]) | mandatory
        out = {k: v for k, v in body.items() if k in ALWAYS or _matches(k, keep)}
    elif summary == "text":
        keep = {"text"} | mandatory
        out = {k: v for k, v in body.items() if k in ALWAYS or _matches(k, keep)}
    elif summary == "data":
        out = {k: v for k, v in body.items() if k != "text"}
    else:
        keep = {e.split(".")[0] for e in elements or []} | mandatory
        out = {k: v for k, v in body.items() if k in ALWAYS or _matches(k, keep)}
    return _tag(out)
