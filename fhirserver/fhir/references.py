"""Reference rewriting shared by transaction Bundles and `fhirserver load`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# `Patient?identifier=http://hospital.example|123`: a reference by search (FHIR transaction rules)
CONDITIONAL = re.compile(r"^([A-Z][A-Za-z]{0,63})\?(.+)$")


def rewrite_references(value: object, mapping: dict[str, str]) -> Any:
    """A copy of `value` in which every `reference` found in `mapping` (a Bundle entry's fullUrl,
    e.g. `urn:uuid:...`) is replaced by its target (`Type/id`); the input is not modified."""
    if isinstance(value, dict):
        return {k: mapping.get(v, v) if k == "reference" and isinstance(v, str) else rewrite_references(v, mapping)
                for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite_references(v, mapping) for v in value]
    return value


def references(value: object) -> Iterator[str]:
    """Every `reference` string in `value`, in document order."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str):
                yield ref
            stack.extend(reversed([v for v in node.values() if isinstance(v, (dict, list))]))
        elif isinstance(node, list):
            stack.extend(reversed([v for v in node if isinstance(v, (dict, list))]))


def unresolved_urns(value: object, mapping: dict[str, str]) -> list[str]:
    """`urn:uuid:` references in `value` that `mapping` does not resolve (FHIR requires every such
    reference in a transaction to name an entry's fullUrl)."""
    return [ref for ref in references(value) if ref.startswith("urn:uuid:") and ref not in mapping]


def conditional_references(value: object) -> list[str]:
    """The conditional references (`Type?search`) in `value`, each once, in document order."""
    return list(dict.fromkeys(ref for ref in references(value) if CONDITIONAL.match(ref)))
