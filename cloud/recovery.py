"""Account recovery: the one-time code an operator issues, and its use by ``POST /v1/recover``.

``bridgectl accounts recovery-code HANDLE`` stands in for the e-mail a real service sends:
``new_code`` makes a code, ``hash_password`` (``cloud.passwords``, the accounts' own salted
hash) is what the store keeps. A use of the code (``Recovery.recover``)::

    weak password?            400 weak_password (the API checks it with the body: no budget
                              is spent, nothing is read)
    address budget spent?     429 rate_limited (recovery budgets: per account and per client
                              address, apart from the logins', cloud/ratelimit.py)
    account + code row        one read
    account budget spent?     429 rate_limited
    verify the code           against the stored hash, or a dummy of the same cost (unknown
                              handle, no code): the time says nothing about which
    wrong / expired / used    401 bad_recovery_code / code_expired / code_used, audited
                              (recovery_refused); only the budgets and the audit row change
    right                     one transaction: the code used, the new password hash set, the
                              credential queued for the legacy login server (a linked
                              account), audited (account_recovered); the budgets given back

Only a right code says whether it expired or was used, so an unknown handle and a wrong
code get the same answer. Times are the injected clock's, never the database's.
"""

from __future__ import annotations

import functools
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from cloud.db import TransactionRunner
from cloud.passwords import hash_password, verify_password
from cloud.ratelimit import LoginLimiter, LoginLimits, retry_after_header
from cloud.store import login_limits
from cloud.store import recovery as store

RECOVERIES = Counter("cloud_api_recoveries_total",
                     "Account recoveries (POST /v1/recover), by result.", ["result"])

#: Passwords shorter than this are weak.
MIN_PASSWORD_CHARS = 8
#: A code: CODE_GROUPS groups of CODE_GROUP_CHARS characters of CODE_ALPHABET (no 0/O, 1/I/L),
#: about 60 bits; read case- and hyphen-insensitively.
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_GROUPS, CODE_GROUP_CHARS = 3, 4
MAX_CODE_CHARS = 64
#: Default and bounds of a code's lifetime (seconds).
DEFAULT_TTL_S = 3600
MAX_TTL_S = 7 * 24 * 3600
#: Failed recoveries allowed: fewer than logins, a code is shorter than a password.
RECOVERY_LIMITS = LoginLimits(per_account=5, per_address=20)


class RecoveryRefused(Exception):
    """A refused recovery: the HTTP status, code and message the API answers with."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def weak_password_reason(handle: str, password: str) -> str | None:
    """Why *password* is too weak for *handle*'s account, or None: under
    ``MIN_PASSWORD_CHARS`` characters, the handle itself, or one character repeated."""
    if len(password) < MIN_PASSWORD_CHARS:
        return f"new_password must be at least {MIN_PASSWORD_CHARS} characters"
    if password.casefold() == handle.casefold():
        return "new_password must not be the handle"
    if len(set(password)) == 1:
        return "new_password must not be one character repeated"
    return None


def new_code() -> str:
    """A fresh random code, e.g. ``K7QM-3XWD-PN8A`` (``secrets``: unpredictable)."""
    chars = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_GROUPS * CODE_GROUP_CHARS))
    return "-".join(chars[i:i + CODE_GROUP_CHARS]
                    for i in range(0, len(chars), CODE_GROUP_CHARS))


def normalize_code(code: str) -> str:
    """The code as it is hashed: upper case, without hyphens and spaces."""
    return "".join(c for c in code.upper() if c not in "- ")


def hash_code(code: str, iterations: int | None = None) -> str:
    """The stored form of *code* (the accounts' password hash, salted)."""
    if iterations is None:
        return hash_password(normalize_code(code))
    return hash_password(normalize_code(code), iterations=iterations)


@functools.cache
def _dummy_hash() -> str:
    """Checked when there is no code to check, so the answer takes as long."""
    return hash_password(uuid.uuid4().hex)


class Recovery:
    """``POST /v1/recover``'s logic, behind the API's body checks."""

    def __init__(self, db: TransactionRunner, clock: IReactorTime,
                 password_check: Callable[[str, str], defer.Deferred],
                 password_hash: Callable[[str], defer.Deferred] | None = None,
                 limits: LoginLimits | None = None) -> None:
        self._db, self._clock = db, clock
        self._check = password_check
        #: hashing is slow on purpose: the composition root passes a thread-pool one
        self._hash = password_hash or (lambda password: defer.succeed(hash_password(password)))
        self.limiter = LoginLimiter(db, clock, limits or RECOVERY_LIMITS,
                                    login_limits.RECOVERY_SCOPES)

    async def recover(self, handle: str, code: str, new_password: str,
                      address: str, now_ms: int) -> dict[str, Any]:
        """Set *handle*'s password if *code* is its live code; the JSON answer, or
        ``RecoveryRefused``."""
        reason = weak_password_reason(handle, new_password)
        if reason is not None:
            RECOVERIES.labels("weak_password").inc()
            raise RecoveryRefused(400, "weak_password", reason)
        self._refuse_if_limited(await self.limiter.address_wait_s(address))
        row = await self._db.run("recovery_code_for_handle", store.code_for_handle, handle)
        key = f"account:{row.account_id}" if row is not None else f"name:{handle}"
        self._refuse_if_limited(await self.limiter.attempt(key, address))
        stored = row.code_hash if row is not None and row.code_hash else None
        right = await self._check(normalize_code(code), stored or _dummy_hash())
        result = ("bad_recovery_code" if stored is None or not right
                  else "code_used" if row.used_ms is not None
                  else "code_expired" if row.expires_ms <= now_ms else "ok")
        if result == "ok":
            new_hash = await self._hash(new_password)
            if not await self._db.run("redeem_recovery_code", store.redeem, row.account_id,
                                      stored, new_hash, now_ms, address):
                result = "code_used"  # a concurrent use (or a new code) won the race
        if result != "ok":
            await self._db.run("audit_recovery", store.audit_attempt,
                               row.account_id if row is not None else None, handle, result,
                               now_ms, address)
            RECOVERIES.labels(result).inc()
            raise RecoveryRefused(401, result, _MESSAGES[result])
        await self.limiter.succeeded(key, address)
        RECOVERIES.labels("ok").inc()
        return {"account_id": str(row.account_id), "handle": row.handle, "recovered": True,
                "legacy": "queued" if row.legacy_handle is not None else "not_linked"}

    @staticmethod
    def _refuse_if_limited(wait_s: float) -> None:
        if wait_s > 0:
            RECOVERIES.labels("rate_limited").inc()
            retry = retry_after_header(wait_s)
            raise RecoveryRefused(
                429, "rate_limited", f"too many failed recoveries for this account or "
                                     f"address; retry in {retry} s", {"Retry-After": retry})


_MESSAGES = {
    "bad_recovery_code": "unknown handle or wrong recovery code",
    "code_used": "this recovery code was used already; ask for a new one",
    "code_expired": "this recovery code has expired; ask for a new one",
}


def verify_code(code: str, encoded: str | None) -> bool:
    """True if *code* is the one *encoded* was made from (any case, with or without
    hyphens)."""
    return verify_password(normalize_code(code), encoded)
