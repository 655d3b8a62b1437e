"""Parse an HTTP request on /fhir into a FHIR Interaction (what is being asked, of what)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from .errors import FhirError
from .registry import TypeRegistry

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
FHIR_BASE_PATH = "/fhir"  # the FHIR API's place on the server (the contract: http://HOST:PORT/fhir)


def is_fhir_path(path: str) -> bool:
    """Whether a request path is on the FHIR API (`/fhir` itself or below it, not `/fhirx`)."""
    return path == FHIR_BASE_PATH or path.startswith(FHIR_BASE_PATH + "/")


JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "json", "*/*",
              "application/*", "text/json"}
XML_TYPES = {"application/fhir+xml", "application/xml", "text/xml", "xml", "application/xml+fhir"}


@dataclass
class Interaction:
    kind: str  # read vread update delete create search-type history-instance history-type capabilities smart-configuration
    method: str
    resource_type: str | None = None
    id: str | None = None
    version: str | None = None
    params: list[tuple[str, str]] = field(default_factory=list)
    operation: str | None = None  # $everything -> "everything"
    conditional: bool = False  # conditional create/update/delete
    public: bool = False  # no token required

    @property
    def query_string(self) -> str:
        from urllib.parse import urlencode

        return urlencode(self.params)


def _check_id(value: str, what: str = "id") -> str:
    if not ID_RE.match(value):
        raise FhirError(400, "invalid", f"'{value[:70]}' is not a valid FHIR {what}")
    return value


NDJSON_TYPES = {"application/fhir+ndjson", "application/ndjson"}


def negotiate_format(accept: str | None, fmt: str | None, ndjson: bool = False) -> str:
    """The response format, "json" or "xml" (fhir/xml_format.py): `_format` first, then the first
    type in Accept this server produces (NDJSON counts as JSON for Bulk Data downloads,
    `ndjson`). Raise 406 for anything else."""
    if fmt:
        base = fmt.split(";")[0].strip().lower()
        if base in XML_TYPES:
            return "xml"
        if base not in JSON_TYPES:
            raise FhirError(406, "not-supported", f"Unsupported _format '{fmt[:50]}'")
        return "json"
    if not accept:
        return "json"
    types = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    for t in types:
        if t in JSON_TYPES or (ndjson and t in NDJSON_TYPES):
            return "json"
        if t in XML_TYPES and not ndjson:
            return "xml"
    if not types:
        return "json"
    raise FhirError(406, "not-supported", "Only application/fhir+json and application/fhir+xml are supported")


def parse_interaction(method: str, path: str, query: str, form: list[tuple[str, str]] | None,
                      types: TypeRegistry, has_if_none_exist: bool) -> Interaction:
    params = parse_qsl(query, keep_blank_values=True)
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        if method == "POST":  # a batch or transaction Bundle
            return Interaction("bundle", method, params=params)
        raise FhirError(404 if method == "GET" else 405, "not-supported",
                        "Only batch and transaction Bundles (POST) are accepted at the base URL",
                        headers={"Allow": "POST"})
    if parts == ["metadata"]:
        if method != "GET":
            raise FhirError(405, "not-supported", "Use GET for /metadata")
        return Interaction("capabilities", method, params=params, public=True)
    if parts == ["_history"]:
        if method != "GET":
            raise FhirError(405, "not-supported", "Use GET for _history", headers={"Allow": "GET"})
        return Interaction("history-system", method, params=params)
    if parts == [".well-known", "smart-configuration"]:
        return Interaction("smart-configuration", method, params=params, public=True)
    if len(parts) == 1 and parts[0].startswith("$") and parts[0][1:] in types.system_operations:
        op = parts[0][1:]
        methods = types.system_operations[op][1]
        if method not in methods:
            raise FhirError(405, "not-supported", f"Use {' or '.join(sorted(methods))} for ${op}",
                            headers={"Allow": ", ".join(sorted(methods))})
        return Interaction("operation", method, params=params + (form or []) if method == "POST" else params,
                           operation=op)
    rtype = parts[0]
    spec = types.get(rtype)
    if spec is None:
        if rtype.startswith("$") or rtype.startswith("_"):
            raise FhirError(404, "not-supported", f"Operation or path '{rtype[:50]}' is not supported")
        raise FhirError(404, "not-supported", f"Resource type '{rtype[:64]}' is not supported")
    kind: str
    it = Interaction("", method, resource_type=rtype, params=params)
    if len(parts) == 1:
        if method == "GET":
            kind = "search-type"
        elif method == "POST":
            kind = "create"
            it.conditional = has_if_none_exist
        elif method == "PUT" and params:
            kind, it.conditional = "update", True
        elif method == "DELETE" and params:
            kind, it.conditional = "delete", True
        elif method == "PATCH" and params and "patch" in spec.interactions:
            kind, it.conditional = "patch", True
        else:
            allowed = _allowed_methods(spec.interactions & {"search-type", "create"})
            if spec.conditional_update:
                allowed |= {"PUT", "DELETE"} | ({"PATCH"} if "patch" in spec.interactions else set())
            raise FhirError(405, "not-supported", f"{method[:10]} is not allowed on /{rtype}",
                            headers={"Allow": ", ".join(sorted(allowed))})
    elif len(parts) == 2 and parts[1] == "_search":
        if method != "POST":
            raise FhirError(405, "not-supported", "Use POST for _search")
        kind = "search-type"
        it.params = params + (form or [])
    elif len(parts) == 2 and parts[1] == "_history":
        if method != "GET":
            raise FhirError(405, "not-supported", "Use GET for _history")
        kind = "history-type"
    elif (len(parts) == 2 and parts[1].startswith("$")) or (len(parts) == 3 and parts[2].startswith("$")):
        level = "type" if len(parts) == 2 else "instance"
        op = parts[-1][1:]
        if level == "instance":
            it.id = _check_id(parts[1])
        if not spec.operation(op, level):
            where = rtype if level == "type" else f"{rtype}/[id]"
            raise FhirError(404, "not-supported", f"Operation '{parts[-1][:50]}' is not supported on {where}")
        if method not in ("GET", "POST"):
            raise FhirError(405, "not-supported", f"Use GET or POST for ${op}", headers={"Allow": "GET, POST"})
        it.operation, it.kind = op, "operation"
        if method == "POST":
            it.params = params + (form or [])
        return it
    elif len(parts) == 2:
        it.id = _check_id(parts[1])
        kind = {"GET": "read", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}.get(method, "")
        if not kind:
            allowed = _allowed_methods(spec.interactions & {"read", "update", "delete", "patch"})
            raise FhirError(405, "not-supported", f"{method[:10]} is not allowed on a resource instance",
                            headers={"Allow": ", ".join(sorted(allowed))})
    elif len(parts) == 3 and parts[2] == "_history":
        it.id = _check_id(parts[1])
        if method != "GET":
            raise FhirError(405, "not-supported", "Use GET for _history")
        kind = "history-instance"
    elif len(parts) == 4 and parts[2] == "_history":
        it.id = _check_id(parts[1])
        it.version = _check_id(parts[3], "version id")
        if method != "GET":
            raise FhirError(405, "not-supported", "Use GET for a version")
        kind = "vread"
    else:
        raise FhirError(404, "not-supported", "Unknown FHIR path")
    if not spec.supports(kind):
        raise FhirError(405, "not-supported", f"Interaction '{kind}' is not supported for {rtype}",
                        headers={"Allow": ", ".join(sorted(_allowed_methods(spec.interactions)))})
    if it.conditional and kind == "create" and not spec.conditional_create:
        raise FhirError(405, "not-supported", f"Conditional create is not supported for {rtype}")
    if it.conditional and kind in ("update", "delete") and not spec.conditional_update:
        raise FhirError(405, "not-supported", f"Conditional {kind} is not supported for {rtype}")
    it.kind = kind
    return it


def _allowed_methods(interactions: frozenset[str]) -> set[str]:
    mapping = {"read": "GET", "vread": "GET", "search-type": "GET", "history-instance": "GET",
               "history-type": "GET", "create": "POST", "update": "PUT", "delete": "DELETE", "patch": "PATCH"}
    return {mapping[i] for i in interactions if i in mapping}
