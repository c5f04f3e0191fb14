"""Bulk import of legacy accounts from the deterministic login server into real PostgreSQL."""

from __future__ import annotations

from twisted.internet import defer

from bridge import ids
from bridge.accounts import ImportCounts, import_accounts
from cloud import passwords
from cloud.db import InlineDatabase
from cloud.store import accounts as accounts_store
from legacy import auth
from tests.bridge.test_phases import NOW, make_account, tx
from tests.legacy.netfixture import LegacyNet


def run_import(net: LegacyNet, conn, **kw) -> ImportCounts:
    return net.wait(defer.Deferred.fromCoroutine(
        import_accounts(net.login_peer(), InlineDatabase(conn), NOW, **kw)))


def accounts(conn) -> dict[str, tuple]:
    rows = conn.execute("SELECT handle, account_id, legacy_handle, phase, password_hash "
                        "FROM accounts ORDER BY handle").fetchall()
    return {r[0]: r[1:] for r in rows}


def test_import_links_every_handle_and_a_second_run_creates_nothing(conn):
    """Each legacy handle gets a linked account in phase legacy; running again creates and
    updates nothing."""
    net = LegacyNet(1).start()
    for h in ("alice", "bob", "carol"):
        net.add_user(h)
    first = run_import(net, conn)
    assert (first.seen, first.created, first.updated, first.conflicts) == (3, 3, 0, 0)
    rows = accounts(conn)
    assert set(rows) == {"alice", "bob", "carol"}
    for handle, (account_id, legacy_handle, phase, password_hash) in rows.items():
        assert account_id == ids.account_id(handle) and legacy_handle == handle
        assert phase == "legacy" and password_hash == net.login.accounts[handle][0]
    second = run_import(net, conn)
    assert (second.seen, second.created, second.updated, second.unchanged) == (3, 0, 0, 3)
    assert accounts(conn) == rows


def test_imported_password_logs_in_on_the_cloud_side(conn):
    """The copied legacy hash verifies the user's legacy password with cloud.passwords."""
    net = LegacyNet(1).start()
    user = net.add_user("alice")
    run_import(net, conn)
    found = tx(conn, accounts_store.account_for_login, "alice")
    assert found is not None and found[0].account_id == ids.account_id("alice")
    assert passwords.verify_password(user.password, found[1])
    assert not passwords.verify_password("wrong", found[1])


def test_import_pages_through_every_account(conn):
    """More accounts than a page: every one is imported, progress is reported per page."""
    net = LegacyNet(1).start()
    for i in range(450):
        net.login.add_account(f"user-{i:04d}", f"pbkdf2_sha256$1$c2FsdA==$h{i}")
    pages: list[ImportCounts] = []
    counts = run_import(net, conn, page_size=200, progress=pages.append)
    assert counts.seen == counts.created == 450
    assert [p.seen for p in pages] == [200, 400, 450]
    assert conn.execute("SELECT count(*) FROM accounts WHERE phase = 'legacy'").fetchone()[0] \
        == 450


def test_changed_password_is_updated_and_the_phase_is_never_touched(conn):
    """A linked account gets the login server's new hash; its migration phase stays."""
    net = LegacyNet(1).start()
    net.add_user("alice")
    run_import(net, conn)
    tx(conn, accounts_store.set_phase, ids.account_id("alice"), "cloud")
    new_hash = auth.hash_password("new secret", salt=b"salty", iterations=10)
    net.login.accounts["alice"][0] = new_hash
    counts = run_import(net, conn)
    assert (counts.created, counts.updated, counts.unchanged) == (0, 1, 0)
    _, _, phase, password_hash = accounts(conn)["alice"]
    assert phase == "cloud" and password_hash == new_hash
    assert passwords.verify_password("new secret", password_hash)


def test_a_handle_owned_by_a_cloud_native_account_is_a_reported_conflict(conn):
    """A cloud-native account already using the handle is left alone and counted, and the
    other handles are still imported."""
    net = LegacyNet(1).start()
    net.add_user("alice")
    net.add_user("bob")
    native = make_account(conn, "bob", "cloud-only", linked=False, password_hash="cloud-hash")
    counts = run_import(net, conn)
    assert (counts.seen, counts.created, counts.conflicts) == (2, 1, 1)
    assert counts.conflict_handles == ("bob",)
    assert accounts(conn)["bob"] == (native, None, "cloud-only", "cloud-hash")
    assert counts.to_json()["conflict_handles"] == ["bob"]


def test_an_account_linked_earlier_under_another_id_is_kept(conn):
    """An account already linked to the handle (another id) is updated, not duplicated."""
    net = LegacyNet(1).start()
    net.add_user("alice")
    earlier = make_account(conn, "alice", "dual", linked=False)
    conn.execute("UPDATE accounts SET legacy_handle = 'alice' WHERE account_id = %s",
                 (earlier,))
    counts = run_import(net, conn)
    assert (counts.created, counts.updated, counts.conflicts) == (0, 1, 0)
    assert accounts(conn)["alice"][:3] == (earlier, "alice", "dual")


def row_versions(conn) -> dict[str, tuple]:
    """Each account's and handle's row version: (xmin, xmax, ctid) by handle. A new version
    changes xmin and ctid; a row lock (FOR UPDATE) sets xmax."""
    return {f"{table}:{handle}": (str(xmin), str(xmax), str(ctid))
            for table in ("accounts", "account_handles")
            for handle, xmin, xmax, ctid in conn.execute(
                f"SELECT handle, xmin, xmax, ctid FROM {table}")}


def test_a_reimport_of_unchanged_accounts_locks_and_writes_no_row(conn):
    """A re-import of a full page where nothing changed leaves every row as it was: no new
    version, no lock (xmax stays 0); a page with one changed hash writes only that row."""
    net = LegacyNet(1).start()
    for i in range(200):
        net.login.add_account(f"user-{i:04d}", f"pbkdf2_sha256$1$c2FsdA==$h{i}")
    assert run_import(net, conn, page_size=200).created == 200
    before = row_versions(conn)
    assert len(before) == 400 and {xmax for _, xmax, _ in before.values()} == {"0"}
    counts = run_import(net, conn, page_size=200)
    assert (counts.seen, counts.updated, counts.unchanged) == (200, 0, 200)
    assert row_versions(conn) == before
    net.login.accounts["user-0007"][0] = "pbkdf2_sha256$1$c2FsdA==$changed"
    counts = run_import(net, conn, page_size=200)
    assert (counts.updated, counts.unchanged) == (1, 199)
    after = row_versions(conn)
    assert {k for k in before if after[k] != before[k]} == {"accounts:user-0007"}
