"""Turn a resource into index rows, driven by the SearchParameter registry.

Protected parameters (see profiles/protected-parameters.json) are stored as blind-index HMACs:
string values as normalized-full ('n'), exact ('e') and normalized-prefix ('p') digests; protected
tokens as a digest of the code; protected dates as digests of their year, year-month and day.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..crypto.blind_index import BlindIndexer, normalize
from ..fhir.dates import MAX_US, MIN_US, parse_range
from ..fhir.fhirpath import Node
from .params import ParamRegistry, SearchParam

MAX_PREFIX_CHARS = 20
_STRING_PARTS = ("family", "given", "prefix", "suffix", "text", "line", "city", "district", "state",
                 "postalCode", "country")


@dataclass
class IndexRows:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    patients: list[str] = field(default_factory=list)  # Patient compartments this resource is in

    def add(self, table: str, **row: Any) -> None:
        self.rows.setdefault(table, []).append(row)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        out: list[str] = []
        for part in _STRING_PARTS:
            v = value.get(part)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.extend(x for x in v if isinstance(x, str))
        return out
    return []


def token_pairs(value: Any) -> list[tuple[str | None, str]]:
    """(system, code) pairs of a Coding, CodeableConcept, Identifier, ContactPoint or primitive."""
    if isinstance(value, bool):
        return [(None, "true" if value else "false")]
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, (int, float)):
        return [(None, str(value))]
    if not isinstance(value, dict):
        return []
    if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
        return [p for c in value.get("coding", []) for p in token_pairs(c)]
    if "code" in value:
        return [(value.get("system"), value["code"])] if isinstance(value["code"], str) else []
    if "value" in value and isinstance(value["value"], str):
        return [(value.get("system"), value["value"])]
    return []


def token_texts(value: Any) -> list[str]:
    """Display texts of a CodeableConcept / Coding (for token :text)."""
    if not isinstance(value, dict):
        return []
    texts = [value["text"]] if isinstance(value.get("text"), str) else []
    codings = value.get("coding", [value]) if "coding" in value else [value]
    texts.extend(c["display"] for c in codings if isinstance(c, dict) and isinstance(c.get("display"), str))
    return texts


def parse_reference(ref: str, base_url: str) -> tuple[str | None, str | None, str | None]:
    """(type, id, url) of a reference string; local references have url None."""
    if ref.startswith("#"):
        return None, None, ref
    if ref.startswith(base_url + "/"):
        ref = ref[len(base_url) + 1:]
    if "://" in ref or ref.startswith("urn:"):
        return None, None, ref.split("|")[0]
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) == 2 and parts[0] and parts[1]:
        return parts[0], parts[1], None
    return None, None, ref


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

    def _add(self, out: IndexRows, p: SearchParam, value: Any, node_type: str | None) -> None:
        ptype = p.type
        if ptype == "token":  # the most common kind first: this runs for every value of every write
            for system, code in token_pairs(value):
                if p.protected:
                    code = self.blind.digest(p.code, "t", code)
                out.add("token", param=p.code, system=system, code=code[:255] if code else code)
            if p.text_index:
                for text in token_texts(value):
                    self._add_string(out, f"{p.code}:text", text, True)
        elif ptype == "composite":
            self._add_composite(out, p, value, node_type)
        elif ptype == "string":
            for text in _strings(value):
                self._add_string(out, p.code, text, p.prefix_index)
        elif ptype == "date":
            for low, high in _date_ranges(value):
                if p.protected:
                    if isinstance(value, str) and value:
                        text = value
                        for prefix in {text[:4], text[:7], text[:10]}:
                            out.add("string", param=p.code, kind="d", value=self.blind.digest(p.code, "d", prefix))
                else:
                    out.add("date", param=p.code, low_us=low, high_us=high)
        elif ptype == "reference":
            ref = value.get("reference") if isinstance(value, dict) else value if isinstance(value, str) else None
            if isinstance(ref, str):
                rtype, rid, url = parse_reference(ref, self.base_url)
                out.add("reference", param=p.code, target_type=rtype, target_id=rid, url=url)
        elif ptype == "quantity":
            number = _number(value.get("value")) if isinstance(value, dict) else None
            if number is not None:
                out.add("quantity", param=p.code, value=number,
                        system=value.get("system"), code=value.get("code") or value.get("unit"))
        elif ptype == "number":
            number = _number(value)
            if number is not None:
                out.add("number", param=p.code, value=number)
        elif ptype == "uri" and isinstance(value, str):
            out.add("uri", param=p.code, value=value[:1024])

    def _add_composite(self, out: IndexRows, p: SearchParam, value: Any, node_type: str | None) -> None:
        if len(p.component_extract) != 2:
            return
        node = [(value, node_type)]
        seconds = p.component_extract[1](node)
        if not seconds:
            return  # most composites of a resource have no second component (value[x] is one type)
        firsts = [pair for v, _t in p.component_extract[0](node) for pair in token_pairs(v)]
        kind = p.component_types[1]
        for system, code in firsts:
            for v, _t in seconds:
                row: dict[str, Any] = {"param": p.code, "system": system, "code": code[:255], "system2": None,
                                       "code2": None, "num": None, "low_us": None, "high_us": None}
                if kind == "token":
                    for s2, c2 in token_pairs(v):
                        out.add("composite", **{**row, "system2": s2, "code2": c2[:255]})
                elif kind == "quantity" and isinstance(v, dict) and _number(v.get("value")) is not None:
                    out.add("composite", **{**row, "num": _number(v["value"]), "system2": v.get("system"),
                                            "code2": v.get("code") or v.get("unit")})
                elif kind == "date":
                    for low, high in _date_ranges(v):
                        out.add("composite", **{**row, "low_us": low, "high_us": high})
                elif kind == "string" and isinstance(v, str):
                    out.add("composite", **{**row, "code2": self.blind.digest(p.code, "n", normalize(v))})

    def _add_string(self, out: IndexRows, code: str, text: str, prefixes: bool) -> None:
        norm = normalize(text)
        digest = self.blind.digest
        out.add("string", param=code, kind="e", value=digest(code, "e", text))
        out.add("string", param=code, kind="n", value=digest(code, "n", norm))
        for i in range(1, min(len(norm), MAX_PREFIX_CHARS) + 1 if prefixes else 0):
            out.add("string", param=code, kind="p", value=digest(code, "p", norm[:i]))


def _number(value: Any) -> float | None:
    """JSON numbers arrive as int or Decimal (parsed so decimal precision is kept)."""
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return float(value)
    return None


def _date_ranges(value: Any) -> list[tuple[int, int]]:
    try:
        if isinstance(value, str):
            return [parse_range(value)]
        if isinstance(value, dict) and ("start" in value or "end" in value):  # Period
            low = parse_range(value["start"])[0] if isinstance(value.get("start"), str) else MIN_US
            high = parse_range(value["end"])[1] if isinstance(value.get("end"), str) else MAX_US
            return [(low, high)]
    except ValueError:
        return []
    return []
