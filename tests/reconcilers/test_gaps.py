"""The gaps reconciler on the deterministic legacy network and a real PostgreSQL."""

from __future__ import annotations

import collections
import math

import attrs
import psycopg
import pytest
from twisted.internet import defer

from bridge import ids
from bridge.discovery import SupernodeLinks
from bridge.ops import status
from cloud.db import InlineDatabase
from cloud.store import coordination as coordination_store
from cloud.store import findings as findings_store
from cloud.store import messages as messages_store
from reconcilers import runner
from reconcilers.gaps import GapsConfig, GapsReconciler
from tests.bridge.test_follower import Bridge, chat_messages
from tests.legacy.netfixture import PEER_SECRET, LegacyNet


class Scene:
    def __init__(self, conn, db_dsn, supernodes: int = 4, seed: int = 31,
                 **sn_config) -> None:
        self.net = LegacyNet(supernodes, seed=seed, **sn_config).start()
        self.conn, self.db = conn, InlineDatabase(conn)
        self.lock_conn = psycopg.connect(db_dsn, autocommit=True)
        self.links = SupernodeLinks(self.net.net, list(self.net.directory.values()),
                                    name="reconciler", secret=PEER_SECRET)

    def chat(self, chat_id: str, n: int, *, members=("alice", "bob")) -> list[str]:
        users = [self.net.add_user(h) for h in members]
        devices = [self.net.device(u) for u in users]
        self.net.online(*devices)
        guids = [devices[0].send(chat_id, tuple(members), f"{chat_id} {i}") for i in range(n)]
        self.net.run(2.0)
        return guids

    def mirror(self) -> None:
        bridge = Bridge(self.net, self.db).start()
        self.net.run(3.0)
        bridge.stop(self.net)

    def reconcile(self, *, dry_run: bool = False, max_seconds: float | None = None,
                  config: GapsConfig | None = None, stop_after: int | None = None
                  ) -> tuple[runner.Report, GapsReconciler]:
        """One run; *stop_after* N root digests asks it to stop (as Ctrl-C or a deadline
        would at its next check) once it has compared N conversations."""
        self.net.run(15.0)  # let the watermark pass everything sent so far
        rec = GapsReconciler(self.links, config or GapsConfig(margin_ms=1000,
                                                              confirm_after_s=0.5))
        d = defer.Deferred.fromCoroutine(runner.run_one(
            rec, clock=self.net.clock, db=self.db, lock_conn=self.lock_conn,
            dry_run=dry_run, max_seconds=max_seconds,
            stop_requested=lambda: stop_after is not None
            and rec.counters.digest_requests >= stop_after))
        return self.net.wait(d, timeout=600), rec


@pytest.fixture
def scene(conn, db_dsn):
    s = Scene(conn, db_dsn)
    yield s
    s.lock_conn.close()


def drop_from_cloud(conn, guids) -> None:
    conn.execute("DELETE FROM notifications WHERE message_id = ANY(%s)",
                 ([ids.message_id(g) for g in guids],))
    conn.execute("DELETE FROM messages WHERE legacy_guid = ANY(%s)", (list(guids),))


def test_in_sync_stacks_compare_with_root_digests_only(scene):
    """Agreeing conversations cost one digest each and move no message: exit 0, clean."""
    scene.chat("chat-a", 20)
    scene.chat("chat-b", 5, members=("carol", "dave"))
    scene.mirror()
    report, rec = scene.reconcile()
    assert report.exit_code() == runner.EXIT_IN_SYNC and report.clean
    assert report.compared == 2 and report.confirmed == 0
    assert rec.counters.digest_requests == 2 and rec.counters.fetched_messages == 0
    assert rec.counters.listed_guids == 0


def test_messages_missing_in_cloud_are_fetched_and_written_back(scene):
    """Lost on the way to the cloud: found, confirmed, repaired, with a finding and audit."""
    guids = scene.chat("chat-a", 30)
    scene.mirror()
    lost = guids[3:8]
    drop_from_cloud(scene.conn, lost)
    report, rec = scene.reconcile()
    assert (report.suspects, report.confirmed, report.repaired) == (5, 5, 5)
    assert report.exit_code() == runner.EXIT_IN_SYNC and report.bytes_from_legacy > 0
    assert sorted(r[1] for r in chat_messages(scene.conn, "chat-a")) == sorted(guids)
    assert scene.conn.execute(
        "SELECT kind, state, detail->>'count' FROM reconcile_findings").fetchall() == [
        ("missing_in_cloud", "repaired", "5")]
    assert scene.conn.execute("SELECT count(*) FROM audit_log WHERE actor = 'reconciler'"
                              ).fetchone()[0] == 1
    again, _ = scene.reconcile()
    assert again.confirmed == 0 and again.clean


