"""The gaps reconciler's dirty-set pass: an in-sync pass reads the roots of what changed, and
its cost (digest requests, stored rows read) follows the changes, not the history. Counted,
never timed."""

from __future__ import annotations

import attrs

from cloud import admin
from cloud.store import digests as digests_store
from reconcilers import runner
from reconcilers.gaps import GapsConfig
from tests.dbfixture import truncate_all
from tests.reconcilers.test_gaps import Scene, drop_from_cloud

CONFIG = GapsConfig(margin_ms=1000, confirm_after_s=0.5)


class History:
    """*chats* conversations of *per_chat* messages on both stacks, compared clean once,
    then two hours older (so they fill whole past slots)."""

    def __init__(self, conn, db_dsn, chats: int, per_chat: int) -> None:
        truncate_all(conn)
        self.scene = Scene(conn, db_dsn)
        self.devices = {}
        for c in range(chats):
            members = (f"u{c}a", f"u{c}b")
            users = [self.scene.net.add_user(h) for h in members]
            self.devices[f"chat-{c}"] = (members, [self.scene.net.device(u) for u in users])
            self.scene.net.online(*self.devices[f"chat-{c}"][1])
            self.send(f"chat-{c}", per_chat)
        self.scene.mirror()
        first, _ = self.scene.reconcile(config=CONFIG)
        assert first.clean and first.compared == chats
        self.scene.net.run(2 * 3600)

    def send(self, chat: str, n: int) -> list[str]:
        members, devices = self.devices[chat]
        guids = [devices[0].send(chat, members, f"{chat} more {i}") for i in range(n)]
        self.scene.net.run(2.0)
        return guids

    def close(self) -> None:
        self.scene.lock_conn.close()


def costs(conn, db_dsn, chats: int, per_chat: int) -> dict[str, tuple]:
    """Digest requests and stored rows read by: a pass with nothing changed; a pass after
    two conversations got three new messages each; a full sweep."""
    h = History(conn, db_dsn, chats, per_chat)
    try:
        out = {}
        steady, rec = h.scene.reconcile(config=CONFIG)
        assert steady.clean and steady.exit_code() == runner.EXIT_IN_SYNC
        assert steady.compared == chats and steady.detail["skipped_clean"] == chats
        out["steady"] = (rec.counters.digest_requests, rec.counters.digest_rows_read)
        for c in (0, 1):
            h.send(f"chat-{c}", 3)
        h.scene.mirror()
        changed, rec = h.scene.reconcile(config=CONFIG)
        assert changed.clean and changed.detail["skipped_clean"] == chats - 2
        out["changed"] = (rec.counters.digest_requests, rec.counters.digest_rows_read)
        full, rec = h.scene.reconcile(config=attrs.evolve(CONFIG, full_sweep=True))
        assert full.clean and full.detail["skipped_clean"] == 0
        out["full"] = (rec.counters.digest_requests, rec.counters.digest_rows_read)
        return out
    finally:
        h.close()


def test_an_in_sync_pass_costs_what_changed_not_the_history(conn, db_dsn):
    """At 3 conversations of 10 messages and at 12 of 40 (16 times the history): nothing
    changed, no digest is asked for and no row read; two conversations changed, two root
    requests and at most ten rows either way; a full sweep asks one root per conversation."""
    small = costs(conn, db_dsn, 3, 10)
    large = costs(conn, db_dsn, 12, 40)
    assert small["steady"] == large["steady"] == (0, 0)
    assert small["changed"][0] == large["changed"][0] == 2
    # per changed chat: a row per whole past slot it has (<= 2) and at most its 3 new
    # messages (those in the slot the watermark cuts): bounded, whatever the history
    assert 0 < small["changed"][1] <= 2 * (2 + 3) and 0 < large["changed"][1] <= 2 * (2 + 3)
    assert small["full"][0] == 3 and large["full"][0] == 12


def test_a_difference_keeps_its_conversation_dirty_until_a_compare_finds_it_equal(conn,
                                                                                  db_dsn):
    """A loss found and repaired is compared again by the next pass (it vouches for the
    repair), then no more; the gate reads an untouched conversation as clean up to the
    newest pass that went through the dirty set."""
    h = History(conn, db_dsn, 3, 10)
    try:
        scene = h.scene
        lost = h.send("chat-0", 4)
        scene.mirror()
        drop_from_cloud(conn, lost[:2])
        found, _ = scene.reconcile(config=CONFIG)
        assert (found.confirmed, found.repaired) == (2, 2)
        cid0 = scene.conn.execute("SELECT conversation_id FROM conversation_legacy_ids "
                                  "WHERE legacy_chat_id = 'chat-0'").fetchone()[0]
        assert cid0 in digests_store.dirty_versions(conn)
        vouch, rec = scene.reconcile(config=CONFIG)
        assert vouch.clean and rec.counters.digest_requests == 1
        assert digests_store.dirty_versions(conn) == {}
        after, rec = scene.reconcile(config=CONFIG)
        assert after.clean and rec.counters.digest_requests == 0
        through = digests_store.clean_through(conn)
        assert through == after.detail["watermark_ms"]
        accounts = [r[0] for r in conn.execute("SELECT account_id FROM accounts")]
        coverage = admin.conversation_coverage(conn, accounts)
        assert coverage and {c.last_clean_reconcile_ms for c in coverage} == {through}
    finally:
        h.close()


def test_a_dry_run_marks_nothing_and_vouches_for_nothing(conn, db_dsn):
    """A dry run that finds a difference writes neither the dirty set nor the watermark
    the gate reads."""
    h = History(conn, db_dsn, 2, 5)
    try:
        lost = h.send("chat-1", 2)
        h.scene.mirror()
        before = digests_store.clean_through(conn)
        dirty = digests_store.dirty_versions(conn)
        drop_from_cloud(conn, lost[:1])
        dirty_after_drop = digests_store.dirty_versions(conn)
        assert set(dirty_after_drop) >= set(dirty)
        report, _ = h.scene.reconcile(dry_run=True, config=CONFIG)
        assert report.confirmed == 1 and report.repaired == 0
        assert digests_store.dirty_versions(conn) == dirty_after_drop
        assert digests_store.clean_through(conn) == before
    finally:
        h.close()


def test_a_restarted_supernode_has_all_its_chats_compared(conn, db_dsn):
    """A supernode that lost its memory while nothing followed its feed (no feed gap, no
    cloud write): its new epoch puts all its chats in the pass, which puts back what it
    lost; the other supernodes' chats are skipped, and the pass after asks nothing."""
    h = History(conn, db_dsn, 6, 4)
    try:
        scene = h.scene
        home = scene.net.ring.home_of("chat-0")
        homed = [c for c in h.devices if scene.net.ring.home_of(c) == home]
        scene.net.wait(scene.net.supernodes[home].crash())
        scene.net.wait(scene.net.supernodes[home].restart())
        report, rec = scene.reconcile(config=CONFIG)
        assert report.detail["restarted_supernodes"] == [home]
        assert report.repaired == 4 * len(homed) and report.exit_code() == runner.EXIT_IN_SYNC
        assert report.detail["skipped_clean"] == 6 - len(homed)
        again, rec = scene.reconcile(config=CONFIG)
        assert again.detail["restarted_supernodes"] == []
        assert again.clean and again.confirmed == 0
    finally:
        h.close()
