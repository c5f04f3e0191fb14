"""Accounts: creating them, linking legacy handles to them, logins and migration phases.

A handle names one account (``account_handles``), whether the account is cloud-native or
linked to a legacy handle by the bridge.
"""

from __future__ import annotations

import uuid

import psycopg

from cloud.db import one_statement
from cloud.model import PHASES, Account
from cloud.store.errors import Conflict, NotFound


def create_account(conn: psycopg.Connection, account: Account,
                   password_hash: str | None) -> bool:
    """Create *account* unless its id or handle exists; True if this call created it."""
    if account.phase not in PHASES:
        raise ValueError(f"unknown phase {account.phase!r}")
    cur = conn.execute(
        "INSERT INTO account_handles (handle, account_id) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING", (account.handle, account.account_id))
    if cur.rowcount == 0:
        owner = conn.execute("SELECT account_id FROM account_handles WHERE handle = %s",
                             (account.handle,)).fetchone()[0]
        if owner != account.account_id:
            raise Conflict(f"handle {account.handle!r} belongs to another account")
    cur = conn.execute(
        "INSERT INTO accounts (account_id, handle, legacy_handle, display_name, "
        "password_hash, phase) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (account.account_id, account.handle, account.legacy_handle, account.display_name,
         password_hash, account.phase))
    return cur.rowcount == 1


_ACCOUNT_COLS = "account_id, handle, phase, legacy_handle, display_name"


def _account(row: tuple) -> Account:
    return Account(row[0], row[1], row[2], row[3], row[4])


def ensure_linked_accounts(conn: psycopg.Connection,
                           new_ids: dict[str, uuid.UUID]) -> tuple[dict[str, uuid.UUID], int]:
    """Find or create the accounts of legacy handles; ``(handle -> account id, created)``.

    *new_ids* gives, per handle, the id a new linked account gets (phase ``legacy``, no
    password until accounts are imported). A handle that already names an account (linked
    earlier, or a cloud-native account) keeps it.
    """
    handles = sorted(new_ids)
    if not handles:
        return {}, 0
    cur = conn.execute(
        "INSERT INTO account_handles (handle, account_id) "
        "SELECT * FROM unnest(%s::text[], %s::uuid[]) ON CONFLICT DO NOTHING "
        "RETURNING handle, account_id", (handles, [new_ids[h] for h in handles]))
    fresh = cur.fetchall()
    if fresh:
        conn.execute(
            "INSERT INTO accounts (account_id, handle, legacy_handle, phase) "
            "SELECT a, h, h, 'legacy' FROM unnest(%s::text[], %s::uuid[]) AS t(h, a) "
            "ON CONFLICT DO NOTHING", ([h for h, _ in fresh], [a for _, a in fresh]))
    rows = conn.execute("SELECT handle, account_id FROM account_handles WHERE handle = ANY(%s)",
                        (handles,)).fetchall()
    return dict(rows), len(fresh)


def accounts_by_phase(conn: psycopg.Connection) -> dict[str, int]:
    """How many accounts are in each phase (every phase present, zero if none)."""
    counts = dict.fromkeys(PHASES, 0)
    for phase, n in conn.execute("SELECT phase, count(*) FROM accounts GROUP BY 1"):
        counts[phase] = n
    return counts


@one_statement
def get_account(conn: psycopg.Connection, account_id: uuid.UUID) -> Account | None:
    row = conn.execute(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE account_id = %s",
                       (account_id,)).fetchone()
    return None if row is None else _account(row)


def account_for_login(conn: psycopg.Connection,
                      handle_or_id: str) -> tuple[Account, str | None] | None:
    """The account a login names (by handle, or by account id) and its password hash."""
    try:
        account_id = uuid.UUID(handle_or_id)
    except ValueError:
        row = conn.execute("SELECT account_id FROM account_handles WHERE handle = %s",
                           (handle_or_id,)).fetchone()
        if row is None:
            return None
        account_id = row[0]
    row = conn.execute(
        f"SELECT {_ACCOUNT_COLS}, password_hash FROM accounts WHERE account_id = %s",
        (account_id,)).fetchone()
    return None if row is None else (_account(row[:5]), row[5])


def set_phase(conn: psycopg.Connection, account_id: uuid.UUID, phase: str) -> str:
    """Move an account to *phase*; return the phase it had. Gates belong to the caller."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    row = conn.execute("SELECT phase FROM accounts WHERE account_id = %s FOR UPDATE",
                       (account_id,)).fetchone()
    if row is None:
        raise NotFound(f"no account {account_id}")
    conn.execute("UPDATE accounts SET phase = %s, phase_changed_at = now() "
                 "WHERE account_id = %s", (phase, account_id))
    return row[0]
