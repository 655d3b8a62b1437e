"""Master keys: the root of the envelope scheme. They never touch the database.

Sources, in order:
- FHIRSERVER_MASTER_KEY: comma-separated base64 32-byte keys; the first is active, the others
  are kept only to unwrap data keys during a rotation.
- otherwise the key ring file: `master_key_file` (FHIRSERVER_MASTER_KEY_FILE), by default
  `<data_dir>/master-keys.json` (mode 0600), generated on the first start of an empty database.
  Keep it outside the data directory in production: a copy of the data directory with the key
  beside it is a copy of the plaintext.

A key id (kid) is the first 16 hex chars of SHA-256 over the key: stable, and reveals nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .cipher import open_sealed, seal

KEY_FILE_NAME = "master-keys.json"


class KeyError_(Exception):
    """A required master key is missing or malformed (fail closed: nothing is served)."""


def key_id(raw: bytes) -> str:
    return hashlib.sha256(b"fhirserver-master-kid" + raw).hexdigest()[:16]


def decode_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise KeyError_("master key is not valid base64") from exc
    if len(raw) != 32:
        raise KeyError_("master key must be 32 bytes (base64 of 32 random bytes)")
    return raw


class MasterKeyRing:
    def __init__(self, env_value: str, data_dir: Path, may_create: bool = True, key_file: Path | None = None) -> None:
        """`may_create=False`: the database already holds wrapped data keys, so a missing key
        file is an error (restore it), never a reason to generate a new, useless ring."""
        self._env_value = env_value
        self._may_create = may_create
        self._file = key_file or Path(data_dir) / KEY_FILE_NAME
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._keys: dict[str, AESGCM] = {}
        self._active: str = ""
        self._load()

    @property
    def key_file(self) -> Path | None:
        """The key ring file, None when the keys come from FHIRSERVER_MASTER_KEY."""
        return None if self._env_value else self._file

    @property
    def file_backed(self) -> bool:
        return not self._env_value

    @property
    def active_kid(self) -> str:
        self._maybe_reload()
        return self._active

    def _load(self) -> None:
        if self._env_value:
            raws = [decode_key(part) for part in self._env_value.split(",") if part.strip()]
            if not raws:
                raise KeyError_("FHIRSERVER_MASTER_KEY is empty")
            self._keys = {key_id(r): AESGCM(r) for r in raws}
            self._active = key_id(raws[0])
            return
        if not self._file.exists():
            if not self._may_create:
                raise KeyError_(f"the key file {self._file} is missing but the database holds data keys wrapped by "
                                "a master key; no new key was generated")
            self._file.parent.mkdir(parents=True, exist_ok=True)
            raw = os.urandom(32)
            self._write({"active": key_id(raw), "keys": {key_id(raw): base64.b64encode(raw).decode()}})
        self._read_file()

    def _read_file(self) -> None:
        doc = json.loads(self._file.read_text())
        keys = {}
        for kid, text in doc["keys"].items():
            raw = decode_key(text)
            if key_id(raw) != kid:
                raise KeyError_(f"master key file entry {kid} does not match its key")
            keys[kid] = AESGCM(raw)
        if doc["active"] not in keys:
            raise KeyError_("active master key missing from key file")
        self._keys, self._active = keys, doc["active"]
        self._mtime = self._file.stat().st_mtime

    def _write(self, doc: dict[str, object]) -> None:
        tmp = self._file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self._file)

    def _maybe_reload(self) -> None:
        if self._env_value:
            return
        try:
            mtime = self._file.stat().st_mtime
        except FileNotFoundError as exc:
            raise KeyError_("master key file has disappeared") from exc
        if mtime != self._mtime:
            with self._lock:
                self._read_file()

    def get(self, kid: str) -> AESGCM:
        if kid not in self._keys:
            self._maybe_reload()
        try:
            return self._keys[kid]
        except KeyError as exc:
            raise KeyError_(f"master key {kid} is not available") from exc

    def wrap(self, data_key: bytes, aad: bytes) -> tuple[str, bytes]:
        kid = self.active_kid
        return kid, seal(self._keys[kid], data_key, aad)

    def unwrap(self, kid: str, wrapped: bytes, aad: bytes) -> bytes:
        return open_sealed(self.get(kid), wrapped, aad)

    def add_new_active_key(self, raw: bytes | None = None) -> str:
        """File-backed rings only: generate (or take) a key, make it active, keep the old ones."""
        if self._env_value:
            raise KeyError_("the key ring comes from FHIRSERVER_MASTER_KEY; rotate by changing it")
        raw = raw or os.urandom(32)
        with self._lock:
            doc = json.loads(self._file.read_text())
            kid = key_id(raw)
            doc["keys"][kid] = base64.b64encode(raw).decode()
            doc["active"] = kid
            self._write(doc)
            self._read_file()
        return kid

    def retire(self, kids: list[str]) -> None:
        """Remove no-longer-used keys from a file-backed ring."""
        if self._env_value or not kids:
            return
        with self._lock:
            doc = json.loads(self._file.read_text())
            for kid in kids:
                if kid != doc["active"]:
                    doc["keys"].pop(kid, None)
            self._write(doc)
            self._read_file()
