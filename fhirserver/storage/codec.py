"""JSON in and out without losing the client's decimal precision.

Floats are parsed as Decimal (so `1.0` and `1.50` keep their digits) and written back verbatim
through orjson Fragments.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson


class DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _v in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKeyError(f"duplicate property '{dup[:64]}'")
    return out


def parse_json(data: bytes | str) -> Any:
    """Parse JSON keeping decimals exact; a repeated property name is an error (FHIR forbids it)."""
    return json.loads(data, parse_float=Decimal, object_pairs_hook=_no_duplicates)


def _default(obj: object) -> orjson.Fragment:
    if isinstance(obj, Decimal):
        return orjson.Fragment(str(obj))
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def dump_json(obj: object) -> bytes:
    return orjson.dumps(obj, default=_default)


def fragment(raw: bytes) -> orjson.Fragment:
    """Embed already-serialized JSON (a stored resource) in a larger document."""
    return orjson.Fragment(raw)
