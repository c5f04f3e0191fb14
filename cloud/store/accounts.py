"""Accounts: creating them, linking legacy handles to them (and the import of the legacy
login server's accounts), logins and migration phases.

A handle names one account (``account_handles``), whether the account is cloud-native or
linked to a legacy handle by the bridge.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import attrs
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


#: The accounts of a page's handles that exist: (handle, id, legacy handle, password hash,
#: whether the cloud's is newer). One index probe per handle, whatever the planner thinks of
#: the sizes (``OFFSET 0`` keeps it a per-handle subplan): as ``handle = ANY(%s)``, the
#: generic plan the connection switches to after five pages, made without statistics,
#: scanned account_handles and compared every row with every handle of the page (2,000
#: accounts: 8-10 ms a page against 0.6; with statistics 0.47 against 0.57).
_LINKED_NOW = (
    "SELECT u.handle, r.* FROM unnest(%s::text[]) AS u(handle), LATERAL ("
    "  SELECT a.account_id, a.legacy_handle, a.password_hash, "
    "         c.state = 'pending' OR c.done_ms >= %s "
    "  FROM account_handles h JOIN accounts a USING (account_id) "
    "  LEFT JOIN credential_changes c ON c.account_id = a.account_id "
    "  WHERE h.handle = u.handle OFFSET 0) r")


@attrs.frozen
class LegacyAccountRecord:
    """One legacy login-server account, with the cloud id the bridge derived for it."""

    handle: str
    account_id: uuid.UUID
    password_hash: str


@attrs.frozen
class ImportBatchResult:
    created: int
    updated: int
    unchanged: int
    #: handles owned by a cloud account that is not linked to that legacy handle
    conflicts: tuple[str, ...]


def upsert_linked_accounts(conn: psycopg.Connection, records: Sequence[LegacyAccountRecord],
                           now_ms: int) -> ImportBatchResult:
    """Give each legacy account a linked cloud account, or bring its password hash up to date.

    New accounts get the caller's id, handle = legacy handle, phase ``legacy`` and the legacy
    password hash as it is (both stacks use the same ``pbkdf2_sha256$...`` form). An account
    already linked to the handle keeps its id and phase; only a changed hash is written
    (unless a recovery set a newer one on the cloud, see the comment below; *now_ms* is
    when the import began), so a re-import where nothing changed locks and writes nothing.
    A handle that belongs to a cloud account not linked to it is a conflict, left untouched.
    """
    by_handle = {r.handle: r for r in records}  # the last record of a handle wins
    handles = sorted(by_handle)
    if not handles:
        return ImportBatchResult(0, 0, 0, ())
    inserted = {h for (h,) in conn.execute(
        "INSERT INTO account_handles (handle, account_id) "
        "SELECT * FROM unnest(%s::text[], %s::uuid[]) ON CONFLICT DO NOTHING RETURNING handle",
        (handles, [by_handle[h].account_id for h in handles]))}
    new = [by_handle[h] for h in handles if h in inserted]
    created = 0
    if new:
        created = conn.execute(
            "INSERT INTO accounts (account_id, handle, legacy_handle, password_hash, phase, "
            "  phase_changed_at, created_at) "
            "SELECT i.id, i.handle, i.handle, i.pw, 'legacy', to_timestamp(%s / 1000.0), "
            "       to_timestamp(%s / 1000.0) "
            "FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS i(id, handle, pw) "
            "ON CONFLICT DO NOTHING",
            (now_ms, now_ms, [r.account_id for r in new], [r.handle for r in new],
             [r.password_hash for r in new])).rowcount
    conflicts: list[str] = []
    if created != len(new):
        # an account row with one of these ids but another handle: keep the store consistent
        # by giving the handle back, and report it
        orphaned = [h for (h,) in conn.execute(
            "SELECT h.handle FROM account_handles h JOIN accounts a USING (account_id) "
            "WHERE h.handle = ANY(%s) AND a.handle <> h.handle",
            ([r.handle for r in new],))]
        conn.execute("DELETE FROM account_handles WHERE handle = ANY(%s)", (orphaned,))
        conflicts.extend(orphaned)
    existing = [h for h in handles if h not in inserted]
    updated = unchanged = 0
    if existing:
        # A password set on the cloud (account recovery) that the login server has not
        # acknowledged yet, or acknowledged only after this import began (its page may be
        # older), is newer than the legacy copy: keep it (cloud/store/recovery.py).
        rows = conn.execute(_LINKED_NOW, (existing, now_ms)).fetchall()
        to_update: list[tuple[uuid.UUID, str, str, str]] = []  # id, handle, hash read, new
        for handle, account_id, legacy_handle, password_hash, cloud_newer in rows:
            if legacy_handle != handle:
                conflicts.append(handle)
            elif password_hash != by_handle[handle].password_hash and not cloud_newer:
                to_update.append((account_id, handle, password_hash,
                                  by_handle[handle].password_hash))
            else:
                unchanged += 1
        # a handle whose account row is missing: nothing to link it to
        conflicts.extend(sorted(set(existing) - {r[0] for r in rows}))
        if to_update:
            # Read without a lock: set only where the row is still as read (locked in id
            # order, so concurrent imports do not deadlock). A recovery sets the hash and
            # queues its credential in one transaction (recovery.redeem), and nothing else
            # makes a change pending: one that committed since the read changed the hash,
            # which this sees (or re-checks once the recovery's row lock is gone), so the
            # row is skipped, unchanged, the cloud side being newer.
            updated = conn.execute(
                "UPDATE accounts a SET password_hash = l.pw FROM ("
                "  SELECT x.account_id, u.pw FROM accounts x JOIN unnest(%s::uuid[], "
                "    %s::text[], %s::text[], %s::text[]) AS u(id, handle, seen, pw) "
                "  ON x.account_id = u.id AND x.legacy_handle = u.handle "
                "  AND x.password_hash IS NOT DISTINCT FROM u.seen "
                "  ORDER BY x.account_id FOR UPDATE OF x) l "
                "WHERE a.account_id = l.account_id",
                [list(column) for column in zip(*to_update, strict=True)]).rowcount
            unchanged += len(to_update) - updated
    return ImportBatchResult(created, updated, unchanged, tuple(sorted(conflicts)))


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
