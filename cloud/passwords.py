"""Password hashes: salted PBKDF2-SHA256 in the portable form ``pbkdf2_sha256$iter$salt$hash``.

The format is the one the legacy login server writes (salt and hash in standard base64), so
a hash the bridge imports from a legacy account verifies here unchanged. It is implemented
again here on purpose: ``cloud`` never imports ``legacy``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re

ALGORITHM = "pbkdf2_sha256"
#: Default PBKDF2 cost for real accounts; tests pass a cheaper one explicitly.
DEFAULT_ITERATIONS = 200_000
#: A stored hash outside 1..MAX_ITERATIONS never matches (a corrupt row must not cost minutes).
MAX_ITERATIONS = 10_000_000
SALT_BYTES = 16

_DIGITS = re.compile(r"[0-9]{1,8}")
_HASH_BYTES = hashlib.sha256().digest_size


def _derive(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = DEFAULT_ITERATIONS) -> str:
    """A fresh salted hash of *password* (a random 16-byte salt unless one is given)."""
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be within 1..{MAX_ITERATIONS}")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if not salt:
        raise ValueError("the salt must not be empty")
    try:
        dk = _derive(password, salt, iterations)
    except UnicodeEncodeError as e:
        raise ValueError("the password is not valid Unicode text") from e
    b64 = base64.b64encode
    return f"{ALGORITHM}${iterations}${b64(salt).decode()}${b64(dk).decode()}"


def verify_password(password: str, encoded: str | None) -> bool:
    """True if *password* matches *encoded*; a missing or malformed hash never matches."""
    if not isinstance(password, str) or not isinstance(encoded, str):
        return False
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != ALGORITHM or not _DIGITS.fullmatch(parts[1]):
        return False
    iterations = int(parts[1])
    if not 1 <= iterations <= MAX_ITERATIONS:
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        expected = base64.b64decode(parts[3], validate=True)
        dk = _derive(password, salt, iterations)
    except (binascii.Error, ValueError):  # bad base64, or a password with lone surrogates
        return False
    return len(expected) == _HASH_BYTES and hmac.compare_digest(dk, expected)
