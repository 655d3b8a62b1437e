"""Reference rewriting shared by transaction Bundles and `fhirserver load`."""

from __future__ import annotations

from typing import Any


def rewrite_references(value: Any, mapping: dict[str, str]) -> Any:
    """A copy of `value` in which every `reference` found in `mapping` (a Bundle entry's fullUrl,
    e.g. `urn:uuid:...`) is replaced by its target (`Type/id`); the input is not modified."""
    if isinstance(value, dict):
        return {k: mapping.get(v, v) if k == "reference" and isinstance(v, str) else rewrite_references(v, mapping)
                for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite_references(v, mapping) for v in value]
    return value