class CountingDatabase:
    """The scene's database, counting the transactions by name."""

    def __init__(self, inner: InlineDatabase) -> None:
        self.inner, self.counts = inner, collections.Counter()

    def run(self, desc, fn, *args, **kwargs):
        self.counts[desc] += 1
        return self.inner.run(desc, fn, *args, **kwargs)


def test_a_rounds_repairs_into_the_cloud_are_one_transaction_and_a_failing_chat_fails_alone(
        scene):
    """The messages a round confirmed missing in three chats are written, with a finding
    each, in one transaction. When one chat's write fails, the round's chats are written
    one by one: that chat's finding says failed, with the error; the others are repaired."""
    lost = {}
    for chat in ("chat-a", "chat-b", "chat-c"):
        guids = scene.chat(chat, 6, members=(f"{chat}-x", f"{chat}-y"))
        lost[chat] = guids[1:3]
    scene.mirror()
    for guids in lost.values():
        drop_from_cloud(scene.conn, guids)
    counting = scene.db = CountingDatabase(scene.db)
    report, _ = scene.reconcile()
    assert (report.confirmed, report.repaired, report.failed) == (6, 6, 0) and report.clean
    assert counting.counts["repair_in_cloud"] == 1
    assert sorted(scene.conn.execute(
        "SELECT detail->>'chat_id', state FROM reconcile_findings").fetchall()) == [
        ("chat-a", "repaired"), ("chat-b", "repaired"), ("chat-c", "repaired")]

    scene.conn.execute("DELETE FROM reconcile_findings")
    for guids in lost.values():
        drop_from_cloud(scene.conn, guids)
    scene.conn.execute(
        "CREATE FUNCTION refuse_chat_b() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.conversation_id = '{ids.conversation_id('chat-b')}' THEN "
        "RAISE EXCEPTION 'chat-b refused'; END IF; RETURN NEW; END $$")
    scene.conn.execute("CREATE TRIGGER refuse_chat_b BEFORE INSERT ON messages "
                       "FOR EACH ROW EXECUTE FUNCTION refuse_chat_b()")
    counting.counts.clear()
    try:
        report, _ = scene.reconcile()
    finally:
        scene.conn.execute("DROP TRIGGER refuse_chat_b ON messages")
    assert (report.confirmed, report.repaired, report.failed) == (6, 4, 2)
    assert counting.counts["repair_in_cloud"] == 1 + 3  # the round's, then each chat's
    found = {chat: (state, error) for chat, state, error in scene.conn.execute(
        "SELECT detail->>'chat_id', state, detail->>'error' FROM reconcile_findings")}
    assert found["chat-a"] == ("repaired", None) and found["chat-c"] == ("repaired", None)
    assert found["chat-b"][0] == "failed" and "chat-b refused" in found["chat-b"][1]
    stored = {r[1] for chat in lost for r in chat_messages(scene.conn, chat)}
    assert set(lost["chat-a"] + lost["chat-c"]) <= stored
    assert not set(lost["chat-b"]) & stored


def drop_at_home(scene, chat_id: str, guids) -> None:
    """Take messages out of their home supernode's memory (and its digest tree)."""
    chat = scene.net.supernodes[scene.net.ring.home_of(chat_id)].mem.chats[chat_id]
    for guid in guids:
        chat.drop(guid)


class LegacyHalfFails(GapsReconciler):
    """A gaps reconciler whose second look at what legacy lacks always fails."""

    async def _confirm_for_legacy(self, ctx, diff, look, members_seeded):
        if diff.missing_in_legacy:
            raise RuntimeError("supernode answered nothing for " + diff.chat_id)


def test_a_chat_whose_legacy_half_fails_still_gets_its_cloud_repair(scene):
    """Differences both ways in one chat, and the second look at the legacy side fails: what
    the cloud lacked is written and counted as repaired all the same, the failure is counted
    once, and the chat is left to the next run, which repairs the rest."""
    guids = scene.chat("chat-a", 8)
    scene.mirror()
    drop_from_cloud(scene.conn, guids[1:3])
    drop_at_home(scene, "chat-a", guids[5:6])
    scene.net.run(15.0)
    rec = LegacyHalfFails(scene.links, GapsConfig(margin_ms=1000, confirm_after_s=0.5))
    d = defer.Deferred.fromCoroutine(runner.run_one(
        rec, clock=scene.net.clock, db=scene.db, lock_conn=scene.lock_conn, dry_run=False,
        max_seconds=None))
    report = scene.net.wait(d, timeout=600)
    assert (report.confirmed, report.repaired, report.failed) == (2, 2, 1)
    assert "supernode answered nothing" in report.detail["errors"][0]
    assert set(guids[1:3]) <= {r[1] for r in chat_messages(scene.conn, "chat-a")}
    again, _ = scene.reconcile()
    assert again.repaired == 1 and again.clean


