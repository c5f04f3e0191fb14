"""Account recovery: one-time recovery codes, and the new credential owed to the legacy stack.

    issue_code         bridgectl: one code per account (a new one replaces the unused old),
                       stored as a salted hash, with an expiry; audited (recovery_code_issued)
    code_for_handle    the API: the account a handle names, its code row (hash, expiry, used)
    redeem             the API, the code was right: in one transaction mark it used (only if
                       it is still the same unused, unexpired code), set the account's new
                       password hash, queue the credential for the legacy login server (a
                       linked account), audit (account_recovered)
    audit_attempt      the API: a refused use (wrong, expired or used code, unknown handle)
    pending_credentials / credential_delivered / credential_failed
                       the bridge's delivery of queued credentials (bridge/credentials.py)

Every time is the caller's clock in milliseconds, never ``now()``. Hashing is the caller's
(``cloud.passwords``, slow on purpose): nothing here hashes or verifies.
"""

from __future__ import annotations

import uuid

import attrs
import psycopg

from cloud.db import one_statement
from cloud.store import audit
from cloud.store.errors import NotFound

#: The API's actor in the audit log.
API_ACTOR = "cloud-api"


@attrs.frozen
class CodeRow:
    """A handle's account and its recovery code as stored (code fields None: none issued)."""

    account_id: uuid.UUID
    handle: str
    legacy_handle: str | None
    code_hash: str | None = None
    issued_ms: int | None = None
    expires_ms: int | None = None
    used_ms: int | None = None


@attrs.frozen
class PendingCredential:
    account_id: uuid.UUID
    legacy_handle: str
    password_hash: str
    changed_ms: int
    attempts: int



def code_for_handle(conn: psycopg.Connection, handle: str) -> CodeRow | None:
    """The account *handle* names and its recovery code, or None for an unknown handle."""
    row = conn.execute(
        "SELECT a.account_id, a.handle, a.legacy_handle, c.code_hash, c.issued_ms, "
        "       c.expires_ms, c.used_ms "
        "FROM account_handles h JOIN accounts a USING (account_id) "
        "LEFT JOIN recovery_codes c ON c.account_id = a.account_id WHERE h.handle = %s",
        (handle,)).fetchone()
    return None if row is None else CodeRow(*row)


def issue_code(conn: psycopg.Connection, handle: str, code_hash: str, *, now_ms: int,
               expires_ms: int, actor: str) -> tuple[CodeRow, bool]:
    """Store a new code for *handle*'s account, replacing any earlier one; returns the
    account (with the new code) and whether an unused, unexpired code was replaced.
    ``NotFound`` for an unknown handle."""
    if expires_ms <= now_ms:
        raise ValueError("a recovery code must expire after it is issued")
    found = code_for_handle(conn, handle)
    if found is None:
        raise NotFound(f"no account {handle!r}")
    replaced = (found.code_hash is not None and found.used_ms is None
                and found.expires_ms > now_ms)
    conn.execute(
        "INSERT INTO recovery_codes (account_id, code_hash, issued_ms, expires_ms, issued_by) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account_id) DO UPDATE SET "
        "code_hash = EXCLUDED.code_hash, issued_ms = EXCLUDED.issued_ms, "
        "expires_ms = EXCLUDED.expires_ms, issued_by = EXCLUDED.issued_by, used_ms = NULL",
        (found.account_id, code_hash, now_ms, expires_ms, actor))
    audit.record(conn, "recovery_code_issued", str(found.account_id), actor=actor,
                 now_ms=now_ms, detail={"handle": found.handle, "expires_ms": expires_ms,
                                        "replaced_unused": replaced})
    return attrs.evolve(found, code_hash=code_hash, issued_ms=now_ms, expires_ms=expires_ms,
                        used_ms=None), replaced


