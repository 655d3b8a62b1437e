"""Structural checks of a resource's JSON that run before schema and model validation.

One iterative walk (no recursion, so no input can exhaust the Python stack) enforces:
- a nesting limit (`max_json_depth`): the models validate recursively and a few hundred levels of
  nested extensions crash them; real resources are shallow (the deepest HL7 R4 example nests 21);
- FHIR JSON rules the schema does not express: no empty objects, arrays or strings, and null only
  as a placeholder inside arrays of primitives;
- the R4 invariants every resource carries: ext-1 on every extension (a value or nested
  extensions, not both, not neither) and dom-2, dom-4, dom-5 on contained resources.

Note on contained narrative: R4 (4.0.1) dropped STU3's dom-1, so a contained resource may carry
narrative; it is accepted (and its XHTML is checked like any other, see narrative.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import FhirError

DEFAULT_MAX_DEPTH = 64


def json_depth(value: object, limit: int) -> int:
    """Container nesting depth of `value`, counting objects and arrays; stops past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[object] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _too_deep(limit: int, what: str = "The resource") -> FhirError:
    return FhirError(400, "too-costly", f"{what} nests objects and arrays more than {limit} levels deep "
                                        f"(the server's max_json_depth)")


def check_depth(value: object, limit: int, what: str = "The resource") -> None:
    if json_depth(value, limit) > limit:
        raise _too_deep(limit, what)


def _invariant(key: str, human: str, path: str) -> FhirError:
    return FhirError(400, "invariant", f"{key}: {human}", [path])


def _check_extension(item: object, path: str) -> None:
    if not isinstance(item, dict):
        return
    nested = bool(item.get("extension"))
    valued = any(k.startswith("value") for k in item)
    if nested == valued:
        raise _invariant("ext-1", "Must have either extensions or value[x], not both", path)


def _check_contained(body: dict[str, Any], root: str) -> None:
    for i, res in enumerate(body.get("contained") or []):
        if not isinstance(res, dict):
            continue
        path = f"{root}.contained[{i}]"
        if res.get("contained"):
            raise _invariant("dom-2", "If the resource is contained in another resource, it SHALL NOT contain "
                                      "nested Resources", f"{path}.contained")
        meta: dict[str, Any] = res["meta"] if isinstance(res.get("meta"), dict) else {}
        if "versionId" in meta or "lastUpdated" in meta:
            raise _invariant("dom-4", "If a resource is contained in another resource, it SHALL NOT have a "
                                      "meta.versionId or a meta.lastUpdated", f"{path}.meta")
        if meta.get("security"):
            raise _invariant("dom-5", "If a resource is contained in another resource, it SHALL NOT have a "
                                      "security label", f"{path}.meta.security")


def check_structure(body: dict[str, Any], root: str, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise FhirError(400) for the first problem met, with its location; one pass that also
    bounds the nesting depth (objects and arrays count one level each)."""
    _check_contained(body, root)
    stack: list[tuple[Any, str, int]] = [(body, root, 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                raise _too_deep(max_depth)
            if not node:
                raise FhirError(400, "structure", "Empty objects are not allowed in FHIR JSON", [path])
            pending: list[tuple[Any, str, int]] = []
            for key, value in node.items():
                child = f"{path}.{key}"
                if value is None:
                    raise FhirError(400, "structure", "null is not allowed here", [child])
                if isinstance(value, list):
                    if depth + 1 > max_depth:
                        raise _too_deep(max_depth)
                    if not value:
                        raise FhirError(400, "structure", "Empty arrays are not allowed in FHIR JSON", [child])
                    if all(v is None for v in value):
                        raise FhirError(400, "structure", "An array may not contain only nulls", [child])
                    for i, item in enumerate(value):
                        if item is None:
                            continue
                        if key in ("extension", "modifierExtension"):
                            _check_extension(item, f"{child}[{i}]")
                        pending.append((item, f"{child}[{i}]", depth + 2))
                else:
                    pending.append((value, child, depth + 1))
            stack.extend(reversed(pending))
        elif isinstance(node, list):  # an array inside an array is not FHIR JSON, but bound it all the same
            if depth > max_depth:
                raise _too_deep(max_depth)
            stack.extend((item, path, depth + 1) for item in node)
        elif isinstance(node, str) and not node.strip():
            raise FhirError(400, "value", "Empty or whitespace-only strings are not allowed", [path])
