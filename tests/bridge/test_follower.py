"""legacy -> cloud: feed followers on the deterministic legacy network and a real PostgreSQL."""

from __future__ import annotations

import random
import weakref

import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer

from bridge import follower as follower_module
from bridge import ids
from bridge.follower import FeedFollower, FollowerConfig
from cloud.db import InlineDatabase
from cloud.store import coordination as coordination_store
from legacy import wire
from servicekit.retry import RetryPolicy
from tests.dbfixture import ScriptedDatabase
from tests.legacy.netfixture import PEER_SECRET, LegacyNet

FAST = FollowerConfig(window=50, max_batch=20, linger_s=0.01,
                      retry=RetryPolicy(initial_s=0.2, factor=2.0, cap_s=2.0, jitter=0.0))


class Bridge:
    """One follower per supernode of *net*, all writing through *db*."""

    def __init__(self, net: LegacyNet, db, config: FollowerConfig = FAST) -> None:
        self.followers = {
            sn: FeedFollower(net.clock, net.net, addr, db, worker_id="test-bridge",
                             secret=PEER_SECRET, rng=random.Random(7), config=config,
                             supernodes=lambda: tuple(net.directory))
            for sn, addr in net.directory.items()}

    def start(self) -> Bridge:
        for f in self.followers.values():
            f.startService()
        return self

    def stop(self, net: LegacyNet) -> None:
        net.wait(defer.gatherResults([f.stopService() for f in self.followers.values()]))


@pytest.fixture
def net():
    return LegacyNet(4, seed=3).start()


def chat_messages(conn, chat_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT seq, legacy_guid, sender_handle, body, origin FROM messages "
        "WHERE conversation_id = %s ORDER BY seq", (ids.conversation_id(chat_id),)).fetchall()


def send_some(net, n: int, chat: str = "chat-1") -> tuple[list[str], tuple]:
    alice, bob = net.add_user("alice"), net.add_user("bob")
    da, db_ = net.device(alice), net.device(bob)
    net.online(da, db_)
    members = ("alice", "bob")
    guids = [da.send(chat, members, f"hello {i}") for i in range(n)]
    net.run(2.0)
    return guids, members


def test_messages_accounts_and_chats_are_mirrored_in_source_order(net, conn):
    """Legacy messages land once in the cloud, in legacy order, with accounts and members."""
    guids, members = send_some(net, 30)
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    home = net.supernodes[net.ring.home_of("chat-1")].history("chat-1")
    expected = [m.guid for m in sorted(home, key=lambda m: m.legacy_seq)]
    rows = chat_messages(conn, "chat-1")
    assert [r[1] for r in rows] == expected and sorted(expected) == sorted(guids)
    assert [r[0] for r in rows] == list(range(1, 31))
    assert {r[4] for r in rows} == {"legacy"}
    member_handles = {r[0] for r in conn.execute(
        "SELECT a.handle FROM members m JOIN accounts a USING (account_id) "
        "WHERE m.conversation_id = %s", (ids.conversation_id("chat-1"),))}
    assert member_handles == set(members)
    assert conn.execute("SELECT phase FROM accounts WHERE handle = 'alice'").fetchone() == (
        "legacy",)
    cps = coordination_store.load_checkpoints(conn)
    for sn, node in net.supernodes.items():  # every feed with entries is checkpointed at its end
        if node.mem.feed.next_offset:
            assert (cps[sn].epoch, cps[sn].offset) == (str(node.mem.epoch),
                                                       node.mem.feed.next_offset)
    bridge.stop(net)


