"""Reading a request: its body (JSON, or XML turned into the same JSON; parsed, depth-checked,
validated) and its ETag headers."""

from __future__ import annotations

import re
from typing import Any

from ..fhir.errors import FhirError
from ..fhir.interaction import XML_TYPES
from ..fhir.structure import check_depth
from ..fhir.xml_format import from_xml
from ..storage.codec import DuplicateKeyError, parse_json
from .context import RequestContext

MAX_VERSION = 2**63 - 1  # version numbers are 64-bit integers in the database
BODY_WRAPPING_DEPTH = 6  # Bundle.entry[n].resource / Parameters.parameter[n].resource: 4 levels, and slack
ETAG_RE = re.compile(r'^(?:W/)?"(\d+)"$')


def parse_etag(value: str | None, header: str) -> int | None:
    if value is None:
        return None
    m = ETAG_RE.match(value.strip())
    if not m or int(m.group(1)) > MAX_VERSION:
        raise FhirError(400, "invalid", f"{header} must be an ETag like W/\"3\"")
    return int(m.group(1))


def parse_body(ctx: RequestContext, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object of the request (`also`: further media types the caller accepts)."""
    ctype = (ctx.header("content-type") or "").split(";")[0].strip().lower()
    xml = ctype in XML_TYPES
    if ctype and not xml and ctype not in ("application/fhir+json", "application/json", "application/json+fhir",
                                           "text/json", *also):
        raise FhirError(415, "not-supported", "Send the resource as application/fhir+json or application/fhir+xml")
    if not ctx.body:
        raise FhirError(400, "structure", "The request body is empty")
    if xml:
        body: object = from_xml(ctx.body)  # the same resource in JSON (fhir/xml_format.py)
    else:
        try:
            body = parse_json(ctx.body)
        except DuplicateKeyError as exc:
            raise FhirError(400, "structure", f"The request body repeats a property: {exc}") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise FhirError(400, "structure", "The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise FhirError(400, "structure", "The request body must be a JSON object (a FHIR resource)")
    # checked here, before any code walks the body; a Bundle or Parameters wraps resources a few
    # levels down, and each of those is then held to max_json_depth itself by the validator
    if body.get("resourceType") in ("Bundle", "Parameters"):  # a resource is bounded by its validation
        check_depth(body, ctx.services.settings.max_json_depth + BODY_WRAPPING_DEPTH, "The request body")
    return body


def validated(ctx: RequestContext) -> dict[str, Any]:
    body = parse_body(ctx)
    rtype = ctx.interaction.resource_type
    ctx.services.validator.validate(body, rtype)
    return body
