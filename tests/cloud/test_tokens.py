"""Credentials of the cloud API: bearer tokens and password hashes."""

from __future__ import annotations

import base64
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud import passwords, tokens
from legacy import auth as legacy_auth

SECRET = b"s" * 32
NOW = 1_700_000_000_000
ACCOUNT = uuid.UUID("12345678-1234-5678-1234-567812345678")


# ---------------------------------------------------------------- tokens

def test_a_token_names_its_account_until_it_expires():
    """verify returns the issued account id before the expiry and 'expired' from then on."""
    token = tokens.issue(SECRET, ACCOUNT, NOW, 60_000)
    assert tokens.verify(SECRET, token, NOW) == ACCOUNT
    assert tokens.verify(SECRET, token, NOW + 59_999) == ACCOUNT
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(SECRET, token, NOW + 60_000)


def test_a_token_is_url_safe_text():
    """Tokens fit in a header or URL unescaped: url-safe base64, no padding."""
    token = tokens.issue(SECRET, ACCOUNT, NOW, 1)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_a_token_signed_with_another_secret_is_refused():
    """Only the secret that signed a token verifies it (even while it is unexpired)."""
    token = tokens.issue(b"o" * 32, ACCOUNT, NOW, 60_000)
    with pytest.raises(tokens.TokenError, match="bad signature"):
        tokens.verify(SECRET, token, NOW)


@given(st.integers(min_value=0, max_value=56), st.integers(min_value=1, max_value=255))
@settings(max_examples=100)
def test_any_changed_byte_breaks_the_token(position, flip):
    """Changing any byte (account, expiry, version or MAC) makes the token invalid."""
    token = tokens.issue(SECRET, ACCOUNT, NOW, 60_000)
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[position] ^= flip
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(tokens.TokenError) as e:
        tokens.verify(SECRET, forged, NOW)
    assert e.value.reason in ("malformed", "bad signature")


@pytest.mark.parametrize("token", ["", "x", "a" * 75, "a" * 77, "a" * 75 + "=",
                                   "+" * 76, "/" * 76, " " + "a" * 75, "é" * 76])
def test_malformed_tokens_are_refused_as_malformed(token):
    """Wrong length or alphabet is 'malformed', never an exception of another kind."""
    with pytest.raises(tokens.TokenError, match="malformed"):
        tokens.verify(SECRET, token, NOW)


def test_short_secrets_and_bad_ttls_are_refused():
    """A secret under 16 bytes or a non-positive ttl is a configuration error."""
    with pytest.raises(ValueError):
        tokens.issue(b"short", ACCOUNT, NOW, 1)
    with pytest.raises(ValueError):
        tokens.verify(b"short", "a" * 76, NOW)
    with pytest.raises(ValueError):
        tokens.issue(SECRET, ACCOUNT, NOW, 0)


# ---------------------------------------------------------------- passwords

def test_hash_round_trip_and_wrong_password():
    """A hash verifies its own password only."""
    encoded = passwords.hash_password("correct horse", iterations=10)
    assert encoded.startswith("pbkdf2_sha256$10$")
    assert passwords.verify_password("correct horse", encoded)
    assert not passwords.verify_password("correct hors", encoded)


def test_hashes_are_interchangeable_with_the_legacy_format():
    """A legacy hash verifies on the cloud side and the other way round, salt for salt."""
    salt = b"0123456789abcdef"
    legacy_hash = legacy_auth.hash_password("pw", salt=salt, iterations=50)
    assert passwords.hash_password("pw", salt=salt, iterations=50) == legacy_hash
    assert passwords.verify_password("pw", legacy_hash)
    cloud_hash = passwords.hash_password("pw", iterations=50)
    assert legacy_auth.verify_password("pw", cloud_hash)


@pytest.mark.parametrize("encoded", [
    None, "", "pbkdf2_sha256", "pbkdf2_sha256$10$c2FsdA==", "md5$10$c2FsdA==$aGFzaA==",
    "pbkdf2_sha256$0$c2FsdA==$aGFzaA==", "pbkdf2_sha256$10000001$c2FsdA==$aGFzaA==",
    "pbkdf2_sha256$-5$c2FsdA==$aGFzaA==", "pbkdf2_sha256$ 5$c2FsdA==$aGFzaA==",
    "pbkdf2_sha256$\u0665$c2FsdA==$aGFzaA==", "pbkdf2_sha256$10$!!$aGFzaA==",
    "pbkdf2_sha256$10$c2FsdA==$aGFzaA==",  # a hash of the wrong length
    "pbkdf2_sha256$10$c2FsdA==$aGFzaA==$extra",
])
def test_malformed_hashes_never_match(encoded):
    """Missing, truncated, foreign, out-of-range or undecodable hashes never match."""
    assert passwords.verify_password("pw", encoded) is False


def test_a_password_that_is_not_valid_unicode_never_matches():
    """A lone surrogate (possible in JSON) can not match, and hashing it is a ValueError."""
    encoded = passwords.hash_password("pw", iterations=10)
    assert passwords.verify_password("\ud800", encoded) is False
    with pytest.raises(ValueError):
        passwords.hash_password("\ud800", iterations=10)
    with pytest.raises(ValueError):
        passwords.hash_password("pw", iterations=0)
