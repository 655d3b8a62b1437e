"""Signed checkpoints of the audit log's Merkle tree (docs/audit.md).

A checkpoint says "the log had `tree_size` records and root hash `root` at `time_us`", signed
with an Ed25519 key kept in a file (never in the database). Each one is stored in the database,
appended as a JSON line to a file outside it and written to the server log, so that removing the
newest records -- or rolling the whole database back to a backup -- leaves a signed statement
somewhere the attacker did not reach that no longer matches.

The signed message (what an independent verifier checks):

    fhirserver-audit-checkpoint/v1\\n<tree_size>\\n<root hex>\\n<time_us>\\n
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger("fhirserver.audit")
MESSAGE_PREFIX = "fhirserver-audit-checkpoint/v1"


class SigningKeyError(Exception):
    """The checkpoint signing key is missing or unreadable."""


def message(tree_size: int, root: str, time_us: int) -> bytes:
    return f"{MESSAGE_PREFIX}\n{tree_size}\n{root}\n{time_us}\n".encode()


def public_key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    root: str
    time_us: int
    key_id: str
    signature: str  # base64

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class Signer:
    """The Ed25519 key pair; created (0600) on first use when `may_create`."""

    def __init__(self, path: Path, may_create: bool = True) -> None:
        self.path = path
        if not path.exists():
            if not may_create:
                raise SigningKeyError(f"audit signing key {path} is missing")
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise SigningKeyError(f"audit signing key {path} cannot be read: {exc}") from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise SigningKeyError(f"audit signing key {path} is not an Ed25519 key")
        self._key = loaded
        self.public = loaded.public_key()
        self.key_id = public_key_id(self.public)

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, tree_size: int, root: str, time_us: int) -> Checkpoint:
        sig = self._key.sign(message(tree_size, root, time_us))
        return Checkpoint(tree_size, root, time_us, self.key_id, base64.b64encode(sig).decode())

    def verifies(self, cp: Checkpoint) -> bool:
        try:
            self.public.verify(base64.b64decode(cp.signature), message(cp.tree_size, cp.root, cp.time_us))
        except (InvalidSignature, ValueError):
            return False
        return cp.key_id == self.key_id


def publish(cp: Checkpoint, path: Path) -> None:
    """Append to the checkpoint file (fsynced) and write to the log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(cp.line() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.info("audit checkpoint %s", cp.line())


def read_file(path: Path) -> tuple[list[Checkpoint], int]:
    """Checkpoints in the file, and the number of lines that are not checkpoints."""
    if not path.exists():
        return [], 0
    found, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            found.append(Checkpoint(int(d["tree_size"]), str(d["root"]), int(d["time_us"]), str(d["key_id"]),
                                    str(d["signature"])))
        except (ValueError, KeyError, TypeError):
            bad += 1
    return found, bad
