"""Keyed blind indexes: HMAC-SHA-256 of normalized values, so identifying values can be matched
for equality (and on normalized prefixes) without being stored.

The HMAC key is a data key (scope `blind-index`), so it rotates with the master key like any
other and never needs re-indexing.
"""

from __future__ import annotations

import base64
import hmac
import unicodedata
from hashlib import sha256

from .datakeys import DataKeyStore

BLIND_SCOPE = "blind-index"
MAX_PREFIX = 12  # starts-with search is supported for prefixes up to this many characters


def normalize(text: str) -> str:
    """Case- and accent-insensitive form used by FHIR string search."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())


class BlindIndexer:
    def __init__(self, keys: DataKeyStore) -> None:
        self._keys = keys
        self._key: bytes | None = None

    def _hmac_key(self) -> bytes:
        if self._key is None:
            self._key = self._keys.ensure(BLIND_SCOPE)[1]
        return self._key

    def digest(self, param: str, kind: str, value: str) -> str:
        mac = hmac.new(self._hmac_key(), f"{param}\x00{kind}\x00{value}".encode(), sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()
