"""TOTP second factor (RFC 6238, via pyotp): 6 digits, 30-second steps, one step of clock drift
either way, and every step usable only once per account (a code seen by a shoulder-surfer or a
phishing proxy cannot be replayed within its window).

The shared secret is stored sealed with AES-256-GCM under the `users` data key; the associated
data binds it to the username, so a secret copied onto another account's row fails to open.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import pyotp
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection

from ..crypto.cipher import open_sealed, seal
from ..crypto.datakeys import DataKeyStore

KEY_SCOPE = "users"
STEP_SECONDS = 30
DRIFT_STEPS = 1
DIGITS = 6
DEFAULT_ISSUER = "fhirserver"


def _aad(username: str) -> bytes:
    return b"fhirserver-totp:" + username.encode()


def new_secret() -> str:
    """A fresh random base32 secret (160 bits, the RFC 4226 recommendation)."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, username: str, issuer: str = DEFAULT_ISSUER) -> str:
    """The otpauth:// URI an authenticator app imports (usually shown as a QR code)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(name=username,
                                                                                     issuer_name=issuer)


def seal_secret(keys: DataKeyStore, username: str, secret: str) -> tuple[int, bytes]:
    """Encrypt a secret for storage: (data key id, nonce || ciphertext).

    Call outside a write transaction: the `users` data key may have to be created."""
    key_id, raw = keys.ensure(KEY_SCOPE)
    return key_id, seal(AESGCM(raw), secret.encode(), _aad(username))


def open_secret(keys: DataKeyStore, key_id: int, blob: bytes, username: str, conn: Connection | None = None) -> str:
    """Decrypt a stored secret; raises DecryptionError if it was altered or moved to another user."""
    return open_sealed(AESGCM(keys.by_id(key_id, conn)), blob, _aad(username)).decode()


@dataclass(frozen=True)
class TotpCheck:
    step: int | None  # the accepted time step, None when refused
    replayed: bool = False


def check_code(secret: str, code: str, now_s: float, last_step: int | None) -> TotpCheck:
    """Accept a code of the current step or one step either side, unless that step (or a later
    one) was already used: a code is single-use, and an older code cannot follow a newer one."""
    code = code.replace(" ", "").strip()
    if len(code) != DIGITS or not code.isdigit():
        return TotpCheck(None)
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = int(now_s) // STEP_SECONDS
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            if last_step is not None and step <= last_step:
                return TotpCheck(None, replayed=True)
            return TotpCheck(step)
    return TotpCheck(None)