def test_a_message_the_outbox_holds_is_left_to_it_and_repaired_once_its_row_is_done(scene):
    """A cloud post has its legacy GUID (so its digest) from when it is queued: while its
    outbox row is pending, the reconciler leaves it to the injector (counted, not confirmed,
    no finding); once the row says injected and the home still lacks it, it is a loss, and
    repaired."""
    scene.chat("chat-a", 5)
    scene.mirror()
    cid = ids.conversation_id("chat-a")
    alice = scene.conn.execute("SELECT account_id FROM accounts WHERE handle = 'alice'"
                               ).fetchone()[0]
    with scene.conn.transaction():
        message, _ = messages_store.post_message(scene.conn, cid, alice, "c1", "queued",
                                                 int(scene.net.clock.seconds() * 1000))
    guid = ids.guid_for_cloud_message(message.message_id)
    assert message.legacy_guid == guid
    home = scene.net.supernodes[scene.net.ring.home_of("chat-a")]
    report, _ = scene.reconcile()
    assert (report.suspects, report.confirmed, report.repaired) == (1, 0, 0)
    assert report.detail["left_to_outbox"] == 1 and report.clean
    vouched = "SELECT last_clean_reconcile_ms FROM conversations WHERE conversation_id = %s"
    assert scene.conn.execute(vouched, (cid,)).fetchone() == (None,)  # not compared equal
    # given up by an injector older than migration 0022, which left the GUID: the outbox's
    # verdict (with its own finding), not the reconciler's to inject
    scene.conn.execute("UPDATE outbox_to_legacy SET state = 'failed'")
    given_up, _ = scene.reconcile()
    assert (given_up.confirmed, given_up.detail["left_to_outbox"]) == (0, 1)
    assert guid not in {m.guid for m in home.history("chat-a")}
    assert scene.conn.execute("SELECT count(*) FROM reconcile_findings").fetchone() == (0,)
    # the row says done, but the home never got the message (an Ack for a lost write)
    scene.conn.execute("UPDATE outbox_to_legacy SET state = 'done'")
    again, _ = scene.reconcile()
    assert (again.confirmed, again.repaired) == (1, 1) and "left_to_outbox" not in again.detail
    assert guid in {m.guid for m in home.history("chat-a")}
    third, _ = scene.reconcile()
    assert third.confirmed == 0 and scene.conn.execute(vouched, (cid,)).fetchone()[0] > 0


def test_an_injection_goes_to_the_members_a_cloud_repair_of_the_same_round_listed(scene):
    """A chat the cloud knows by its sender only (no member list mirrored yet), with
    differences both ways: the round's repair into the cloud seeds its member list from the
    home's, and the injection into legacy that follows sends that list (with the sender
    alone, the home would refuse it)."""
    guids = scene.chat("chat-a", 8)
    scene.mirror()
    cid = ids.conversation_id("chat-a")
    alice = scene.conn.execute("SELECT account_id FROM accounts WHERE handle = 'alice'"
                               ).fetchone()[0]
    scene.conn.execute("UPDATE conversations SET legacy_members = NULL "
                       "WHERE conversation_id = %s", (cid,))
    scene.conn.execute("DELETE FROM members WHERE conversation_id = %s AND account_id <> %s",
                       (cid, alice))
    drop_from_cloud(scene.conn, guids[1:3])
    drop_at_home(scene, "chat-a", guids[5:6])
    report, _ = scene.reconcile()
    assert (report.confirmed, report.repaired, report.failed) == (3, 3, 0) and report.clean
    home = scene.net.supernodes[scene.net.ring.home_of("chat-a")]
    assert guids[5] in {m.guid for m in home.history("chat-a")}


def test_messages_lost_by_a_restarted_supernode_are_injected_back(scene):
    """A home supernode that lost its history gets the messages back from the cloud."""
    guids = scene.chat("chat-a", 12)
    scene.mirror()
    home = scene.net.ring.home_of("chat-a")
    scene.net.wait(scene.net.supernodes[home].crash())
    scene.net.wait(scene.net.supernodes[home].restart())
    assert scene.net.supernodes[home].history("chat-a") == []
    report, _ = scene.reconcile()
    assert report.confirmed == 12 and report.repaired == 12
    restored = scene.net.supernodes[home].history("chat-a")
    assert sorted(m.guid for m in restored) == sorted(guids)
    assert {m.origin for m in restored} == {"reconciler"}
    again, _ = scene.reconcile()
    assert again.clean


