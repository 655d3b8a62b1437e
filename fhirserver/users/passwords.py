"""Password hashing (Argon2id) and the strength rule applied whenever a password is set.

Hashing: Argon2id with the RFC 9106 "low memory" profile (64 MiB, 3 passes, 4 lanes, about a
quarter of a second here). It is memory-hard, so a stolen copy of the database is expensive to
attack even on GPUs. Hashes made with older (weaker) parameters are replaced at the next
successful login, when the plain password is at hand (`needs_rehash`).

Passwords are NFKC-normalized before hashing (NIST SP 800-63B 5.1.1.2), so the same password
typed on two keyboards that compose accented letters differently still matches.

Strength: at least 12 and at most 256 characters, and a zxcvbn score of at least 3 ("safely
unguessable: moderate protection from offline slow-hash scenario"). zxcvbn matches against the
most frequent passwords of public breach corpora, common names and English words, keyboard
patterns, dates, sequences, repeats and l33t substitutions, and against the user's own name
(`user_inputs`) — a length-only rule would accept "password1234".
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Iterable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

MIN_LENGTH = 12
MAX_LENGTH = 256  # zxcvbn's matching is super-linear; nobody types more
MIN_SCORE = 3
ZXCVBN_PREFIX = 100  # like zxcvbn-ts: strength of longer passwords is judged on their first 100 characters

HASHER = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)

# Verified against when the username is unknown (see `burn`). Precomputed so that the first unknown
# username a process sees costs one hash like every other; recomputed once if the parameters change.
_DUMMY_HASH = "$argon2id$v=19$m=65536,t=3,p=4$3Y3NNxIjWFo3OazN3XM9gw$e13deTelJiCMLf6tDM3jRVMWPkvAVjbEfZOBbxiVrTY"
_dummy_lock = threading.Lock()
_dummy_hash: str | None = None


class WeakPasswordError(ValueError):
    """The password does not meet the strength rule; the message says why, without echoing it."""


def _normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def check_strength(password: str, user_inputs: Iterable[str] = ()) -> None:
    """Raise WeakPasswordError unless the password is long enough and not easily guessed."""
    from zxcvbn import zxcvbn

    password = _normalize(password)
    if len(password) < MIN_LENGTH:
        raise WeakPasswordError(f"the password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPasswordError(f"the password must have at most {MAX_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in password):
        raise WeakPasswordError("the password must not contain control characters")
    result = zxcvbn(password[:ZXCVBN_PREFIX], user_inputs=[u for u in user_inputs if u])
    if result["score"] < MIN_SCORE:
        feedback = result.get("feedback") or {}
        why = feedback.get("warning") or "it is too easy to guess"
        raise WeakPasswordError(f"the password is too weak: {why.rstrip('.')}")


def hash_password(password: str, hasher: PasswordHasher = HASHER) -> str:
    """Argon2id hash in PHC string form (`$argon2id$v=19$m=...`), salt included."""
    return hasher.hash(_normalize(password))


def verify_password(stored_hash: str, password: str, hasher: PasswordHasher = HASHER) -> bool:
    """True when the password matches; a malformed stored hash never matches."""
    try:
        return hasher.verify(stored_hash, _normalize(password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str, hasher: PasswordHasher = HASHER) -> bool:
    """True when the hash was made with other parameters than the current ones."""
    try:
        return hasher.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return True


def burn(password: str) -> None:
    """Spend the time of one verification without an account, so that probing usernames cannot
    tell unknown ones from known ones by the response time."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = _DUMMY_HASH if not needs_rehash(_DUMMY_HASH) else HASHER.hash("fhirserver: no such user")
    verify_password(_dummy_hash, password)
