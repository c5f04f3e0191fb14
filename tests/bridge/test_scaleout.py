"""Several bridge workers share the feeds through leases with fencing tokens."""

from __future__ import annotations

import random

import psycopg
import pytest

from bridge import mirror
from bridge.follower import FeedBatch, FollowerConfig
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import InlineDatabase
from cloud.store import accounts as accounts_store
from cloud.store import coordination as coordination_store
from cloud.store import messages as messages_store
from cloud.store.errors import StaleFence
from legacy import wire
from tests.bridge.test_follower import chat_messages
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet


def commit_feed_batch(conn, batch: FeedBatch, fence: int, now_ms: int, lease) -> None:
    """What a follower commits for *batch*: its accounts, then the plan under *lease*."""
    changes = batch.changes(fence)
    known = mirror.KnownIds()
    found, _ = mirror.ensure_accounts(conn, mirror.new_handles(changes, known))
    known.learn(found, {})
    mirror.commit_plan(conn, mirror.translate(changes, known), now_ms, lease=lease,
                       fence=fence)


def make_worker(net: LegacyNet, dsn: str, worker_id: str) -> BridgeWorker:
    conn = psycopg.connect(dsn, autocommit=True)
    config = WorkerConfig(worker_id=worker_id, bootstrap_host=HOST,
                          bootstrap_port=net.login_port, heartbeat_s=1.0, lease_ttl_s=3.0,
                          follower=FollowerConfig(linger_s=0.01))
    return BridgeWorker(net.clock, net.net, InlineDatabase(conn), PEER_SECRET,
                        random.Random(worker_id), config)


def kill(worker: BridgeWorker) -> None:
    """SIGKILL, as far as the others can tell: no drain, no lease release, no last words."""
    worker.crash()
    assert not worker.running and not worker.followers


def test_two_workers_split_the_feeds_and_one_takes_over_when_the_other_dies(conn, db_dsn):
    """Each feed is followed by exactly one worker; a dead worker's feeds move within the
    lease time, and nothing sent meanwhile is lost or duplicated."""
    net = LegacyNet(6, seed=8).start()
    a, b = make_worker(net, db_dsn, "wa"), make_worker(net, db_dsn, "wb")
    a.startService()
    b.startService()
    net.run(8.0)
    feeds_a, feeds_b = set(a.followers), set(b.followers)
    assert feeds_a and feeds_b and not feeds_a & feeds_b
    assert feeds_a | feeds_b == set(net.directory)
    alice, bob = net.add_user("alice"), net.add_user("bob")
    da, db_ = net.device(alice), net.device(bob)
    net.online(da, db_)
    for i in range(10):
        da.send("chat-1", ("alice", "bob"), f"before {i}")
    net.run(2.0)
    kill(a)
    for i in range(10):
        da.send("chat-1", ("alice", "bob"), f"after {i}")
    net.run(12.0)  # > lease time: b takes every feed over
    assert set(b.followers) == set(net.directory)
    rows = chat_messages(conn, "chat-1")
    assert len(rows) == 20 and len({r[1] for r in rows}) == 20
    holders = {r[0] for r in conn.execute("SELECT holder FROM leases WHERE expires_ms > 0")}
    assert holders == {"wb"}
    net.wait(b.stopService())


def test_a_clean_stop_hands_feeds_over_at_once(conn, db_dsn):
    """A worker that stops releases its leases; the other takes them without waiting."""
    net = LegacyNet(4, seed=9).start()
    a, b = make_worker(net, db_dsn, "wa"), make_worker(net, db_dsn, "wb")
    a.startService()
    b.startService()
    net.run(8.0)
    net.wait(a.stopService())
    net.run(1.5)  # less than the lease time
    assert set(b.followers) == set(net.directory)
    net.wait(b.stopService())