def test_a_supernode_down_during_the_run_makes_it_partial_not_an_error(scene):
    """Its chats are skipped and named; every other chat is compared and repaired; exit 3
    (differences may remain), and the next run, with the supernode back, covers the rest."""
    chats = [f"chat-{i}" for i in range(12)]
    homes = {c: scene.net.ring.home_of(c) for c in chats}
    down_chat = chats[0]
    up_chat = next(c for c in chats if homes[c] != homes[down_chat])
    scene.chat(down_chat, 4)
    lost = scene.chat(up_chat, 6, members=("carol", "dave"))[:2]
    scene.mirror()
    drop_from_cloud(scene.conn, lost)
    down = homes[down_chat]
    with scene.conn.transaction():  # a feed gap on a supernode that stays up
        findings_store.record_finding(scene.conn, "feed_gap",
                                      {"source": homes[up_chat], "gap": "expired"},
                                      int(scene.net.clock.seconds() * 1000))
    feed_gap = "SELECT state FROM reconcile_findings WHERE kind = 'feed_gap'"
    scene.net.wait(scene.net.supernodes[down].crash())
    report, _ = scene.reconcile()
    assert report.error is None and report.exit_code() == runner.EXIT_DIFFERENCES
    assert scene.conn.execute(feed_gap).fetchall() == [("open",)]  # a partial pass closes none
    assert report.detail["unreachable_supernodes"] == [down]
    assert report.detail["skipped_conversations"] == 1
    assert any(f"supernode {down} unreachable" in e for e in report.detail["errors"])
    assert report.compared == 1 and (report.confirmed, report.repaired) == (2, 2)
    scene.net.wait(scene.net.supernodes[down].restart())
    again, _ = scene.reconcile()
    # the crash lost chat 0's history: this run finds it and injects the 4 messages back
    assert again.compared == 2 and again.exit_code() == runner.EXIT_IN_SYNC
    assert again.repaired == 4 and "unreachable_supernodes" not in again.detail
    assert scene.conn.execute(feed_gap).fetchall() == [("repaired",)]


def test_every_supernode_down_compares_nothing_and_is_an_error(scene):
    """With no supernode able to list its chats nothing is compared: exit 1, not 'in sync'
    and not 'partial'."""
    scene.chat("chat-a", 3)
    scene.mirror()
    for sn in scene.net.supernodes.values():
        scene.net.wait(sn.crash())
    report, _ = scene.reconcile()
    assert report.compared == 0 and report.exit_code() == runner.EXIT_ERROR
    assert sorted(report.detail["unreachable_supernodes"]) == sorted(scene.net.supernodes)


def test_dry_run_reports_and_changes_nothing(scene):
    """--dry-run confirms the differences, repairs none, exits 3."""
    guids = scene.chat("chat-a", 10)
    scene.mirror()
    drop_from_cloud(scene.conn, guids[:2])
    report, _ = scene.reconcile(dry_run=True)
    assert report.confirmed == 2 and report.repaired == 0
    assert report.exit_code() == runner.EXIT_DIFFERENCES and not report.clean
    assert len(chat_messages(scene.conn, "chat-a")) == 8
    assert scene.conn.execute("SELECT count(*) FROM reconcile_findings").fetchone()[0] == 0


def test_descent_moves_o_k_log_n_not_the_history(scene):
    """k differences among N messages: k fetched, O(k log N) digests and listed GUIDs."""
    n, k = 1500, 6
    guids = scene.chat("chat-big", n)
    scene.mirror()
    drop_from_cloud(scene.conn, guids[100:100 + k * 200:200])
    report, rec = scene.reconcile(config=GapsConfig(margin_ms=1000, confirm_after_s=0.5,
                                                    list_at=16))
    assert report.repaired == k and rec.counters.fetched_messages == k
    levels = math.ceil(math.log(n, 16)) + 1
    assert rec.counters.digest_requests <= 1 + k * levels
    assert rec.counters.listed_guids <= k * 2 * 16
    assert rec.counters.listed_guids < n / 10


def test_an_interrupted_run_resumes_where_it_stopped(scene):
    """A stopped pass (state interrupted, exit 3 partial) is resumed by the next run, not
    restarted."""
    for i in range(6):
        scene.chat(f"chat-{i}", 2, members=(f"u{i}a", f"u{i}b"))
    scene.mirror()
    first, _ = scene.reconcile(stop_after=2)
    assert not first.completed and first.compared >= 1
    assert first.exit_code() == runner.EXIT_DIFFERENCES
    second, _ = scene.reconcile()
    assert second.resumed and second.completed
    assert first.compared + second.compared == 6
    states = [r[0] for r in scene.conn.execute(
        "SELECT state FROM reconcile_runs ORDER BY run_id")]
    assert states == ["failed", "finished"]  # the interrupted run was superseded


