"""Client-side helpers for SMART Backend Services: key generation and signed client assertions.

Used by the CLI (`fhirserver client keygen`, `fhirserver client token`), the demo and the tests;
all JOSE work is done by joserfc.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey


def generate_key(alg: str = "ES384", kid: str | None = None) -> ECKey | RSAKey:
    kid = kid or uuid.uuid4().hex[:16]
    if alg == "ES384":
        return ECKey.generate_key("P-384", parameters={"kid": kid, "alg": "ES384", "use": "sig"})
    if alg == "RS384":
        return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS384", "use": "sig"})
    raise ValueError("alg must be ES384 or RS384")


def public_jwks(key: ECKey | RSAKey) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False)]}


def save_private_key(key: ECKey | RSAKey, path: Path) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file already existed with wider permissions
    with os.fdopen(fd, "w") as fh:
        json.dump(key.as_dict(private=True), fh)


def load_private_key(path: Path) -> ECKey | RSAKey:
    data = json.loads(Path(path).read_text())
    return ECKey.import_key(data) if data.get("kty") == "EC" else RSAKey.import_key(data)


def client_assertion(key: ECKey | RSAKey, client_id: str, token_url: str, lifetime_s: int = 240,
                     **overrides: object) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + lifetime_s,
              "iat": now, "jti": uuid.uuid4().hex}
    claims.update(overrides)
    alg = str(key.as_dict().get("alg") or ("ES384" if key.key_type == "EC" else "RS384"))
    header = {"alg": alg, "kid": key.kid, "typ": "JWT"}
    return jwt.encode(header, claims, key, algorithms=[alg])


def token_request_form(key: ECKey | RSAKey, client_id: str, token_url: str, scope: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion(key, client_id, token_url),
    }