def test_a_restart_from_the_checkpoint_and_a_full_replay_change_nothing(net, conn):
    """Restarting resumes at the checkpoint; replaying the whole feed duplicates nothing."""
    send_some(net, 25)
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    bridge.stop(net)
    before = conn.execute("SELECT conversation_id, seq, message_id FROM messages "
                          "ORDER BY 1, 2").fetchall()
    notifications = conn.execute("SELECT count(*) FROM notifications").fetchone()[0]
    again = Bridge(net, InlineDatabase(conn)).start()
    net.run(2.0)
    assert sum(f.mirrored + f.duplicates for f in again.followers.values()) == 0
    again.stop(net)
    conn.execute("DELETE FROM bridge_checkpoints")  # forget everything: replay from 0
    replay = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    replay.stop(net)
    assert sum(f.mirrored for f in replay.followers.values()) == 0
    assert sum(f.duplicates for f in replay.followers.values()) == 25
    assert conn.execute("SELECT conversation_id, seq, message_id FROM messages "
                        "ORDER BY 1, 2").fetchall() == before
    assert conn.execute("SELECT count(*) FROM notifications").fetchone()[0] == notifications


def test_injected_messages_are_not_mirrored_back(net, conn):
    """A message injected with a non-legacy origin (from the cloud) never returns to it."""
    send_some(net, 3)
    home = net.ring.home_of("chat-1")
    peer = net.peer(home)
    net.wait(peer.inject_message(
        wire.ChatMessage(chat_id="chat-1", guid="cloud:x", legacy_seq=0, sender="alice",
                         ts_ms=int(net.clock.seconds() * 1000), body="from the cloud",
                         origin="cloud"), ("alice", "bob")))
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    rows = chat_messages(conn, "chat-1")
    assert len(rows) == 3 and "cloud:x" not in {r[1] for r in rows}
    bridge.stop(net)


def test_a_supernode_restart_is_recorded_as_a_feed_gap(net, conn):
    """A supernode that lost its memory gives a feed_gap finding naming the lost range."""
    send_some(net, 5)
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    home = net.ring.home_of("chat-1")
    net.wait(net.supernodes[home].crash())
    net.run(1.0)
    net.wait(net.supernodes[home].restart())
    net.run(10.0)
    gaps = conn.execute("SELECT detail->>'source', detail->>'gap', "
                        "(detail->>'lost_after_ms')::bigint, source, detail->'ring' "
                        "FROM reconcile_findings WHERE kind = 'feed_gap'").fetchall()
    # what the restart lost was appended after the last message this follower had read;
    # scoped to the supernode as a whole, with the ring its conversations were homed on
    last_read = conn.execute("SELECT max(sent_ms) FROM messages").fetchone()[0]
    assert (home, "epoch", last_read, home, sorted(net.directory)) in gaps
    cp = coordination_store.load_checkpoints(conn)[home]
    assert int(cp.epoch) == net.supernodes[home].mem.epoch
    bridge.stop(net)


def test_database_outage_holds_the_feed_and_loses_nothing(net, conn):
    """While the store is down the follower retries with backoff; afterwards all is there."""
    send_some(net, 12)
    bridge = Bridge(net, ScriptedDatabase.down_for(InlineDatabase(conn), 6)).start()
    net.run(15.0)
    assert len(chat_messages(conn, "chat-1")) == 12
    bridge.stop(net)


class HeldDatabase:
    """Commits wait until released: a store slower than the feed."""

    def __init__(self, inner) -> None:
        self.inner, self.held = inner, []

    def run(self, desc, fn, *args, **kwargs):
        if fn.__name__ != "commit_plan":
            return self.inner.run(desc, fn, *args, **kwargs)
        d = defer.Deferred()
        self.held.append((d, desc, fn, args, kwargs))
        return d

    def release(self):
        held, self.held = self.held, []
        for d, desc, fn, args, kwargs in held:
            self.inner.run(desc, fn, *args, **kwargs).chainDeferred(d)


