"""JSON in and out without losing the client's decimal precision.

Floats are parsed as Decimal (so `1.0` and `1.50` keep their digits) and written back verbatim
through orjson Fragments.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson


def parse_json(data: bytes | str) -> Any:
    return json.loads(data, parse_float=Decimal)


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(str(obj))
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def dump_json(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_default)


def fragment(raw: bytes) -> orjson.Fragment:
    """Embed already-serialized JSON (a stored resource) in a larger document."""
    return orjson.Fragment(raw)
