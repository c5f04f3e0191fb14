"""Secrets on the legacy side: password hashes, login credentials, peer challenge-response."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

import attrs

#: Default PBKDF2 cost for real accounts; the simulation passes a cheaper one explicitly.
DEFAULT_ITERATIONS = 200_000


@attrs.frozen
class Secrets:
    """The two shared secrets of a legacy deployment (from the state directory)."""

    peer_secret: bytes
    login_secret: bytes


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = DEFAULT_ITERATIONS) -> str:
    """Salted PBKDF2-SHA256 in the portable form ``pbkdf2_sha256$iter$salt$hash``."""
    salt = os.urandom(16) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"pbkdf2_sha256${iterations}${b64(salt).decode()}${b64(dk).decode()}"


_HASH_FORM = re.compile(r"pbkdf2_sha256\$[1-9][0-9]{0,7}\$[A-Za-z0-9+/]+={0,2}\$"
                        r"[A-Za-z0-9+/]{43}=")


def is_password_hash(encoded: str) -> bool:
    """True if *encoded* has the form ``hash_password`` writes (the salt and a SHA-256 hash
    in base64), so a login can check against it."""
    if not _HASH_FORM.fullmatch(encoded):
        return False
    try:
        base64.b64decode(encoded.split("$")[2], validate=True)
    except ValueError:
        return False
    return 1 <= int(encoded.split("$")[1]) <= 10_000_000


def verify_password(password: str, encoded: str) -> bool:
    """True if *password* matches *encoded*; malformed hashes never match."""
    try:
        algo, iters, salt_b64, hash_b64 = encoded.split("$")
        if algo != "pbkdf2_sha256":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(hash_b64, validate=True)
        iterations = int(iters)
    except ValueError:
        return False
    if not 1 <= iterations <= 10_000_000:
        return False
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return hmac.compare_digest(dk, expected)


def sign_credential(secret: bytes, handle: str, expires_ms: int) -> bytes:
    """The login server's signature over (handle, expiry); supernodes verify it."""
    return hmac.new(secret, f"cred|{handle}|{expires_ms}".encode(), hashlib.sha256).digest()


def check_credential(secret: bytes, handle: str, expires_ms: int, signature: bytes,
                     now_ms: int) -> str | None:
    """None if the credential is valid now, else the reason it is not."""
    if not hmac.compare_digest(sign_credential(secret, handle, expires_ms), signature):
        return "bad signature"
    if expires_ms <= now_ms:
        return "credential expired"
    return None


def peer_proof(secret: bytes, nonce: bytes, role: str, name: str) -> bytes:
    """Challenge-response proof that a peer holds the shared secret."""
    return hmac.new(secret, b"peer|" + nonce + f"|{role}|{name}".encode(),
                    hashlib.sha256).digest()


def check_peer_proof(secret: bytes, nonce: bytes, role: str, name: str, proof: bytes) -> bool:
    return hmac.compare_digest(peer_proof(secret, nonce, role, name), proof)