def test_a_slow_store_stops_the_feed_at_the_credit_window(net, conn, monkeypatch):
    """With commits stalled the supernode sends at most the window: memory stays bounded."""
    # the gauge sums this test's followers only (others' may be collected at any moment)
    monkeypatch.setattr(follower_module, "_FOLLOWERS", weakref.WeakSet())
    send_some(net, 120)
    held = HeldDatabase(InlineDatabase(conn))
    bridge = Bridge(net, held).start()
    net.run(3.0)
    home = net.ring.home_of("chat-1")
    follower = bridge.followers[home]
    [sub] = net.supernodes[home].mem.feed_subs
    feed = net.supernodes[home].mem.feed
    # the supernode holds the rest back: no credit left, entries still unsent
    assert sub.credit == 0 and sub.next < feed.next_offset
    in_memory = (follower._pending.frames if follower._pending else 0) + FAST.max_batch
    assert in_memory <= FAST.window
    # the backlog gauge counts what was received and is not committed: the full window
    assert follower.backlog == FAST.window
    assert to_cloud_backlog() == sum(f.backlog for f in bridge.followers.values())
    for _ in range(40):
        held.release()
        net.run(0.1)
    assert len(chat_messages(conn, "chat-1")) == 120
    assert to_cloud_backlog() == 0
    bridge.stop(net)


def to_cloud_backlog() -> float:
    return REGISTRY.get_sample_value("bridge_backlog_messages", {"direction": "to_cloud"})


def test_stopping_during_a_database_outage_finishes_promptly(net, conn):
    """A follower waiting to retry a commit stops at once; nothing is lost, it replays."""
    send_some(net, 5)
    bridge = Bridge(net, ScriptedDatabase.down_for(InlineDatabase(conn), 10_000)).start()
    net.run(5.0)  # commits keep failing: the follower sits in its retry wait
    stopped = defer.gatherResults([f.stopService() for f in bridge.followers.values()])
    net.run(0.1)
    assert stopped.called
    again = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    assert len(chat_messages(conn, "chat-1")) == 5
    again.stop(net)


def feed_gaps(conn) -> list[tuple]:
    return conn.execute(
        "SELECT detail->>'source', detail->>'gap', (detail->>'gap_epoch')::numeric, "
        "(detail->>'gap_from')::bigint, (detail->>'gap_to')::bigint, state "
        "FROM reconcile_findings WHERE kind = 'feed_gap' ORDER BY finding_id").fetchall()


def feed_retries() -> float:
    return REGISTRY.get_sample_value("bridge_retries_total", {"what": "feed"}) or 0.0


def test_a_feed_behind_its_checkpoint_is_a_gap_read_from_its_start_not_a_loop(net, conn):
    """Issue 17, case 2: a network started again with the same seed (epochs from the seed
    alone, as before run ids) against the same store. The feed is behind the checkpoint in
    the same epoch: one 'ahead' feed_gap with the range, the new feed read from its start,
    no refused subscription to loop on, and nothing skipped once it grows past the old
    offset."""
    send_some(net, 30)
    first = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    first.stop(net)
    home = net.ring.home_of("chat-1")
    old = coordination_store.load_checkpoints(conn)[home]

    again = LegacyNet(4, seed=3).start()  # the same seed: the same epochs
    assert again.supernodes[home].epoch == int(old.epoch)
    again.rng.getrandbits(64)  # other devices than the first run's: other GUIDs
    chat = again.chat_homed_at(home, "again")
    early, _ = send_some(again, 5, chat=chat)
    assert again.supernodes[home].mem.feed.next_offset < old.offset
    retries = feed_retries()
    bridge = Bridge(again, InlineDatabase(conn)).start()
    again.run(5.0)
    assert feed_gaps(conn) == [(home, "ahead", int(old.epoch), old.offset, 0, "open")]
    follower = bridge.followers[home]
    assert follower.connected and feed_retries() == retries  # subscribed once, streaming
    assert [r[1] for r in chat_messages(conn, chat)] == early  # read from the feed's start
    # the feed grows past the old checkpoint: every entry is read, none skipped
    alice = again.device(again.add_user("alice2"))
    again.online(alice)
    later = [alice.send(chat, ("alice2", "bob"), f"later {i}") for i in range(40)]
    again.run(5.0)
    assert again.supernodes[home].mem.feed.next_offset > old.offset
    assert sorted(r[1] for r in chat_messages(conn, chat)) == sorted(early + later)
    assert len(feed_gaps(conn)) == 1 and feed_retries() == retries
    cp = coordination_store.load_checkpoints(conn)[home]
    assert cp.offset == again.supernodes[home].mem.feed.next_offset
    bridge.stop(again)


