"""Server secrets that live in the data directory: the OpenID Connect signing key and the secret
that signs browser sessions at the authorization endpoint.

Each is generated at first start (never shipped in the repository), written with mode 0600 and
created with O_EXCL so several worker processes starting together agree on one value.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from joserfc.jwk import RSAKey

SIGNING_KEY_FILE = "oidc-signing-key.json"
SESSION_SECRET_FILE = "session-secret"


def _load_or_create(path: Path, generate: Callable[[], str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            text = path.read_text()
            if text:
                return text
            import time

            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty") from None
    value = generate()
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value


def signing_key(data_dir: Path) -> RSAKey:
    """The RS256 key that signs id_tokens (its public half is served at /auth/jwks)."""
    import json

    def generate() -> str:
        key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, private=True)
        key.ensure_kid()
        return json.dumps(key.as_dict(private=True))

    data = json.loads(_load_or_create(data_dir / SIGNING_KEY_FILE, generate))
    return RSAKey.import_key(data)


def session_secret(data_dir: Path, configured: str = "") -> str:
    """The configured secret (setting session_secret) or one generated into the data dir."""
    if configured:
        return configured
    return _load_or_create(data_dir / SESSION_SECRET_FILE, lambda: secrets.token_urlsafe(48))
