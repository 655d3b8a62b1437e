"""Regenerate the spec-derived files under profiles/ from ../shared/fhir-spec.

The product must not need ../shared at run time, so the parts we use are copied here:
- fhir-schema-subset.json: the R4 JSON schema pruned to the definitions reachable from our
  resource types (contained resources are validated recursively by the server instead of
  through the 150-way ResourceList oneOf).
- search-parameters.json: the R4 SearchParameters whose base includes our types or Resource.
- compartmentdefinition-patient.json: copied as is.
- summary-elements.json: per type, the top-level summary and mandatory elements.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "fhir-spec"
OUT = ROOT / "profiles"
TYPES = list(json.loads((ROOT / "profiles" / "resource-types.json").read_text())["types"])  # the registry is the list


def reachable(defs: dict, roots: list[str]) -> set[str]:
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        stack = [defs[name]]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str):
                    visit(ref.rsplit("/", 1)[-1])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)

    for root in roots:
        visit(root)
    return seen


def _model_elements(rtype: str, schema_required: list[str]) -> dict[str, list[str]]:
    """Summary and mandatory top-level elements from the fhir.resources R4B model's element
    metadata (`summary_element_property`, `element_required`) and the R4 schema's `required`:
    for the first types this gives exactly the StructureDefinitions' summary elements."""
    import importlib

    model = getattr(importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}"), rtype)
    summary: list[str] = []
    mandatory: list[str] = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        element = str(extra.get("one_of_many") or field.alias or name)
        if extra.get("summary_element_property") and element not in summary:
            summary.append(element)
        required = extra.get("element_required") or extra.get("one_of_many_required") or element in schema_required
        if required and element not in mandatory:
            mandatory.append(element)
    mandatory += [r for r in schema_required if r not in mandatory and r != "resourceType"]
    return {"summary": summary, "mandatory": mandatory}


def _model_choices(rtype: str) -> set[str]:
    """Names of the choice elements (onset[x], occurrence[x], dose[x], ...) anywhere in the type,
    from the fhir.resources R4B models (`one_of_many`), walking into backbone elements and data
    types: FHIRPath navigation of search expressions must expand them (onset -> onsetDateTime)."""
    import importlib
    import typing

    seen: set[type] = set()
    names: set[str] = set()

    def walk(model: type) -> None:
        if model in seen:
            return
        seen.add(model)
        for field in model.model_fields.values():  # type: ignore[attr-defined]
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("one_of_many"):
                names.add(str(extra["one_of_many"]))
            stack = [field.annotation]
            while stack:
                ann = stack.pop()
                klass = getattr(ann, "get_model_klass", None)
                if klass is not None:
                    walk(klass())
                stack.extend(typing.get_args(ann))

    walk(getattr(importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}"), rtype))
    return names


def _primitive_extensions(defs: dict) -> int:
    """The R4 schema leaves out the `_name` sibling of `canonical` elements, though the JSON
    format lets every primitive element carry one (US Core's QuestionnaireResponse examples extend
    `questionnaire` so). Add them. (Element and Resource ids, and Extension.url, are attributes in
    XML and have none, rightly.)"""
    primitives = {"canonical"}
    added = 0
    for definition in defs.values():
        props = definition.get("properties") if isinstance(definition, dict) else None
        if not isinstance(props, dict):
            continue
        for name, prop in list(props.items()):
            ref = prop.get("$ref") or (prop.get("items") or {}).get("$ref")
            if name.startswith("_") or f"_{name}" in props or not isinstance(ref, str) \
                    or ref.rsplit("/", 1)[-1] not in primitives:
                continue
            element = {"$ref": "#/definitions/Element"}
            props[f"_{name}"] = {"type": "array", "items": element} if "items" in prop else element
            added += 1
    return added


def main() -> None:
    OUT.mkdir(exist_ok=True)
    schema = json.loads((SPEC / "fhir.schema.json").read_text())
    defs = schema["definitions"]
    print(f"primitive extension siblings added: {_primitive_extensions(defs)}")
    defs["ResourceList"] = {
        "description": "Any resource; validated by type in fhirserver.fhir.validation.",
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string"}},
    }
    keep = reachable(defs, TYPES)
    subset = {
        "$schema": schema["$schema"],
        "description": "Subset of the FHIR R4 4.0.1 JSON schema (fhir.schema.json) for fhirserver's types.",
        "definitions": {k: defs[k] for k in sorted(keep)},
    }
    (OUT / "fhir-schema-subset.json").write_text(json.dumps(subset, indent=1) + "\n")

    bundle = json.loads((SPEC / "search-parameters-r4-all.json").read_text())  # every type; filtered below
    wanted = set(TYPES) | {"Resource", "DomainResource"}
    entries = []
    for entry in bundle["entry"]:
        res = entry["resource"]
        if wanted & set(res.get("base", [])):
            entries.append({"fullUrl": entry.get("fullUrl"), "resource": res})
    out = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    (OUT / "search-parameters.json").write_text(json.dumps(out, indent=1) + "\n")

    comp = json.loads((SPEC / "compartmentdefinition-patient.json").read_text())
    (OUT / "compartmentdefinition-patient.json").write_text(json.dumps(comp, indent=1) + "\n")
    sdefs = json.loads((SPEC / "structuredefinitions-r4.json").read_text())
    elements: dict[str, dict[str, list[str]]] = {}
    choices = set()
    for entry in sdefs["entry"]:
        for el in entry["resource"].get("snapshot", {}).get("element", []):
            last = el["path"].split(".")[-1]
            if last.endswith("[x]"):
                choices.add(last[:-3])
        sd = entry["resource"]
        if sd["id"] not in TYPES:
            continue
        summary, mandatory = [], []
        for el in sd["snapshot"]["element"]:
            path = el["path"]
            if path.count(".") != 1:
                continue
            name = path.split(".", 1)[1].replace("[x]", "")
            if el.get("isSummary"):
                summary.append(name)
            if el.get("min", 0) > 0:
                mandatory.append(name)
        elements[sd["id"]] = {"summary": summary, "mandatory": mandatory}
    for rtype in TYPES:  # types whose StructureDefinition the shared data lacks
        if rtype not in elements:
            elements[rtype] = _model_elements(rtype, defs[rtype].get("required", []))
            choices |= _model_choices(rtype)
    (OUT / "summary-elements.json").write_text(json.dumps(
        {"description": "Top-level elements per type marked isSummary / min>0 in the R4 StructureDefinitions; "
                        "used for _summary and _elements. choiceElements: names of choice elements (value[x], ...) "
                        "that FHIRPath navigation must expand to valueQuantity etc.",
         "types": elements, "choiceElements": sorted(choices)}, indent=1) + "\n")
    print(f"schema definitions: {len(keep)}, search parameters: {len(entries)}")


if __name__ == "__main__":
    main()