def test_an_epoch_gap_on_a_wrapped_feed_records_the_new_epochs_prefix_too(conn):
    """Issue 17, case 5: a supernode restarts and its new feed wraps before the bridge is
    back. Besides the old epoch's tail, [0, first_offset) of the new epoch is a gap of its
    own ('expired', with that range), never silently skipped."""
    net = LegacyNet(4, seed=3, feed_capacity=10).start()
    send_some(net, 5)
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    bridge.stop(net)
    home = net.ring.home_of("chat-1")
    old = coordination_store.load_checkpoints(conn)[home]
    sn = net.supernodes[home]
    net.wait(sn.crash())
    net.run(1.0)
    net.wait(sn.restart())
    net.run(15.0)  # the devices attach again
    carol, dave = net.add_user("carol"), net.add_user("dave")
    dc, dd = net.device(carol), net.device(dave)
    net.online(dc, dd)
    chat = net.chat_homed_at(home, "wrapped")
    after = [dc.send(chat, ("carol", "dave"), f"after {i}") for i in range(15)]
    net.run(3.0)
    feed = sn.mem.feed
    assert feed.first_offset > 0
    again = Bridge(net, InlineDatabase(conn)).start()
    net.run(3.0)
    assert feed_gaps(conn) == [
        (home, "epoch", int(old.epoch), old.offset, 0, "open"),
        (home, "expired", sn.epoch, 0, feed.first_offset, "open")]
    mirrored = {r[1] for r in chat_messages(conn, chat)}
    # what the buffer still held is mirrored; what it had dropped waits for the reconciler
    assert {f.message.guid for f in (feed.get(o) for o in range(feed.first_offset,
                                                                  feed.next_offset))
            if isinstance(f, wire.FeedMessage)} <= mirrored
    assert not set(after) <= mirrored
    again.stop(net)


class CountingDatabase:
    """Counts the commits (``commit_plan`` transactions) that pass through."""

    def __init__(self, inner) -> None:
        self.inner, self.commits = inner, 0

    def run(self, desc, fn, *args, **kwargs):
        if fn.__name__ == "commit_plan":
            self.commits += 1
        return self.inner.run(desc, fn, *args, **kwargs)


def inject_echoes(net, n: int, chat: str = "chat-1") -> None:
    peer = net.peer(net.ring.home_of(chat))
    ts = int(net.clock.seconds() * 1000)
    net.wait(defer.gatherResults([peer.inject_message(
        wire.ChatMessage(chat_id=chat, guid=f"cloud:echo-{i}", legacy_seq=0, sender="alice",
                         ts_ms=ts, body="from the cloud", origin="cloud"), ("alice", "bob"))
        for i in range(n)]))