def test_nothing_to_compare_is_an_error_and_a_held_lock_exits_at_once(scene):
    """An empty comparison exits 1, never 'in sync'; a second run exits 4 while locked."""
    report, _ = scene.reconcile()
    assert report.compared == 0 and report.exit_code() == runner.EXIT_ERROR
    assert runner.try_lock(scene.conn, "gaps")
    try:
        locked, _ = scene.reconcile()
        assert locked.locked and locked.exit_code() == runner.EXIT_LOCKED
    finally:
        runner.unlock(scene.conn, "gaps")


def test_feed_gap_chats_go_first_and_a_full_pass_closes_their_findings(scene):
    """Open feed_gap findings put their supernode's chats first and are closed by the pass."""
    scene.chat("chat-a", 3)
    scene.mirror()
    home = scene.net.ring.home_of("chat-a")
    with scene.conn.transaction():
        findings_store.record_finding(scene.conn, "feed_gap", {"source": home, "gap": "expired"},
                                      int(scene.net.clock.seconds() * 1000))
    report, _ = scene.reconcile()
    assert report.clean and report.detail["feed_gaps_covered"] == 1
    assert scene.conn.execute("SELECT state FROM reconcile_findings").fetchone() == (
        "repaired",)


def test_an_interrupted_dry_run_does_not_make_a_real_run_skip_anything(scene):
    """A real run never resumes a dry run's progress (it would skip what was not repaired)."""
    guids = []
    for i in range(4):
        guids += scene.chat(f"chat-{i}", 2, members=(f"v{i}a", f"v{i}b"))
    scene.mirror()
    drop_from_cloud(scene.conn, guids)
    dry, _ = scene.reconcile(dry_run=True, stop_after=2)
    assert not dry.completed and dry.compared >= 1
    real, _ = scene.reconcile()
    assert not real.resumed and real.compared == 4 and real.repaired == len(guids)


def test_a_feed_gap_found_mid_pass_restarts_the_pass_instead_of_skipping(scene):
    """New gap sources between an interrupted run and its resume: the pass starts over, so
    the gap's chats are compared (not skipped) before their finding is closed."""
    per_chat = {}
    for i in range(6):
        per_chat[f"chat-{i}"] = scene.chat(f"chat-{i}", 2, members=(f"w{i}a", f"w{i}b"))
    scene.mirror()
    first, _ = scene.reconcile(stop_after=2)
    assert not first.completed
    lost_chat = "chat-4"
    drop_from_cloud(scene.conn, per_chat[lost_chat])
    with scene.conn.transaction():
        findings_store.record_finding(scene.conn, "feed_gap",
                                      {"source": scene.net.ring.home_of(lost_chat),
                                       "gap": "expired"},
                                      int(scene.net.clock.seconds() * 1000))
    second, _ = scene.reconcile()
    assert second.detail.get("restarted") and second.completed and second.compared == 6
    assert second.repaired == 2 and len(chat_messages(scene.conn, lost_chat)) == 2
    assert scene.conn.execute("SELECT state FROM reconcile_findings WHERE kind = 'feed_gap'"
                              ).fetchone() == ("repaired",)


def test_lag_override_compares_what_the_measured_lag_would_hold_back(scene):
    """A live worker reporting a 10-minute lag moves the watermark back: recent differences
    wait. --lag-ms 0 (traffic stopped, bridge drained) compares everything up to the margin."""
    guids = scene.chat("chat-a", 6)
    scene.mirror()
    drop_from_cloud(scene.conn, guids[:3])
    now_ms = int((scene.net.clock.seconds() + 15.0) * 1000)  # when reconcile() starts
    coordination_store.heartbeat_worker(scene.conn, "slow-worker", "ready", now_ms, now_ms,
                                        lag_to_cloud_ms=600_000, lag_to_legacy_ms=None,
                                        mirrored_to_cloud=0, mirrored_to_legacy=0, feeds=1,
                                        detail={})
    held_back, _ = scene.reconcile()
    assert held_back.detail["lag_ms"] == 600_000 and held_back.confirmed == 0
    report, _ = scene.reconcile(config=GapsConfig(margin_ms=1000, confirm_after_s=0.5,
                                                  lag_ms=0))
    assert report.detail["lag_ms"] == 0
    assert (report.confirmed, report.repaired) == (3, 3)


def _crash_after(scene, sn: str, compared: int):
    """An on_progress hook that crashes supernode *sn* once *compared* chats are done."""
    seen = []

    def on_progress(_text: str) -> None:
        seen.append(_text)
        if len(seen) == compared:
            scene.net.supernodes[sn].crash()
    return on_progress