def test_a_stale_worker_can_not_commit(conn):
    """After a takeover the old holder's commit fails with StaleFence and writes nothing."""
    now = 1_700_000_000_000
    with conn.transaction():
        old = coordination_store.acquire_lease(conn, "feed:sn0", "old", now, 1000)
    with conn.transaction():
        # held
        assert coordination_store.acquire_lease(conn, "feed:sn0", "new", now + 10, 1000) is None
        new = coordination_store.acquire_lease(conn, "feed:sn0", "new", now + 2000, 1000)
    assert new == old + 1
    msg = wire.ChatMessage(chat_id="c", guid="g1", legacy_seq=1, sender="alice", ts_ms=now,
                           body="x", origin="legacy")
    batch = FeedBatch("sn0", 5, 1, frames=1, chats={"c": [(("alice", "bob"), "change")]},
                       messages=[msg])
    with pytest.raises(StaleFence), conn.transaction():
        commit_feed_batch(conn, batch, old, now + 2001, ("feed:sn0", "old"))
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert coordination_store.load_checkpoints(conn) == {}
    with conn.transaction():
        commit_feed_batch(conn, batch, new, now + 2002, ("feed:sn0", "new"))
    assert coordination_store.load_checkpoints(conn)["sn0"].fence == new
    with conn.transaction():
        assert not coordination_store.renew_lease(conn, "feed:sn0", "old", old, now + 2003, 1000)
        assert coordination_store.renew_lease(conn, "feed:sn0", "new", new, now + 2003, 1000)


def test_any_worker_can_inject_into_any_home_supernode(conn, db_dsn):
    """Two workers: cloud posts reach the legacy side whichever worker claims them, even
    one that does not follow the chat's home supernode."""
    from bridge.outbox import InjectorConfig, OutboxInjector
    from servicekit.retry import RetryPolicy

    net = LegacyNet(4, seed=10).start()
    alice, bob = net.add_user("alice"), net.add_user("bob")
    da, dbob = net.device(alice), net.device(bob)
    net.online(da, dbob)
    workers = []
    for wid in ("wa", "wb"):
        w = make_worker(net, db_dsn, wid)
        w.injector = OutboxInjector(net.clock, w.db, w, random.Random(wid), InjectorConfig(
            poll_interval_s=0.2, retry=RetryPolicy(initial_s=0.2, factor=2, cap_s=2, jitter=0)))
        w.injector.setServiceParent(w)
        w.startService()
        workers.append(w)
    da.send("chat-1", ("alice", "bob"), "hello")
    net.run(8.0)
    from bridge import ids
    cid, bob_id = ids.conversation_id("chat-1"), ids.account_id("bob")
    with conn.transaction():
        accounts_store.set_phase(conn, bob_id, "dual")
    for i in range(10):
        with conn.transaction():
            messages_store.post_message(conn, cid, bob_id, f"c{i}", f"cloud {i}",
                                        int(net.clock.seconds() * 1000))
    net.run(20.0)
    assert conn.execute("SELECT state, count(*) FROM outbox_to_legacy GROUP BY 1").fetchall() \
        == [("done", 10)]
    home = net.supernodes[net.ring.home_of("chat-1")].history("chat-1")
    assert sum(m.origin == "cloud" for m in home) == 10
    for w in workers:
        net.wait(w.stopService())


def test_a_restarted_worker_takes_its_own_leases_back_and_fences_its_old_self(conn):
    """Same --worker-id after a restart: no wait for the old lease; the old incarnation (if
    it was only paused) can neither renew nor commit; other workers still wait."""
    now = 1_700_000_000_000
    with conn.transaction():
        old = coordination_store.acquire_lease(conn, "feed:sn0", "w1", now, 15_000)
    with conn.transaction():
        assert coordination_store.acquire_lease(conn, "feed:sn0", "w2", now + 10, 15_000) is None
        new = coordination_store.acquire_lease(conn, "feed:sn0", "w1", now + 20, 15_000)
    assert new == old + 1
    msg = wire.ChatMessage(chat_id="c", guid="g1", legacy_seq=1, sender="alice", ts_ms=now,
                           body="x", origin="legacy")
    batch = FeedBatch("sn0", 5, 1, frames=1, chats={"c": [(("alice", "bob"), "change")]},
                       messages=[msg])
    with pytest.raises(StaleFence), conn.transaction():
        commit_feed_batch(conn, batch, old, now + 30, ("feed:sn0", "w1"))
    with conn.transaction():
        assert not coordination_store.renew_lease(conn, "feed:sn0", "w1", old, now + 40, 15_000)
        assert coordination_store.renew_lease(conn, "feed:sn0", "w1", new, now + 40, 15_000)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
