"""The SearchParameter registry, loaded from profiles/ (data, not code).

Every `profiles/search-parameters*.json` Bundle (or `profiles/searchparameters/*.json` single
resource) is read; a SearchParameter applies to each of its `base` types that we serve. Adding a
custom SearchParameter file and running `fhirserver db reindex` makes it searchable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fhir.fhirpath import Extract, Fn, UnsupportedExpression, compile_expression, compile_relative

SPECIAL = {"_id", "_lastUpdated"}  # answered from the resource table itself
UNSUPPORTED = {"_text", "_content", "_query", "_list", "_has", "_filter"}


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str  # number | date | string | token | reference | composite | quantity | uri | special
    resource_type: str
    expression: str
    url: str
    extract: Extract | None
    protected: bool = False
    prefix_index: bool = True  # string params: also index normalized prefixes (starts-with search)
    targets: tuple[str, ...] = ()
    components: tuple[tuple[str, str], ...] = ()  # (definition url, expression)
    component_types: tuple[str, ...] = ()  # parameter type of each component
    text_index: bool = False  # token: also index display/text for :text
    identifier_index: bool = True  # reference: also index Reference.identifier for :identifier
    component_extract: tuple[Fn, ...] = ()
    documentation: str = ""


@dataclass
class ParamRegistry:
    by_type: dict[str, dict[str, SearchParam]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    # input limits every parsed search is held to (settings search_max_params / search_max_values):
    # thousands of parameters or OR-values would build SQL larger than the database accepts
    max_params: int = 100
    max_values: int = 100

    def get(self, resource_type: str, code: str) -> SearchParam | None:
        return self.by_type.get(resource_type, {}).get(code)

    def for_type(self, resource_type: str) -> dict[str, SearchParam]:
        return self.by_type.get(resource_type, {})


def _iter_definitions(profiles_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    files = sorted(profiles_dir.glob("search-parameters*.json"))
    files += sorted((profiles_dir / "searchparameters").glob("*.json")) if (profiles_dir / "searchparameters").is_dir() else []
    for path in files:
        doc = json.loads(path.read_text())
        if doc.get("resourceType") == "Bundle":
            out.extend(e["resource"] for e in doc.get("entry", []) if e.get("resource", {}).get("resourceType") == "SearchParameter")
        elif doc.get("resourceType") == "SearchParameter":
            out.append(doc)
    return out


def load_param_registry(profiles_dir: Path, type_names: list[str]) -> ParamRegistry:
    protected_doc = json.loads((profiles_dir / "protected-parameters.json").read_text())
    protected = set(protected_doc.get("token", [])) | set(protected_doc.get("date", []))
    all_strings = bool(protected_doc.get("allStringParameters", True))
    exact_only = set(protected_doc.get("exactOnlyStrings", []))
    token_text = set(protected_doc.get("tokenText", []))
    no_ref_identifier = set(protected_doc.get("noReferenceIdentifier", []))
    definitions = _iter_definitions(profiles_dir)
    type_by_url = {d.get("url"): d.get("type") for d in definitions}
    reg = ParamRegistry()
    for definition in definitions:
        if definition.get("status") == "retired":
            continue
        bases = definition.get("base", [])
        code = definition["code"]
        for rtype in type_names:
            applies = rtype in bases or "Resource" in bases or "DomainResource" in bases
            if not applies or code in UNSUPPORTED:
                continue
            expression = definition.get("expression", "")
            ptype = definition["type"]
            if ptype == "special":  # Location.near (geo distance): no index for it, so not declared
                reg.skipped.append(f"{rtype}.{code}: special parameters are not supported")
                continue
            extract = None
            component_fns: tuple[Fn, ...] = ()
            if ptype == "composite" and expression:
                try:
                    component_fns = tuple(compile_relative(c["expression"]) for c in definition.get("component", []))
                except UnsupportedExpression as exc:
                    reg.skipped.append(f"{rtype}.{code}: {exc}")
                    continue
            if expression and code not in SPECIAL:
                try:
                    extract = compile_expression(expression, rtype)
                except UnsupportedExpression as exc:
                    reg.skipped.append(f"{rtype}.{code}: {exc}")
                    continue
                if extract is None:
                    continue
            components = tuple((c["definition"], c["expression"]) for c in definition.get("component", []))
            component_types = tuple(type_by_url.get(url, "") or "" for url, _e in components)
            if ptype == "composite" and (not expression or "" in component_types):
                reg.skipped.append(f"{rtype}.{code}: composite with unknown components")
                continue
            reg.by_type.setdefault(rtype, {})[code] = SearchParam(
                code=code,
                type=ptype,
                resource_type=rtype,
                expression=expression,
                url=definition.get("url", ""),
                extract=extract,
                protected=(ptype == "string" and all_strings) or f"{rtype}.{code}" in protected,
                prefix_index=f"{rtype}.{code}" not in exact_only,
                component_types=component_types,
                component_extract=component_fns,
                text_index=f"{rtype}.{code}" in token_text,
                identifier_index=f"{rtype}.{code}" not in no_ref_identifier,
                targets=tuple(definition.get("target", [])),
                components=components,
                documentation=(definition.get("description") or "")[:500],
            )
    return reg
