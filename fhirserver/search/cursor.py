"""Keyset paging cursors: a cursor holds the sort values and pk of the last (or first) row of a
page, so inserts between page fetches neither duplicate nor skip rows. Opaque to clients."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from ..fhir.errors import FhirError
from .model import Cursor


def encode_cursor(forward: bool, values: Sequence[Any], pk: int) -> str:
    raw = json.dumps(["n" if forward else "p", list(values), pk], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        direction, values, pk = json.loads(base64.urlsafe_b64decode(text.encode() + b"==="))
        if direction not in ("n", "p") or not isinstance(values, list) or not isinstance(pk, int) \
                or isinstance(pk, bool) or abs(pk) > 2**62:
            raise ValueError
        return Cursor(direction == "n", values, pk)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise FhirError(400, "invalid", "Invalid paging cursor", ["_cursor"]) from None
