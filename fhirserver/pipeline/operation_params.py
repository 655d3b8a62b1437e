"""An operation's `Parameters` body (POST), read one way for every operation ($validate, the
terminology operations, Bulk Data kick-off, $erasure-request): the body must be a Parameters
resource, each parameter must have a name, and its value is the one `value[x]` it carries (a
primitive as its string, booleans lower-case as in a query; a complex type such as a Coding or a
Reference as its JSON) or its `resource`. A parameter with `part`s only has no value here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..fhir.errors import FhirError


@dataclass(frozen=True)
class Param:
    name: str
    value: str | dict[str, Any] | None
    path: str  # Parameters.parameter[i], for an issue's expression


def parameters_of(body: dict[str, Any], what: str) -> list[Param]:
    """The parameters of a POSTed Parameters resource; 400 when it is not one (`what` names the
    operation in the message)."""
    if body.get("resourceType") != "Parameters":
        raise FhirError(400, "invalid", f"A POST to {what} takes a Parameters resource")
    raw = body.get("parameter")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise FhirError(400, "invalid", "Parameters.parameter is a list", ["Parameters.parameter"])
    out = []
    for i, item in enumerate(raw):
        path = f"Parameters.parameter[{i}]"
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise FhirError(400, "invalid", "Each parameter needs a name", [path])
        out.append(Param(name, _value(item), path))
    return out


def _value(item: dict[str, Any]) -> str | dict[str, Any] | None:
    if isinstance(item.get("resource"), dict):
        return dict(item["resource"])
    for key, value in item.items():
        if not key.startswith("value"):
            continue
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        if isinstance(value, dict):
            return dict(value)
    return None