def test_echoes_are_credited_without_a_commit_and_checkpointed_later(net, conn):
    """Injected messages coming back on the feed pass the credit window with no transaction
    each; one checkpoint write covers them within echo_checkpoint_s."""
    config = FollowerConfig(window=50, max_batch=20, linger_s=0.01, echo_checkpoint_s=2.0,
                            retry=FAST.retry)
    send_some(net, 5)
    db = CountingDatabase(InlineDatabase(conn))
    bridge = Bridge(net, db, config).start()
    net.run(2.0)
    home = net.ring.home_of("chat-1")
    feed = net.supernodes[home].mem.feed
    before = db.commits
    assert coordination_store.load_checkpoints(conn)[home].offset == feed.next_offset
    inject_echoes(net, 120)  # more than the window: it passes only if credit comes back
    net.run(1.0)
    [sub] = net.supernodes[home].mem.feed_subs
    assert sub.next == feed.next_offset  # every echo was sent: credit came without commits
    assert db.commits == before
    assert bridge.followers[home].checkpoint.offset == feed.next_offset
    assert coordination_store.load_checkpoints(conn)[home].offset < feed.next_offset
    net.run(1.5)  # past echo_checkpoint_s: one write of the checkpoint
    assert db.commits == before + 1
    assert coordination_store.load_checkpoints(conn)[home].offset == feed.next_offset
    assert len(chat_messages(conn, "chat-1")) == 5  # nothing mirrored back
    bridge.stop(net)


def test_the_supernode_leaves_echoes_out_and_the_follower_credits_their_runs(
        net, conn, monkeypatch):
    """The follower subscribes for legacy's own entries: injected messages come as
    FeedSkipped runs (one per InjectBatch), never as messages to decode, and the checkpoint
    moves past them with no commit each."""
    frames: list = []
    on_frame = FeedFollower._on_frame
    monkeypatch.setattr(FeedFollower, "_on_frame",
                        lambda self, f: (frames.append(f), on_frame(self, f))[1])
    send_some(net, 5)
    db = CountingDatabase(InlineDatabase(conn))
    bridge = Bridge(net, db).start()
    net.run(2.0)
    home = net.ring.home_of("chat-1")
    feed = net.supernodes[home].mem.feed
    before, seen = db.commits, len(frames)
    loops = REGISTRY.get_sample_value("bridge_loop_suppressed_total",
                                      {"direction": "to_cloud"}) or 0
    peer = net.peer(home)
    ts = int(net.clock.seconds() * 1000)
    net.wait(peer.inject_batch("chat-1", ("alice", "bob"), [
        wire.ChatMessage(chat_id="chat-1", guid=f"cloud:b-{i}", legacy_seq=0, sender="alice",
                         ts_ms=ts, body="from the cloud", origin="cloud") for i in range(64)]))
    net.run(0.5)
    assert [(type(f), f.next_offset - f.offset) for f in frames[seen:]] == [
        (wire.FeedSkipped, 64)]
    assert bridge.followers[home].checkpoint.offset == feed.next_offset
    assert db.commits == before
    assert REGISTRY.get_sample_value("bridge_loop_suppressed_total",
                                     {"direction": "to_cloud"}) == loops + 64
    assert not any(isinstance(f, wire.FeedMessage) and f.message.origin != "legacy"
                   for f in frames)
    assert len(chat_messages(conn, "chat-1")) == 5
    # every skipped run's credit came back: the supernode holds the whole window again
    [sub] = net.supernodes[home].mem.feed_subs
    assert sub.credit == FAST.window and bridge.followers[home].backlog == 0
    bridge.stop(net)


@pytest.mark.parametrize("run", ["empty", "ahead", "behind"])
def test_a_skipped_run_not_at_the_followers_offset_closes_the_feed_connection(
        net, conn, run):
    """A FeedSkipped that covers no offset, or does not start where the follower is (it
    would skip entries unread, or move the checkpoint back), is a protocol violation: the
    follower drops that connection and moves nothing."""
    send_some(net, 2)
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(2.0)
    home = net.ring.home_of("chat-1")
    follower = bridge.followers[home]
    at = follower.checkpoint.offset
    assert at >= 2
    peer = follower.peer
    start, end = {"empty": (at, at), "ahead": (at + 1, at + 5), "behind": (at - 2, at + 5)}[run]
    peer.frame_arrived(wire.FeedSkipped(offset=start, next_offset=end))
    assert peer.rejected == "bad_skip"
    assert follower.checkpoint.offset == at
    assert follower._pending is None or follower._pending.frames == 0
    net.run(3.0)  # it reconnects and reads on from its checkpoint
    assert follower.peer is not None and follower.peer is not peer
    assert follower.checkpoint.offset == at
    assert len(chat_messages(conn, "chat-1")) == 2
    bridge.stop(net)


