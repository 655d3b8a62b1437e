"""PATCH documents applied to a resource's JSON: JSON Patch (RFC 6902, the `jsonpatch` library) and
FHIRPath Patch (a `Parameters` resource of `operation` parts: add, insert, delete, replace, move;
R4 "FHIRPath Patch"), the latter on this server's FHIRPath evaluator.

FHIRPath Patch paths are the evaluator's subset (element names, `where(...)`, `first()`, `ofType`,
...). Whether an added element repeats comes from the R4 JSON schema in profiles/. The result is
validated by the caller exactly as a PUT body is. Errors never echo resource content: a malformed
document is a 400, an operation that cannot apply (a failed `test`, a path matching nothing where
something is required) a 422.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer
import orjson

from .errors import FhirError
from .fhirpath import UnsupportedExpression, compile_expression

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
_TYPES = ("add", "insert", "delete", "replace", "move")


MAX_OPERATIONS = 1000  # operations in one patch document (JSON Patch or FHIRPath Patch)
MAX_COPIED_BYTES = 256 << 10  # what JSON Patch `copy` ops may add in all (serialized JSON)


def _too_costly(message: str) -> FhirError:
    return FhirError(413, "too-costly", message)


def apply_json_patch(resource: dict[str, Any], ops: object) -> dict[str, Any]:
    """Apply `ops` to `resource` (changed in place: the caller passes a fresh copy), one operation
    at a time so that the work stays bounded: at most MAX_OPERATIONS operations, and `copy`
    operations add at most MAX_COPIED_BYTES in all -- a copy is the only operation that adds more
    than the patch document itself holds, and 20 copies of a copy would otherwise double the
    document 20 times. Each copy is measured (serialized) before it is made, and made as an `add`
    of that serialized value read back (RFC 6902 4.5: the same result), never by a deep copy."""
    if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
        raise FhirError(400, "structure", "A JSON Patch document is an array of operation objects")
    if len(ops) > MAX_OPERATIONS:
        raise _too_costly(f"A patch may have at most {MAX_OPERATIONS} operations")
    try:
        jsonpatch.JsonPatch(ops)  # the whole document is well-formed before anything is applied
    except (jsonpatch.InvalidJsonPatch, TypeError) as exc:
        raise FhirError(400, "structure", f"Invalid JSON Patch: {str(exc)[:120]}") from None
    copied = 0
    result: Any = resource
    try:
        for op in ops:
            if op.get("op") == "copy":
                blob = orjson.dumps(jsonpointer.resolve_pointer(result, op.get("from")))
                copied += len(blob)
                if copied > MAX_COPIED_BYTES:
                    raise _too_costly(f"JSON Patch copy operations may add at most {MAX_COPIED_BYTES} bytes")
                result = _add(result, op.get("path"), orjson.loads(blob))
                continue
            result = jsonpatch.JsonPatch([op]).apply(result, in_place=True)
    except jsonpatch.JsonPatchTestFailed:
        raise FhirError(422, "processing", "A JSON Patch 'test' operation failed; nothing was changed") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError, IndexError,
            orjson.JSONEncodeError):
        raise FhirError(422, "processing", "A JSON Patch operation does not apply to this resource "
                                           "(path not found or wrong type); nothing was changed") from None
    if not isinstance(result, dict):
        raise FhirError(422, "processing", "The patched document is not a resource")
    return result


def _add(doc: object, path: str, value: object) -> Any:
    """RFC 6902 `add` of a value the caller made fresh (jsonpatch's own add deep-copies it again:
    the cost a copy bomb relies on)."""
    pointer = jsonpointer.JsonPointer(path)
    if not pointer.parts:
        return value
    parent, part = pointer.to_last(doc)
    if isinstance(parent, list):
        if part == "-":
            parent.append(value)
        elif isinstance(part, int) and part <= len(parent):
            parent.insert(part, value)
        else:
            raise IndexError(path)
    elif isinstance(parent, dict):
        parent[part] = value
    else:
        raise TypeError(path)
    return doc


def apply_merge_patch(resource: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON Merge Patch (RFC 7386, section 2 -- the whole algorithm): what clients such as fhirpy
    send as a partial resource. `null` removes an element; objects merge; anything else replaces."""
    def merge(target: object, change: object) -> Any:
        if not isinstance(change, dict):
            return change
        out = dict(target) if isinstance(target, dict) else {}
        for key, value in change.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out.get(key), value)
        return out

    result = merge(resource, patch)
    assert isinstance(result, dict)
    return result


# ------------------------------------------------------------------ FHIRPath Patch
@lru_cache(maxsize=4)
def _schema(profiles_dir: str) -> dict[str, Any]:
    doc = json.loads((Path(profiles_dir) / "fhir-schema-subset.json").read_text())
    return dict(doc.get("definitions", {}))


def _bad(message: str, status: int = 422) -> FhirError:
    return FhirError(status, "processing" if status == 422 else "structure", message)


