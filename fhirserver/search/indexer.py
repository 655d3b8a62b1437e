"""Turn a resource into index rows, driven by the SearchParameter registry.

Protected parameters (see profiles/protected-parameters.json) are stored as blind-index HMACs:
string values as normalized-full ('n'), exact ('e') and normalized-prefix ('p') digests; protected
tokens as a digest of the code; protected dates as digests of their year, year-month and day.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..crypto.blind_index import BlindIndexer
from ..fhir.fhirpath import Node
from .params import ParamRegistry, SearchParam
from .types import TYPES
from .values import IndexRows, parse_reference


class Indexer:
    def __init__(self, params: ParamRegistry, blind: BlindIndexer, base_url: str,
                 compartment_params: dict[str, tuple[str, ...]]) -> None:
        self.params = params
        self.blind = blind
        self.base_url = base_url.rstrip("/")
        self.compartment_params = compartment_params

    def index(self, resource_type: str, resource: dict[str, Any]) -> IndexRows:
        patients: list[str] = []
        if resource_type == "Patient" and isinstance(resource.get("id"), str):
            patients.append(resource["id"])
        found: list[tuple[SearchParam, list[Node]]] = []
        for param in self.params.for_type(resource_type).values():
            if param.extract is None:
                continue
            try:
                found.append((param, param.extract(resource)))
            except (TypeError, AttributeError, KeyError):
                continue
        return self.rows_from_nodes(resource_type, found, patients)

    def rows_from_nodes(self, resource_type: str, param_nodes: Iterable[tuple[SearchParam, list[Node]]],
                        patients: list[str] | None = None) -> IndexRows:
        """Index rows (and Patient compartments) from each parameter's extracted nodes, in order.

        Shared by the FHIRPath route (`index`) and callers that already know the nodes (the
        server-built AuditEvent), so both produce rows through the same code."""
        out = IndexRows()
        comp_params = self.compartment_params.get(resource_type, ())
        patients = patients if patients is not None else []
        for param, nodes in param_nodes:
            compartment = param.type == "reference" and param.code in comp_params
            for value, node_type in nodes:
                self._add(out, param, value, node_type)
                if compartment and isinstance(value, dict):
                    ref = value.get("reference")
                    if isinstance(ref, str):
                        rtype, rid, _url = parse_reference(ref, self.base_url)
                        if rtype == "Patient" and rid and rid not in patients:
                            patients.append(rid)
        out.patients = patients
        return out

    def _add(self, out: IndexRows, p: SearchParam, value: object, node_type: str | None) -> None:
        kind = TYPES.get(p.type)
        if kind is not None:  # `special` parameters have no index rows
            kind.index(self, out, p, value, node_type)