def redeem(conn: psycopg.Connection, account_id: uuid.UUID, code_hash: str,
           password_hash: str, now_ms: int, address: str) -> bool:
    """Use the code whose hash the caller verified, and set the new password; False (and
    nothing changed) if that code was used, replaced or expired meanwhile."""
    used = conn.execute(
        "UPDATE recovery_codes SET used_ms = %s WHERE account_id = %s AND code_hash = %s "
        "AND used_ms IS NULL AND expires_ms > %s RETURNING account_id",
        (now_ms, account_id, code_hash, now_ms)).fetchone()
    if used is None:
        return False
    handle, legacy_handle = conn.execute(
        "UPDATE accounts SET password_hash = %s WHERE account_id = %s "
        "RETURNING handle, legacy_handle", (password_hash, account_id)).fetchone()
    if legacy_handle is not None:
        conn.execute(
            "INSERT INTO credential_changes (account_id, legacy_handle, password_hash, "
            "  changed_ms, next_try_ms) VALUES (%(a)s, %(h)s, %(p)s, %(now)s, %(now)s) "
            "ON CONFLICT (account_id) DO UPDATE SET legacy_handle = EXCLUDED.legacy_handle, "
            "password_hash = EXCLUDED.password_hash, changed_ms = EXCLUDED.changed_ms, "
            "state = 'pending', attempts = 0, next_try_ms = EXCLUDED.next_try_ms, "
            "last_error = NULL, done_ms = NULL",
            {"a": account_id, "h": legacy_handle, "p": password_hash, "now": now_ms})
    audit.record(conn, "account_recovered", str(account_id), actor=API_ACTOR, now_ms=now_ms,
                 detail={"handle": handle, "address": address,
                         "legacy": "queued" if legacy_handle is not None else "not_linked"})
    return True


def password_changed_ms(conn: psycopg.Connection, account_id: uuid.UUID) -> int | None:
    """When the account's password was last set by a recovery (ms), or None: the latest of
    its code's use and its credential change (the code row goes when a new code is issued,
    the change row only for a newer change; an account that is not linked has none)."""
    row = conn.execute(
        "SELECT greatest((SELECT used_ms FROM recovery_codes WHERE account_id = %(a)s), "
        "(SELECT changed_ms FROM credential_changes WHERE account_id = %(a)s))",
        {"a": account_id}).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def audit_attempt(conn: psycopg.Connection, account_id: uuid.UUID | None, handle: str,
                  result: str, now_ms: int, address: str) -> None:
    """Audit a refused recovery (``recovery_refused``): the account (or the unknown handle),
    why, and from where. The only write of a refused recovery (besides its budgets)."""
    audit.record(conn, "recovery_refused",
                 str(account_id) if account_id else f"handle:{handle}", actor=API_ACTOR,
                 now_ms=now_ms, detail={"handle": handle, "result": result, "address": address})


# ---------------------------------------------------------------- delivery to legacy

@one_statement
def pending_credentials(conn: psycopg.Connection, now_ms: int,
                        limit: int = 100) -> list[PendingCredential]:
    """Credentials owed to the legacy login server whose next try is due, oldest first."""
    rows = conn.execute(
        "SELECT account_id, legacy_handle, password_hash, changed_ms, attempts "
        "FROM credential_changes WHERE state = 'pending' AND next_try_ms <= %s "
        "ORDER BY next_try_ms, account_id LIMIT %s", (now_ms, limit)).fetchall()
    return [PendingCredential(*r) for r in rows]


def credential_delivered(conn: psycopg.Connection, change: PendingCredential, state: str,
                         now_ms: int, note: str | None = None) -> bool:
    """Mark *change* ``delivered`` (or ``skipped``: the login server has no such handle),
    unless a newer change replaced it meanwhile (False: that one stays pending)."""
    if state not in ("delivered", "skipped"):
        raise ValueError(f"unknown state {state!r}")
    return conn.execute(
        "UPDATE credential_changes SET state = %s, done_ms = %s, last_error = %s, "
        "attempts = attempts + 1 WHERE account_id = %s AND changed_ms = %s "
        "AND password_hash = %s AND state = 'pending'",
        (state, now_ms, note, change.account_id, change.changed_ms,
         change.password_hash)).rowcount == 1


def credential_failed(conn: psycopg.Connection, change: PendingCredential, error: str,
                      next_try_ms: int) -> None:
    """A try failed (the login server unreachable, a timeout): try again at *next_try_ms*."""
    conn.execute(
        "UPDATE credential_changes SET attempts = attempts + 1, last_error = %s, "
        "next_try_ms = %s WHERE account_id = %s AND changed_ms = %s AND state = 'pending'",
        (error[:500], next_try_ms, change.account_id, change.changed_ms))


def credential_state(conn: psycopg.Connection, account_id: uuid.UUID) -> dict | None:
    """The account's newest credential change as a JSON-able dict (None: never changed)."""
    row = conn.execute(
        "SELECT legacy_handle, state, attempts, changed_ms, done_ms, last_error "
        "FROM credential_changes WHERE account_id = %s", (account_id,)).fetchone()
    if row is None:
        return None
    keys = ("legacy_handle", "state", "attempts", "changed_ms", "done_ms", "last_error")
    return dict(zip(keys, row, strict=True))