def test_a_supernode_without_subscribe_only_is_followed_whole(net, conn, monkeypatch):
    """A supernode older than FeedSubscribeOnly refuses it as an unknown frame type: the
    follower subscribes for the whole feed from then on and drops the echoes itself."""
    from legacy.framing import ProtocolViolation
    from legacy.supernode import peer_api

    def unknown(api, proto, f):
        raise ProtocolViolation("unknown_type", "unknown frame type 0x46")

    monkeypatch.setitem(peer_api.PEER_HANDLERS, wire.FeedSubscribeOnly, unknown)
    send_some(net, 3)
    inject_echoes(net, 4)
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(5.0)
    home = net.ring.home_of("chat-1")
    [sub] = net.supernodes[home].mem.feed_subs
    assert sub.only_origin is None
    assert bridge.followers[home].checkpoint.offset == net.supernodes[home].mem.feed.next_offset
    rows = chat_messages(conn, "chat-1")
    assert len(rows) == 3 and not any(r[1].startswith("cloud:") for r in rows)
    bridge.stop(net)


def test_a_clean_stop_writes_the_checkpoint_echoes_moved(net, conn):
    """A stop before echo_checkpoint_s still leaves the checkpoint at the feed's end."""
    config = FollowerConfig(window=50, max_batch=20, linger_s=0.01, echo_checkpoint_s=60.0,
                            retry=FAST.retry)
    send_some(net, 5)
    bridge = Bridge(net, InlineDatabase(conn), config).start()
    net.run(2.0)
    inject_echoes(net, 30)
    net.run(0.5)
    home = net.ring.home_of("chat-1")
    assert coordination_store.load_checkpoints(conn)[home].offset < (
        net.supernodes[home].mem.feed.next_offset)
    bridge.stop(net)
    assert coordination_store.load_checkpoints(conn)[home].offset == (
        net.supernodes[home].mem.feed.next_offset)


def test_a_legacy_message_after_echoes_commits_the_later_checkpoint(net, conn):
    """A batch that mirrors something carries the echoes' checkpoint with its own: the
    echo timer then writes nothing more."""
    config = FollowerConfig(window=50, max_batch=20, linger_s=0.01, echo_checkpoint_s=5.0,
                            retry=FAST.retry)
    alice, bob = net.add_user("alice"), net.add_user("bob")
    da, db_ = net.device(alice), net.device(bob)
    net.online(da, db_)
    for i in range(2):
        da.send("chat-1", ("alice", "bob"), f"hello {i}")
    db = CountingDatabase(InlineDatabase(conn))
    bridge = Bridge(net, db, config).start()
    net.run(2.0)
    inject_echoes(net, 10)
    net.run(0.5)
    before = db.commits
    da.send("chat-1", ("alice", "bob"), "a legacy one")
    net.run(0.5)
    home = net.ring.home_of("chat-1")
    assert coordination_store.load_checkpoints(conn)[home].offset == (
        net.supernodes[home].mem.feed.next_offset)
    commits = db.commits
    assert commits > before
    net.run(6.0)  # the echo timer was cancelled by that commit
    assert db.commits == commits
    assert len(chat_messages(conn, "chat-1")) == 3
    bridge.stop(net)


def legacy_presence(conn) -> dict[str, str]:
    return dict(conn.execute(
        "SELECT a.handle, p.status FROM presence p JOIN accounts a USING (account_id) "
        "WHERE p.source LIKE %s", (ids.LEGACY_PRESENCE_PREFIX + "%",)).fetchall())


