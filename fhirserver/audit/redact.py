"""Redaction of the identifying values an AuditEvent carries about *other* requests.

An AuditEvent's `entity.query` holds the search a client ran (names, birth dates, identifiers it
searched for) and `entity.detail` free text such as a break-the-glass reason. Only an auditor
holding the explicit `audit_query_values` permission reads them in plain text; everyone else who
may read the event (other auditors, a patient reading the events about themselves) gets them with
the parameter names kept and every value replaced, and the event is labelled REDACTED. The
stored event (and so the hash chain) is never changed: redaction happens when it is rendered.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ..storage.codec import dump_json, parse_json

REDACTED_VALUE = "redacted"
# result-control parameters whose values say how, not whom, a client searched
SAFE_QUERY_PARAMS = frozenset({
    "_count", "_sort", "_summary", "_elements", "_total", "_include", "_revinclude", "_format", "_type",
    "_since", "_outputFormat", "_contained", "_containedType", "max", "_deidentify",
})
SAFE_DETAIL_TYPES = frozenset({"consent-mode", "sha256"})
REDACTED_LABEL = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "REDACTED",
                  "display": "redacted"}


def redact_query(query: str) -> str:
    """`name=Devendra&_count=5` -> `name=redacted&_count=5`; a URL keeps its path."""
    prefix, sep, qs = query.rpartition("?") if "?" in query else ("", "", query)
    pairs = parse_qsl(qs, keep_blank_values=True)
    if not pairs and qs:
        return prefix + sep + REDACTED_VALUE
    kept = [(k, v if k.split(":", 1)[0] in SAFE_QUERY_PARAMS else REDACTED_VALUE) for k, v in pairs]
    return prefix + sep + urlencode(kept, safe=",:|")


def redact_event(event: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The event with query values and entity details redacted (in place; returned); details of
    the types in `keep` stay (a patient reading why someone broke the glass on their record)."""
    changed = False
    for entity in event.get("entity") or []:
        if not isinstance(entity, dict):
            continue
        query = entity.get("query")
        if isinstance(query, str):
            try:
                text = base64.b64decode(query, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                text = REDACTED_VALUE
            entity["query"] = base64.b64encode(redact_query(text).encode()).decode()
            changed = True
        for detail in entity.get("detail") or []:
            if not isinstance(detail, dict) or detail.get("type") in SAFE_DETAIL_TYPES | keep:
                continue
            for key in [k for k in detail if k.startswith("value")]:
                detail.pop(key)
            detail["valueString"] = REDACTED_VALUE
            changed = True
    if changed:
        meta = event.setdefault("meta", {})
        meta["security"] = [*meta.get("security", []), dict(REDACTED_LABEL)]
    return event


def redact_body(body: bytes, keep: frozenset[str] = frozenset()) -> bytes:
    """`redact_event` over a stored AuditEvent's JSON; bodies with nothing to redact are returned as-is."""
    if b'"query"' not in body and b'"detail"' not in body:
        return body
    return dump_json(redact_event(parse_json(body), keep))
