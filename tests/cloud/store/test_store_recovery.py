"""Account recovery in the store (real PostgreSQL): codes replace each other, redeem once,
set the password and queue it for legacy in one transaction; the delivery queue's states;
the account import keeps a recovered password the login server does not have yet."""

from __future__ import annotations

import psycopg
import pytest

from bridge import ids
from cloud import passwords
from cloud.store import accounts as accounts_store
from cloud.store import recovery as store
from cloud.store.errors import NotFound
from tests.bridge.test_phases import make_account
from tests.cloud.store.test_store_backfill import run_in_thread, wait_until_blocked
from tests.dbfixture import tx

NOW = 1_700_000_000_000
HOUR = 3_600_000


def audit(conn) -> list[tuple]:
    return conn.execute("SELECT actor, action, detail FROM audit_log ORDER BY audit_id"
                        ).fetchall()


def password_hash(conn, account_id) -> str:
    return conn.execute("SELECT password_hash FROM accounts WHERE account_id = %s",
                        (account_id,)).fetchone()[0]


def test_issue_stores_the_hash_replaces_an_unused_code_and_audits(conn):
    """A second code replaces the first (reported, audited); the row holds only the hash."""
    alice = make_account(conn, "alice", "dual")
    row, replaced = tx(conn, store.issue_code, "alice", "h1", now_ms=NOW,
                       expires_ms=NOW + HOUR, actor="ops")
    assert (row.account_id, row.code_hash, row.expires_ms, replaced) == (alice, "h1",
                                                                         NOW + HOUR, False)
    _, replaced = tx(conn, store.issue_code, "alice", "h2", now_ms=NOW + 1,
                     expires_ms=NOW + HOUR, actor="ops")
    assert replaced is True
    got = tx(conn, store.code_for_handle, "alice")
    assert (got.code_hash, got.issued_ms, got.used_ms) == ("h2", NOW + 1, None)
    assert [(a, act, d["replaced_unused"]) for a, act, d in audit(conn)] == [
        ("ops", "recovery_code_issued", False), ("ops", "recovery_code_issued", True)]
    # the earlier code's hash no longer redeems
    assert not tx(conn, store.redeem, alice, "h1", "new", NOW + 2, "10.0.0.1")


def test_issue_for_an_unknown_handle_or_a_past_expiry_writes_nothing(conn):
    with pytest.raises(NotFound):
        tx(conn, store.issue_code, "nobody", "h", now_ms=NOW, expires_ms=NOW + 1, actor="ops")
    make_account(conn, "alice", "dual")
    with pytest.raises(ValueError):
        tx(conn, store.issue_code, "alice", "h", now_ms=NOW, expires_ms=NOW, actor="ops")
    assert conn.execute("SELECT count(*) FROM recovery_codes").fetchone()[0] == 0
    assert audit(conn) == []


def test_redeem_sets_the_password_queues_it_for_legacy_once(conn):
    """The first redeem uses the code, sets the hash and queues the credential for the
    linked handle, audited; a second with the same code changes nothing."""
    alice = make_account(conn, "alice", "dual", password_hash="old")
    tx(conn, store.issue_code, "alice", "h", now_ms=NOW, expires_ms=NOW + HOUR, actor="ops")
    assert tx(conn, store.redeem, alice, "h", "new-hash", NOW + 5, "10.0.0.1")
    assert password_hash(conn, alice) == "new-hash"
    assert tx(conn, store.code_for_handle, "alice").used_ms == NOW + 5
    pending = tx(conn, store.pending_credentials, NOW + 5)
    assert [(p.legacy_handle, p.password_hash) for p in pending] == [("alice", "new-hash")]
    assert audit(conn)[-1] == ("cloud-api", "account_recovered",
                               {"handle": "alice", "address": "10.0.0.1", "legacy": "queued"})
    assert not tx(conn, store.redeem, alice, "h", "other", NOW + 6, "10.0.0.1")
    assert password_hash(conn, alice) == "new-hash"


def test_redeem_of_an_expired_code_changes_nothing(conn):
    alice = make_account(conn, "alice", "dual", password_hash="old")
    tx(conn, store.issue_code, "alice", "h", now_ms=NOW, expires_ms=NOW + HOUR, actor="ops")
    assert not tx(conn, store.redeem, alice, "h", "new", NOW + HOUR, "10.0.0.1")
    assert password_hash(conn, alice) == "old"
    assert tx(conn, store.pending_credentials, NOW + HOUR) == []


def test_a_cloud_native_account_queues_nothing_for_legacy(conn):
    carol = make_account(conn, "carol", "cloud", linked=False, password_hash="old")
    tx(conn, store.issue_code, "carol", "h", now_ms=NOW, expires_ms=NOW + HOUR, actor="ops")
    assert tx(conn, store.redeem, carol, "h", "new", NOW, "10.0.0.1")
    assert tx(conn, store.pending_credentials, NOW) == []
    assert audit(conn)[-1][2]["legacy"] == "not_linked"