def _run(scene, rec, **kw):
    d = defer.Deferred.fromCoroutine(runner.run_one(
        rec, clock=scene.net.clock, db=scene.db, lock_conn=scene.lock_conn, dry_run=False,
        max_seconds=None, **kw))
    return scene.net.wait(d, timeout=600)


def test_a_supernode_crashing_mid_pass_makes_the_run_partial_and_the_next_resumes(scene):
    """Lost mid-pass (its link refused/lost): its chats not yet covered are named, exit 3
    (not 1), the lock is released; the next run resumes with them first and, with the
    supernode back, is clean."""
    chats = [f"chat-{i:02d}" for i in range(12)]
    for i, c in enumerate(chats):
        scene.chat(c, 2, members=(f"x{i}a", f"x{i}b"))
    scene.mirror()
    homes = {c: scene.net.ring.home_of(c) for c in chats}
    victim = homes[chats[6]]  # crashed once 3 chats are compared: some of its chats later
    later = [c for c in chats[3:] if homes[c] == victim]
    assert later
    scene.net.run(15.0)
    rec = GapsReconciler(scene.links, GapsConfig(margin_ms=1000, confirm_after_s=0.5))
    first = _run(scene, rec, on_progress=_crash_after(scene, victim, 3),
                 stop_requested=lambda: rec.counters.digest_requests >= 8)
    assert first.error is None and first.exit_code() == runner.EXIT_DIFFERENCES
    assert not first.completed and not first.clean
    uncovered = first.detail["uncovered"][victim]
    assert set(uncovered) <= set(later) and uncovered and first.uncovered == len(uncovered)
    assert victim in first.detail["lost_supernodes"]
    assert runner.try_lock(scene.conn, "gaps")  # released
    runner.unlock(scene.conn, "gaps")
    scene.net.wait(scene.net.supernodes[victim].restart())
    scene.net.run(15.0)
    again = GapsReconciler(scene.links, GapsConfig(margin_ms=1000, confirm_after_s=0.5))
    second = _run(scene, again)
    assert second.resumed and second.completed and second.exit_code() == runner.EXIT_IN_SYNC
    assert second.clean and second.uncovered == 0
    # every chat compared once over the two runs, the lost ones by the second
    assert first.compared + second.compared == len(chats)
    # the crash lost the victim's history: the chats it had not covered are injected back
    for c in uncovered:
        assert len(scene.net.supernodes[victim].history(c)) == 2


def test_a_deadline_cuts_off_a_wait_on_a_silent_supernode(scene):
    """A supernode that accepts and never answers: the run ends at its deadline (not at
    the peer timeouts), interrupted, exit 3, progress saved and the lock released."""
    from twisted.internet.protocol import Factory, Protocol

    for i in range(4):
        scene.chat(f"chat-{i}", 2, members=(f"y{i}a", f"y{i}b"))
    scene.mirror()
    silent = sorted(scene.net.supernodes)[0]
    scene.net.wait(scene.net.supernodes[silent].crash())
    addr = scene.net.directory[silent]
    scene.net.wait(scene.net.net.listen(addr.host, addr.port, Factory.forProtocol(Protocol)))
    scene.links.timeout = 60.0  # a long handshake bound: only the deadline can end the wait
    report, _ = scene.reconcile(max_seconds=3.0)
    assert not report.completed and report.error is None
    assert report.exit_code() == runner.EXIT_DIFFERENCES
    started, finished, state = scene.conn.execute(
        "SELECT started_ms, finished_ms, state FROM reconcile_runs").fetchone()
    assert state == "interrupted" and finished - started <= 3000
    assert runner.try_lock(scene.conn, "gaps")
    runner.unlock(scene.conn, "gaps")


def test_a_half_open_supernode_fails_its_handshake_within_the_connect_bound(scene):
    """Accepting and never answering is 'unreachable' after the connect timeout (5 s): the
    run goes on with the rest and is partial, never hung."""
    from twisted.internet.protocol import Factory, Protocol

    for i in range(6):
        scene.chat(f"chat-{i}", 2, members=(f"z{i}a", f"z{i}b"))
    scene.mirror()
    silent = scene.net.ring.home_of("chat-0")
    scene.net.wait(scene.net.supernodes[silent].crash())
    addr = scene.net.directory[silent]
    scene.net.wait(scene.net.net.listen(addr.host, addr.port, Factory.forProtocol(Protocol)))
    report, _ = scene.reconcile()
    assert report.completed and report.exit_code() == runner.EXIT_DIFFERENCES
    assert report.detail["unreachable_supernodes"] == [silent]
    assert "chat-0" in report.detail["uncovered"][silent]
    started, finished = scene.conn.execute(
        "SELECT started_ms, finished_ms FROM reconcile_runs").fetchone()
    assert finished - started < 20_000
