"""Server secrets that live in the data directory: the OpenID Connect signing key and the secret
that signs browser sessions at the authorization endpoint.

Each is generated at first start (never shipped in the repository), written with mode 0600 and
published with a hard link, so several worker processes starting together agree on one value.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from joserfc.jwk import RSAKey

SIGNING_KEY_FILE = "oidc-signing-key.json"
SESSION_SECRET_FILE = "session-secret"


def _load_or_create(path: Path, generate: Callable[[], str]) -> str:
    """The file's value; on first start a new one, published atomically: written whole to a private
    temporary file, then hard-linked into place, which fails if another process got there first
    (then its value is the one). Readers never see a half-written file, however long generating
    takes (an RSA key on a loaded machine took over the second the old wait allowed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return _read(path)
    value = generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read(path)
        return value
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> str:
    text = path.read_text()
    if not text:  # only a crash of a version that wrote in place could leave it so
        raise RuntimeError(f"{path} is empty: remove it (a new one is made at the next start)")
    return text


def signing_key(data_dir: Path) -> RSAKey:
    """The RS256 key that signs id_tokens (its public half is served at /auth/jwks)."""
    import json

    def generate() -> str:
        key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, private=True)
        key.ensure_kid()
        return json.dumps(key.as_dict(private=True))

    return _imported(_load_or_create(data_dir / SIGNING_KEY_FILE, generate))


# Keyed by the key file's text, read anew at every call, so a replaced key file is the key from
# then on: importing an RSA private key checks it (~40 ms of CPU), and /auth/jwks, the OpenID
# provider and the subscription signer each ask for it.
@functools.lru_cache(maxsize=16)
def _imported(text: str) -> RSAKey:
    import json

    return RSAKey.import_key(json.loads(text))


def session_secret(data_dir: Path, configured: str = "") -> str:
    """The configured secret (setting session_secret) or one generated into the data dir."""
    if configured:
        return configured
    return _load_or_create(data_dir / SESSION_SECRET_FILE, lambda: secrets.token_urlsafe(48))