def _parts(op: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in op.get("part", []) if isinstance(op.get("part"), list) else []:
        if not isinstance(part, dict) or not isinstance(part.get("name"), str):
            raise _bad("Each operation part needs a name", 400)
        value = next((v for k, v in part.items() if k.startswith("value")), None)
        out[part["name"]] = value
    return out


def _identifiers(path: str) -> list[str]:
    """The element names of a path outside function arguments (`Patient.name.where(x='y').given`
    -> Patient, name, given)."""
    names, depth, word = [], 0, ""
    for ch in path + ".":
        if ch == "(":
            depth += 1
            word = ""
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch == ".":
            if word and word.isidentifier():
                names.append(word)
            word = ""
        elif depth == 0:
            word += ch
    return names


def _repeats(schema: dict[str, Any], rtype: str, path: str, name: str) -> bool:
    """Does element `name` of the node `path` addresses repeat (type array in the R4 schema)?"""
    defn = schema.get(rtype, {})
    for step in [*_identifiers(path)[1:], name]:
        prop = defn.get("properties", {}).get(step)
        if prop is None:
            raise _bad(f"'{step}' is not an element here")
        if step == name:
            return bool(prop.get("type") == "array")
        ref = (prop.get("items") or prop).get("$ref", "")
        defn = schema.get(ref.rsplit("/", 1)[-1], {})
    return False


def _split_last(path: str) -> tuple[str, str] | None:
    """`A.b.c` -> (`A.b`, `c`) when the last step is a plain element name; None otherwise."""
    depth = 0
    for i in range(len(path) - 1, -1, -1):
        ch = path[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            depth -= 1
        elif ch == "." and depth == 0:
            last = path[i + 1:]
            return (path[:i], last) if last.isidentifier() else None
    return None


def _eval(resource: dict[str, Any], path: str) -> list[Any]:
    try:
        fn = compile_expression(path, resource["resourceType"])
    except (UnsupportedExpression, ValueError):
        raise _bad(f"Unsupported FHIRPath in patch: {path[:80]}", 400) from None
    if fn is None:
        raise _bad(f"The path does not start at {resource['resourceType']}", 400)
    return [v for v, _t in fn(resource)]


def _locate(resource: dict[str, Any], path: str) -> list[tuple[Any, Any]]:
    """(container, key) of every element `path` matches."""
    split = _split_last(path)
    if split is not None:
        out: list[tuple[Any, Any]] = []
        for parent in _eval(resource, split[0]):
            if not isinstance(parent, dict):
                continue
            key = split[1] if split[1] in parent else next(  # a choice element: value -> valueQuantity
                (k for k in parent if k.startswith(split[1]) and k[len(split[1]):][:1].isupper()), None)
            if key is not None:
                value = parent[key]
                out.extend([(value, i) for i in range(len(value))] if isinstance(value, list) else [(parent, key)])
        return out
    targets = [t for t in _eval(resource, path) if isinstance(t, (dict, list))]
    found: list[tuple[Any, Any]] = []

    def walk(node: object) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if any(child is t for t in targets):
                found.append((node, key))
            walk(child)

    walk(resource)
    return found


def _list_at(resource: dict[str, Any], path: str) -> list[Any]:
    split = _split_last(path)
    if split is None:
        raise _bad("insert and move need a path ending in a repeating element", 400)
    parents = [p for p in _eval(resource, split[0]) if isinstance(p, dict)]
    if len(parents) != 1:
        raise _bad("The path must identify exactly one element")
    value = parents[0].setdefault(split[1], [])
    if not isinstance(value, list):
        raise _bad("insert and move apply to repeating elements only")
    return value


def _index(value: object, upper: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= upper:
        raise _bad(f"{what} must be an integer from 0 to {upper}")
    return value


def _prune(node: object) -> Any:
    """Drop empty arrays and objects left behind by deletes (FHIR JSON allows neither)."""
    if isinstance(node, dict):
        return {k: p for k, v in node.items() if (p := _prune(v)) not in ([], {}) and p is not None}
    if isinstance(node, list):
        return [p for v in node if (p := _prune(v)) not in ([], {}) and p is not None]
    return node


def apply_fhirpath_patch(resource: dict[str, Any], params: dict[str, Any], profiles_dir: Path) -> dict[str, Any]:
    if params.get("resourceType") != "Parameters" or not isinstance(params.get("parameter"), list):
        raise _bad("A FHIRPath Patch is a Parameters resource of 'operation' parameters", 400)
    if len(params["parameter"]) > MAX_OPERATIONS:
        raise _too_costly(f"A patch may have at most {MAX_OPERATIONS} operations")
    doc = copy.deepcopy(resource)
    rtype = doc["resourceType"]
    for op in params["parameter"]:
        if not isinstance(op, dict) or op.get("name") != "operation":
            raise _bad("Each parameter of a FHIRPath Patch is an 'operation'", 400)
        p = _parts(op)
        kind, path = p.get("type"), p.get("path")
        if kind not in _TYPES or not isinstance(path, str) or not path:
            raise _bad(f"An operation needs a type ({', '.join(_TYPES)}) and a path", 400)
        if kind == "add":
            name, value = p.get("name"), p.get("value")
            if not isinstance(name, str) or value is None:
                raise _bad("add needs a name and a value", 400)
            parents = [x for x in _eval(doc, path) if isinstance(x, dict)]
            if len(parents) != 1:
                raise _bad("add: the path must identify exactly one element")
            if _repeats(_schema(str(profiles_dir)), rtype, path, name):
                parents[0].setdefault(name, []).append(value)
            elif name in parents[0]:
                raise _bad(f"add: '{name}' already has a value (use replace)")
            else:
                parents[0][name] = value
        elif kind == "insert":
            target = _list_at(doc, path)
            target.insert(_index(p.get("index"), len(target), "index"), p.get("value"))
        elif kind == "move":
            target = _list_at(doc, path)
            item = target.pop(_index(p.get("source"), len(target) - 1, "source"))
            target.insert(_index(p.get("destination"), len(target), "destination"), item)
        else:
            where = _locate(doc, path)
            if len(where) > 1:
                raise _bad(f"{kind}: the path matches more than one element")
            if kind == "delete":
                for container, key in where:  # nothing matched: nothing to delete
                    del container[key]
            elif not where:
                raise _bad("replace: the path matches no element")
            elif p.get("value") is None:
                raise _bad("replace needs a value", 400)
            else:
                container, key = where[0]
                container[key] = p["value"]
    result = _prune(doc)
    assert isinstance(result, dict)
    return result