def feed_gap_states(conn) -> list[tuple[str, str]]:
    return conn.execute("SELECT detail->>'gap', state FROM reconcile_findings "
                        "WHERE kind = 'feed_gap' ORDER BY finding_id").fetchall()


def restart(scene, sn: str) -> None:
    """Crash *sn* (its memory and history are gone) and start it again."""
    scene.net.wait(scene.net.supernodes[sn].crash())
    scene.net.run(1.0)
    scene.net.wait(scene.net.supernodes[sn].restart())
    scene.net.run(15.0)  # devices attach again


@pytest.fixture
def small_feeds(conn, db_dsn):
    s = Scene(conn, db_dsn, feed_capacity=10)
    yield s
    s.lock_conn.close()


def test_an_epoch_gap_is_unrecoverable_and_a_wrapped_prefix_is_repaired(small_feeds):
    """Issue 17, case 5: messages acknowledged by a supernode that crashed before the bridge
    read them died with its memory: the old epoch's gap is closed 'unrecoverable' by a clean
    pass, never 'repaired'; the new epoch's wrapped prefix (its messages still in the
    supernode's history) is fetched by the same pass and closed 'repaired'. Status reports
    the unrecoverable apart."""
    scene = small_feeds
    home = scene.net.ring.home_of("chat-a")
    kept = scene.chat("chat-a", 3)
    scene.mirror()
    died = scene.chat("chat-a", 2)  # acknowledged, never read by the bridge: then the crash
    restart(scene, home)
    wrapped_chat = scene.net.chat_homed_at(home, "wrapped")
    wrapped = scene.chat(wrapped_chat, 15, members=("carol", "dave"))
    scene.mirror()
    assert feed_gap_states(scene.conn) == [("epoch", "open"), ("expired", "open")]
    assert not set(wrapped) <= {r[1] for r in chat_messages(scene.conn, wrapped_chat)}

    report, _ = scene.reconcile()
    assert report.clean and report.exit_code() == runner.EXIT_IN_SYNC
    assert report.detail["feed_gaps_covered"] == 2
    assert report.detail["feed_gaps_unrecoverable"] == 1
    assert feed_gap_states(scene.conn) == [("epoch", "unrecoverable"), ("expired", "repaired")]
    # each names the conversations the pass repaired at that supernode
    named = {str(ids.conversation_id(c)) for c in ("chat-a", wrapped_chat)}
    assert [set(r[0]) for r in scene.conn.execute(
        "SELECT detail->'repaired_conversations' FROM reconcile_findings "
        "WHERE kind = 'feed_gap' ORDER BY finding_id")] == [named, named]
    assert sorted(r[1] for r in chat_messages(scene.conn, wrapped_chat)) == sorted(wrapped)
    # what the cloud had went back to legacy; what only the lost incarnation had is gone
    assert {r[1] for r in chat_messages(scene.conn, "chat-a")} == set(kept)
    assert not set(died) & {m.guid for m in scene.net.supernodes[home].history("chat-a")}
    now_ms = int(scene.net.clock.seconds() * 1000)
    seen = status.gather(scene.conn, now_ms)
    assert seen["unrecoverable_findings"] == {"feed_gap": 1}
    assert "feed_gap" not in seen["open_findings"]
    assert seen["findings"]["feed_gap"]["unrecoverable"] == 1
    assert "unrecoverable: feed_gap 1" in status.render(seen)
    again, _ = scene.reconcile()  # a later clean pass does not call it repaired either
    assert again.clean and feed_gap_states(scene.conn) == [("epoch", "unrecoverable"),
                                                           ("expired", "repaired")]


DAY_S = 86400.0
RETENTION_S = 30 * DAY_S


@pytest.fixture
def month(conn, db_dsn):
    """A scene whose supernodes keep the real 30 days of history (swept every 10 min; the
    presence refresh hourly, so a month of simulated time runs in seconds)."""
    s = Scene(conn, db_dsn, sweep_interval=600.0, refresh_interval=3600.0,
              presence_ttl=7200.0)
    yield s
    s.lock_conn.close()


def run_to(scene, t: float) -> None:
    """Move the simulated clock to *t* (minus the 15 s ``Scene.reconcile`` runs first), so
    that the next pass starts at *t*."""
    assert scene.net.clock.seconds() < t - 15.0
    scene.net.run_until(t - 15.0)