def test_presence_alone_lingers_and_a_message_commits_it_within_linger_s(net, conn):
    """With presence_linger_s, a batch of nothing but presence waits that long for more
    frames (one commit for what arrives meanwhile); a message joining it commits the batch,
    presence included, within linger_s."""
    config = FollowerConfig(window=50, max_batch=20, linger_s=0.01, presence_linger_s=30.0,
                            retry=FAST.retry)
    db = CountingDatabase(InlineDatabase(conn))
    bridge = Bridge(net, db, config).start()
    net.run(2.0)
    alice, bob = net.add_user("alice"), net.add_user("bob")
    net.online(net.device(alice))
    net.run(1.0)
    assert db.commits == 0 and legacy_presence(conn) == {}  # lingering, not lost
    net.online(net.device(bob))
    net.run(30.0)
    assert legacy_presence(conn) == {"alice": "online", "bob": "online"}
    assert 1 <= db.commits <= 2  # one per feed that carried presence, not one per change
    carol, dave = net.add_user("carol"), net.add_user("dave")
    dc = net.device(carol)
    net.online(dc, net.device(dave))
    before = db.commits
    net.run(0.5)
    assert db.commits == before
    dc.send("chat-1", ("carol", "dave"), "hello")
    net.run(0.5)  # the message's feed commits within linger_s, with its presence
    assert len(chat_messages(conn, "chat-1")) == 1
    assert db.commits > before
    net.run(30.0)
    assert set(legacy_presence(conn)) == {"alice", "bob", "carol", "dave"}
    bridge.stop(net)


def test_a_batch_that_came_due_during_a_commit_commits_when_it_ends(net, conn):
    """A batch's linger counts from its frames' arrival: presence that waited out its
    presence_linger_s behind a slow commit goes linger_s after that commit ends, not a whole
    presence linger later; and not at once either (a timer of 0 ran before the reactor read
    the frames waiting in its sockets, which then waited a whole commit more)."""
    config = FollowerConfig(window=50, max_batch=20, linger_s=0.01, presence_linger_s=30.0,
                            retry=FAST.retry)
    held = HeldDatabase(InlineDatabase(conn))
    bridge = Bridge(net, held, config).start()
    net.run(2.0)
    home = net.ring.home_of("chat-1")  # every device here: one feed carries it all
    alice, bob, carol = (net.add_user(h) for h in ("alice", "bob", "carol"))
    da = net.device(alice, at=home)
    net.online(da, net.device(bob, at=home))
    da.send("chat-1", ("alice", "bob"), "hello")
    net.run(1.0)
    assert [c[1] for c in held.held] == ["commit_plan"]  # the message's commit, held
    net.online(net.device(carol, at=home))  # presence alone, behind the held commit
    net.run(40.0)  # its 30 s linger runs out while that commit is still held
    assert bridge.followers[home]._pending.presence
    held.release()  # the message's commit ends ...
    net.run(0.005)  # ... the presence batch, due 10 s ago, waits linger_s (0.01 s) ...
    assert held.held == []
    net.run(0.05)   # ... then starts
    assert [c[1] for c in held.held] == ["commit_plan"]
    held.release()
    net.run(0.05)
    assert len(chat_messages(conn, "chat-1")) == 1
    assert legacy_presence(conn)["carol"] == "online"
    bridge.stop(net)


def test_presence_linger_defaults_to_linger_s(net, conn):
    """Without presence_linger_s (production's default), presence commits as fast as
    anything else: within linger_s of its arrival, with nothing else in the batch."""
    assert FollowerConfig().presence_linger_s is None
    with pytest.raises(ValueError):
        FollowerConfig(presence_linger_s=-1.0)
    config = FollowerConfig(window=50, max_batch=20, linger_s=0.01, retry=FAST.retry)
    db = CountingDatabase(InlineDatabase(conn))
    bridge = Bridge(net, db, config).start()
    net.run(2.0)
    net.online(net.device(net.add_user("alice")))
    net.run(0.5)
    assert legacy_presence(conn) == {"alice": "online"} and db.commits >= 1
    bridge.stop(net)