def test_delivery_states_failures_back_off_and_a_newer_change_stays_pending(conn):
    alice = make_account(conn, "alice", "dual", password_hash="old")
    for code, at in (("h1", NOW), ("h2", NOW + 10)):
        tx(conn, store.issue_code, "alice", code, now_ms=at, expires_ms=at + HOUR, actor="ops")
        assert tx(conn, store.redeem, alice, code, f"pw-{code}", at, "a")
        if code == "h1":
            first = tx(conn, store.pending_credentials, at)[0]
    # delivering the older change does not mark the newer one
    assert not tx(conn, store.credential_delivered, first, "delivered", NOW + 20)
    newer = tx(conn, store.pending_credentials, NOW + 20)[0]
    tx(conn, store.credential_failed, newer, "TimeoutError", NOW + 5000)
    assert tx(conn, store.pending_credentials, NOW + 4999) == []
    again = tx(conn, store.pending_credentials, NOW + 5000)[0]
    assert again.attempts == 1
    assert tx(conn, store.credential_delivered, again, "delivered", NOW + 5001)
    state = tx(conn, store.credential_state, alice)
    assert (state["state"], state["attempts"], state["done_ms"]) == ("delivered", 2, NOW + 5001)


def test_the_import_keeps_a_recovered_password_until_legacy_has_it(conn):
    """While the credential is pending (or was delivered after the import began) the legacy
    copy of the old hash does not overwrite the recovered one; afterwards it syncs again."""
    old = passwords.hash_password("old-password", iterations=3)
    alice = make_account(conn, "alice", "dual", password_hash=old)
    tx(conn, store.issue_code, "alice", "h", now_ms=NOW, expires_ms=NOW + HOUR, actor="ops")
    assert tx(conn, store.redeem, alice, "h", "recovered", NOW, "a")
    record = accounts_store.LegacyAccountRecord("alice", ids.account_id("alice"), old)
    got = tx(conn, accounts_store.upsert_linked_accounts, [record], NOW + 1)
    assert (got.updated, got.unchanged) == (0, 1)
    assert password_hash(conn, alice) == "recovered"
    change = tx(conn, store.pending_credentials, NOW + 2)[0]
    assert tx(conn, store.credential_delivered, change, "delivered", NOW + 2)
    # an import that began before the delivery may hold a page read before it
    tx(conn, accounts_store.upsert_linked_accounts, [record], NOW + 1)
    assert password_hash(conn, alice) == "recovered"
    # one that began after it reads legacy's hash, which is the recovered one (here: a
    # later legacy-side change, which then wins as before)
    tx(conn, accounts_store.upsert_linked_accounts, [record], NOW + 3)
    assert password_hash(conn, alice) == old


class BeforeUpdate:
    """The import's connection, but *hook* runs once just before its first UPDATE of
    accounts: between the import's read and its write."""

    def __init__(self, conn: psycopg.Connection, hook) -> None:
        self.conn = conn
        self.hook = hook

    def execute(self, query, params=None):
        if self.hook is not None and query.startswith("UPDATE accounts"):
            hook, self.hook = self.hook, None
            hook()
        return self.conn.execute(query, params)


def test_a_recovery_committed_between_the_imports_read_and_write_is_kept(conn, db_dsn):
    """Both hashes changed on legacy; a recovery of alice commits after the import read the
    page and before it writes: alice keeps the recovered password (unchanged), bob gets the
    legacy one. The recovery must not have to wait for the import."""
    alice = make_account(conn, "alice", "dual", password_hash="alice-old")
    bob = make_account(conn, "bob", "dual", password_hash="bob-old")
    tx(conn, store.issue_code, "alice", "h", now_ms=NOW, expires_ms=NOW + HOUR, actor="ops")
    records = [accounts_store.LegacyAccountRecord(h, i, f"{h}-legacy")
               for h, i in (("alice", alice), ("bob", bob))]
    with psycopg.connect(db_dsn, autocommit=True) as recoverer:
        recoverer.execute("SET lock_timeout = '5s'")  # an import holding row locks: an error

        def recover() -> None:
            assert tx(recoverer, store.redeem, alice, "h", "recovered", NOW + 1, "a")

        with conn.transaction():
            got = accounts_store.upsert_linked_accounts(BeforeUpdate(conn, recover), records,
                                                        NOW + 1)
    assert got == accounts_store.ImportBatchResult(0, 1, 1, ())
    assert (password_hash(conn, alice), password_hash(conn, bob)) == ("recovered",
                                                                      "bob-legacy")


def test_an_import_reaching_a_recovery_in_flight_waits_and_keeps_it(conn, db_dsn):
    """The recovery has set alice's password but not committed when the import reaches her
    row: the import waits for it, then sees the row changed and leaves the recovered one."""
    alice = make_account(conn, "alice", "dual", password_hash="alice-old")
    tx(conn, store.issue_code, "alice", "h", now_ms=NOW, expires_ms=NOW + HOUR, actor="ops")
    record = accounts_store.LegacyAccountRecord("alice", alice, "alice-legacy")
    with psycopg.connect(db_dsn, autocommit=True) as importer, \
            psycopg.connect(db_dsn, autocommit=True) as recoverer:
        with recoverer.transaction():
            assert store.redeem(recoverer, alice, "h", "recovered", NOW + 1, "a")
            thread, result = run_in_thread(lambda: tx(
                importer, accounts_store.upsert_linked_accounts, [record], NOW + 1))
            wait_until_blocked(conn, importer.info.backend_pid)
        thread.join(10)
        assert not thread.is_alive()
    assert result == [accounts_store.ImportBatchResult(0, 0, 1, ())]
    assert password_hash(conn, alice) == "recovered"