def test_the_window_stays_inside_legacy_retention_over_a_month(month):
    """Issue 17, case 3, on the simulated clock: a pass compares only what is younger than
    the legacy retention less the margin. At the boundary (inside) a message legacy lost is
    re-injected; 10 s before it ages out on legacy it is left out, so its re-injection is not
    refused and the run is clean; one that ages past the floor between the two looks is not
    'missing' and not re-injected; after more than 30 days of operation a run is clean."""
    scene = month
    scene.net.run_until(DAY_S)
    old = scene.chat("chat-old", 4)
    old_ts = max(m.ts_ms for m in scene.net.supernodes[scene.net.ring.home_of("chat-old")]
                 .history("chat-old")) / 1000
    home = scene.net.ring.home_of("chat-old")
    scene.net.run_until(2 * DAY_S)
    new_chat = scene.net.chat_homed_at(home, "new")
    new = scene.chat(new_chat, 4, members=("carol", "dave"))
    new_ts = max(m.ts_ms for m in scene.net.supernodes[home].history(new_chat)) / 1000
    scene.mirror()
    config = GapsConfig(margin_ms=1000, confirm_after_s=30.0)

    restart(scene, home)  # legacy lost both chats' history; the cloud has it
    run_to(scene, old_ts + RETENTION_S - 3600 - 60)  # chat-old just inside the window
    inside, _ = scene.reconcile(config=config)
    assert inside.clean and inside.repaired == 8 and inside.failed == 0
    assert inside.detail["since_clamped_to_retention"]  # --since 30d reaches past it
    assert inside.detail["retention_floor_ms"] <= min(
        m.ts_ms for m in scene.net.supernodes[home].history("chat-old"))

    restart(scene, home)
    run_to(scene, old_ts + RETENTION_S - 10)  # chat-old ages out during this pass
    edge, _ = scene.reconcile(config=config)
    assert edge.clean and edge.exit_code() == runner.EXIT_IN_SYNC
    assert (edge.confirmed, edge.repaired, edge.failed) == (4, 4, 0)  # chat-new only
    assert edge.detail["since_clamped_to_retention"]
    assert not {m.guid for m in scene.net.supernodes[home].history("chat-old")} & set(old)
    assert {m.guid for m in scene.net.supernodes[home].history(new_chat)} == set(new)

    # a thin margin lets chat-new into the window 20 s before it ages out; the second look,
    # 30 s later, finds it past the floor: not missing, not re-injected
    restart(scene, home)
    run_to(scene, new_ts + RETENTION_S - 20)
    thin = attrs.evolve(config, retention_margin_ms=5_000)
    aged, _ = scene.reconcile(config=thin)
    assert aged.suspects == 4 and aged.detail["aged_out"] == 4
    assert (aged.confirmed, aged.repaired, aged.failed) == (0, 0, 0) and aged.clean
    assert scene.net.supernodes[home].history(new_chat) == []

    # 31 days on: new traffic, and a default run is clean
    assert scene.net.clock.seconds() > RETENTION_S + 2 * DAY_S
    recent = scene.chat("chat-recent", 3, members=("erin", "frank"))
    scene.mirror()
    later, _ = scene.reconcile()
    assert later.clean and later.confirmed == 0 and later.failed == 0
    assert len(chat_messages(scene.conn, "chat-recent")) == len(recent)


def test_a_short_window_closes_only_the_feed_gaps_it_reached(scene):
    """A pass with --since 2h compares recent history only: it closes a feed gap whose
    losses are younger than its window (detail.lost_after_ms), and leaves open one whose
    losses may be older, or of unknown age, until a pass over the whole retention."""
    scene.chat("chat-a", 3)
    scene.mirror()
    home = scene.net.ring.home_of("chat-a")
    scene.net.run_until(DAY_S)
    now_ms = int(scene.net.clock.seconds() * 1000)
    with scene.conn.transaction():
        for lost_after in (now_ms - 1_800_000, now_ms - 3 * 3_600_000, None):
            detail = {"source": home, "gap": "expired"}
            if lost_after is not None:
                detail["lost_after_ms"] = lost_after
            findings_store.record_finding(scene.conn, "feed_gap", detail, now_ms)
    recent, _ = scene.reconcile(config=GapsConfig(margin_ms=1000, confirm_after_s=0.5,
                                                  since_ms=2 * 3_600_000))
    assert recent.clean and recent.detail["feed_gaps_covered"] == 1
    assert feed_gap_states(scene.conn) == [("expired", "repaired"), ("expired", "open"),
                                           ("expired", "open")]
    whole, _ = scene.reconcile()
    assert whole.clean and whole.detail["feed_gaps_covered"] == 2
    assert [s for _, s in feed_gap_states(scene.conn)] == ["repaired"] * 3
