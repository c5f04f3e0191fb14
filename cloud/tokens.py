"""Bearer tokens for the cloud API: signed, expiring, stateless.

A token is the url-safe base64 (no padding) of::

    version (1 byte) | account id (16 bytes) | expiry ms (8 bytes, big endian) | HMAC (32 bytes)

The HMAC-SHA256 under the API's secret covers a fixed domain label and the first 25 bytes,
so a token can not be forged, extended or moved to another account without the secret. The
server keeps no token state; revoking one means removing the account (which the API checks on
every request) or rotating the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
import uuid

VERSION = 1
#: Shortest secret accepted: HMAC keys shorter than this are guessable.
MIN_SECRET_BYTES = 16

_DOMAIN = b"cloud-api-token\x00"
_PAYLOAD = struct.Struct(">B16sQ")
_MAC_BYTES = hashlib.sha256().digest_size
_TOKEN_BYTES = _PAYLOAD.size + _MAC_BYTES
_TOKEN_CHARS = (_TOKEN_BYTES * 8 + 5) // 6
_TOKEN_RE = re.compile(rf"[A-Za-z0-9_-]{{{_TOKEN_CHARS}}}")
_U64_MAX = (1 << 64) - 1


class TokenError(Exception):
    """A token that does not authenticate anyone; ``reason`` says why (never secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_secret(secret: bytes) -> bytes:
    """*secret* if it can sign tokens, else ValueError (so a bad config fails at start)."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, _DOMAIN + payload, hashlib.sha256).digest()


def issue(secret: bytes, account_id: uuid.UUID, now_ms: int, ttl_ms: int) -> str:
    """A token for *account_id* that expires *ttl_ms* after *now_ms*."""
    check_secret(secret)
    if ttl_ms <= 0:
        raise ValueError("ttl_ms must be positive")
    expires_ms = now_ms + ttl_ms
    if not 0 <= expires_ms <= _U64_MAX:
        raise ValueError("the expiry does not fit in 64 bits")
    payload = _PAYLOAD.pack(VERSION, account_id.bytes, expires_ms)
    return base64.urlsafe_b64encode(payload + _mac(secret, payload)).rstrip(b"=").decode()


def _decode(token: str) -> bytes:
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise TokenError("malformed")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    # Only the canonical spelling is accepted: no second encoding of the same bytes.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != token:
        raise TokenError("malformed")
    return raw


def verify(secret: bytes, token: str, now_ms: int) -> uuid.UUID:
    """The account a token authenticates at *now_ms*, or TokenError.

    The reason is ``malformed``, ``bad signature`` or ``expired``, checked in that order:
    the expiry of a token with a bad signature is not worth reporting.
    """
    return verify_with_expiry(secret, token, now_ms)[0]


def verify_with_expiry(secret: bytes, token: str, now_ms: int) -> tuple[uuid.UUID, int]:
    """``verify``, and the token's expiry in ms (for a cache of verified tokens)."""
    check_secret(secret)
    raw = _decode(token)
    payload, mac = raw[:_PAYLOAD.size], raw[_PAYLOAD.size:]
    version, account, expiry = _PAYLOAD.unpack(payload)
    if version != VERSION:
        raise TokenError("malformed")
    if not hmac.compare_digest(_mac(secret, payload), mac):
        raise TokenError("bad signature")
    if now_ms >= expiry:
        raise TokenError("expired")
    return uuid.UUID(bytes=account), expiry
