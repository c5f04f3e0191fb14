"""The whole bridge on the deterministic legacy network and a real PostgreSQL: messages both
ways, no loops, order per conversation (invariants 1 and 2 without faults)."""

from __future__ import annotations

import random

from bridge import ids
from bridge.follower import FollowerConfig
from bridge.outbox import InjectorConfig, OutboxInjector
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import InlineDatabase
from cloud.store import accounts as accounts_store
from cloud.store import messages as messages_store
from servicekit.retry import RetryPolicy
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet


def test_messages_flow_both_ways_once_in_order_without_loops(conn):
    """Legacy and cloud users talk in one chat through the bridge: each stack ends with
    every message exactly once, cloud order matches legacy order, nothing echoes back."""
    net = LegacyNet(4, seed=21).start()
    alice, bob = net.add_user("alice"), net.add_user("bob")
    da, dbob = net.device(alice), net.device(bob)
    net.online(da, dbob)
    db = InlineDatabase(conn)
    config = WorkerConfig(worker_id="e2e", bootstrap_host=HOST, bootstrap_port=net.login_port,
                          heartbeat_s=1.0, follower=FollowerConfig(linger_s=0.01))
    worker = BridgeWorker(
        net.clock, net.net, db, PEER_SECRET, random.Random(2), config,
        injector_factory=lambda w: OutboxInjector(
            net.clock, db, w, random.Random(3),
            InjectorConfig(poll_interval_s=0.2,
                           retry=RetryPolicy(initial_s=0.2, factor=2, cap_s=1, jitter=0))))
    worker.startService()
    chat, members = "chat-e2e", ("alice", "bob")
    sent = [da.send(chat, members, f"legacy {i}") for i in range(5)]
    net.run(3.0)
    cid = ids.conversation_id(chat)
    bob_id = conn.execute("SELECT account_id FROM accounts WHERE handle = 'bob'").fetchone()[0]
    with conn.transaction():
        accounts_store.set_phase(conn, bob_id, "dual")  # bob now also has a cloud device
    posted = []
    for i in range(5):
        sent.append(da.send(chat, members, f"legacy {5 + i}"))
        net.run(0.05)
        with conn.transaction():
            message, _ = messages_store.post_message(conn, cid, bob_id, f"c{i}", f"cloud {i}",
                                                     int(net.clock.seconds() * 1000))
        posted.append(message)
        net.run(0.05)
    net.run(5.0)

    home = net.supernodes[net.ring.home_of(chat)].history(chat)
    legacy_order = [m.guid for m in sorted(home, key=lambda m: m.legacy_seq)]
    cloud_rows = conn.execute(
        "SELECT legacy_guid, origin FROM messages WHERE conversation_id = %s ORDER BY seq",
        (cid,)).fetchall()
    cloud_guids = [g for g, _ in cloud_rows]
    expected_cloud_guids = [ids.guid_for_cloud_message(m.message_id) for m in posted]
    # exactly once on each stack
    assert sorted(legacy_order) == sorted(sent + expected_cloud_guids)
    assert sorted(cloud_guids) == sorted(sent + expected_cloud_guids)
    # no loops: cloud messages are in the cloud once, as cloud messages
    assert [o for g, o in cloud_rows if g.startswith("cloud:")] == ["cloud"] * 5
    # order per conversation: legacy messages keep their legacy order in the cloud, and
    # cloud messages keep their cloud order on the legacy side
    assert [g for g in cloud_guids if not g.startswith("cloud:")] == [
        g for g in legacy_order if not g.startswith("cloud:")]
    assert [g for g in legacy_order if g.startswith("cloud:")] == expected_cloud_guids
    # the legacy device got the cloud messages too
    delivered = {m.guid for m in da.deliveries}
    assert set(expected_cloud_guids) <= delivered
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy WHERE state = 'done'"
                        ).fetchone()[0] == 5
    net.wait(worker.stopService())
