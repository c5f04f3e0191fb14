"""Membership mirrored as changes, both ways (issue 16), on the deterministic legacy network
and a real PostgreSQL: a member removed on either stack stays removed on the other, nothing
the bridge injects adds one back, and a restart between two member lists still mirrors the
right difference."""

from __future__ import annotations

import random
import uuid

from prometheus_client import REGISTRY

from bridge import ids
from bridge.follower import FollowerConfig
from bridge.mirror import LegacyChanges, mirror_changes
from bridge.outbox import InjectorConfig, OutboxInjector
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import InlineDatabase
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from cloud.store.conversations import CHANGE, ECHO, SNAPSHOT
from servicekit.retry import RetryPolicy
from tests.bridge.test_follower import FAST, Bridge
from tests.dbfixture import make_account, tx
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet

CHAT = "chat-members"
CID = ids.conversation_id(CHAT)


def cloud_members(conn, cid: uuid.UUID = CID) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT a.handle FROM members m JOIN accounts a USING (account_id) "
        "WHERE m.conversation_id = %s", (cid,)).fetchall()}


def account(conn, handle: str) -> uuid.UUID:
    return conn.execute("SELECT account_id FROM accounts WHERE handle = %s",
                        (handle,)).fetchone()[0]


def changes(direction: str, change: str) -> float:
    return REGISTRY.get_sample_value("bridge_member_changes_total",
                                     {"direction": direction, "change": change}) or 0.0


def mirror(conn, *lists: tuple[tuple[str, ...], str], chat: str = CHAT) -> None:
    with conn.transaction():
        mirror_changes(conn, LegacyChanges({chat: lists}), 1)


# ---------------------------------------------------------------- the mirror's rule

def test_a_legacy_list_is_mirrored_as_its_difference_from_the_one_before(conn):
    """The first list only adds; a shorter one removes who it dropped; a member added on
    the cloud meanwhile, whom neither list names, stays; nothing is queued back."""
    mirror(conn, (("alice", "bob", "carol"), CHANGE))
    assert cloud_members(conn) == {"alice", "bob", "carol"}
    dave = make_account(conn, "dave")
    tx(conn, conversations_store.add_members, CID, [dave])
    mirror(conn, (("alice", "bob"), CHANGE))
    assert cloud_members(conn) == {"alice", "bob", "dave"}
    assert conversations_store.legacy_members(conn, CID) == ("alice", "bob")
    mirror(conn, (("alice", "bob", "carol"), CHANGE))  # legacy takes carol back: legacy's call
    assert cloud_members(conn) == {"alice", "bob", "carol", "dave"}
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy").fetchone()[0] == 0


def test_the_bridges_own_changes_are_remembered_not_mirrored(conn):
    """An ECHO (a list the bridge's injection made) changes no member but becomes the list
    the next legacy change is compared with; a SNAPSHOT only seeds a chat never seen."""
    mirror(conn, (("alice", "bob", "carol"), CHANGE))
    bob = account(conn, "bob")
    tx(conn, conversations_store.remove_member, CID, account(conn, "alice"), "bob", 5)
    # bob's removal reaches legacy and comes back; then a legacy client drops carol
    mirror(conn, (("alice", "carol"), ECHO), (("alice",), CHANGE))
    assert cloud_members(conn) == {"alice"}
    assert not conversations_store.is_member(conn, CID, bob)
    mirror(conn, (("alice", "bob", "carol", "erin"), SNAPSHOT))  # a repair's stale read
    assert cloud_members(conn) == {"alice"}
    assert conversations_store.legacy_members(conn, CID) == ("alice",)
    mirror(conn, (("x", "y"), SNAPSHOT), chat="fresh")
    assert cloud_members(conn, ids.conversation_id("fresh")) == {"x", "y"}


def test_a_worker_restart_between_two_lists_still_mirrors_the_right_difference(conn):
    """Followers stopped after one member list and new ones (knowing nothing) started after
    the next: carol, dropped from the legacy list meanwhile, is removed on the cloud."""
    net = LegacyNet(4, seed=5).start()
    alice = net.add_user("alice")
    da = net.device(alice)
    net.online(da)
    da.send(CHAT, ("alice", "bob", "carol"), "all three")
    net.run(1.0)
    first = Bridge(net, InlineDatabase(conn), FAST).start()
    net.run(3.0)
    assert cloud_members(conn) == {"alice", "bob", "carol"}
    first.stop(net)
    da.send(CHAT, ("alice", "bob"), "carol left")
    net.run(1.0)
    second = Bridge(net, InlineDatabase(conn), FAST).start()
    net.run(3.0)
    assert cloud_members(conn) == {"alice", "bob"}
    assert conversations_store.legacy_members(conn, CID) == ("alice", "bob")
    second.stop(net)


# ---------------------------------------------------------------- both ways, end to end

def _worker(net: LegacyNet, conn) -> BridgeWorker:
    db = InlineDatabase(conn)
    config = WorkerConfig(worker_id="members", bootstrap_host=HOST,
                          bootstrap_port=net.login_port, heartbeat_s=1.0,
                          follower=FollowerConfig(linger_s=0.01))
    worker = BridgeWorker(
        net.clock, net.net, db, PEER_SECRET, random.Random(2), config,
        injector_factory=lambda w: OutboxInjector(
            net.clock, db, w, random.Random(3),
            InjectorConfig(poll_interval_s=0.2,
                           retry=RetryPolicy(initial_s=0.2, factor=2, cap_s=1, jitter=0))))
    worker.startService()
    return worker


def _post(net: LegacyNet, conn, sender: uuid.UUID, body: str) -> str:
    with conn.transaction():
        message, _ = messages_store.post_message(conn, CID, sender, body, body,
                                                 int(net.clock.seconds() * 1000))
    return ids.guid_for_cloud_message(message.message_id)


def _scene(conn):
    """alice, bob and carol each on a legacy device, in one legacy chat mirrored to the
    cloud; alice also has cloud devices (dual)."""
    net = LegacyNet(4, seed=21).start()
    devices = {h: net.device(net.add_user(h)) for h in ("alice", "bob", "carol")}
    net.online(*devices.values())
    worker = _worker(net, conn)
    devices["alice"].send(CHAT, ("alice", "bob", "carol"), "hello all")
    net.run(3.0)
    with conn.transaction():
        accounts_store.set_phase(conn, account(conn, "alice"), "dual")
    home = net.supernodes[net.ring.home_of(CHAT)]
    return net, devices, worker, home


def test_a_removal_on_legacy_is_not_undone_by_the_next_cloud_post(conn):
    """carol dropped by a legacy client's shorter list is removed on the cloud; alice's next
    cloud post is injected without adding her back, and carol's device never gets it."""
    net, devices, worker, home = _scene(conn)
    assert cloud_members(conn) == {"alice", "bob", "carol"}
    removed = changes("to_cloud", "removed")
    devices["alice"].send(CHAT, ("alice", "bob"), "carol is out")
    net.run(3.0)
    assert cloud_members(conn) == {"alice", "bob"}
    assert changes("to_cloud", "removed") - removed == 1
    guid = _post(net, conn, account(conn, "alice"), "after carol left")
    net.run(3.0)
    assert guid in {m.guid for m in home.history(CHAT)}
    assert home.mem.chats[CHAT].members == ("alice", "bob")
    assert cloud_members(conn) == {"alice", "bob"}
    assert guid in {m.guid for m in devices["bob"].deliveries}
    assert guid not in {m.guid for m in devices["carol"].deliveries}
    assert conn.execute("SELECT kind, state FROM outbox_to_legacy").fetchall() == [
        ("message", "done")]  # the mirrored removal queued nothing back
    net.wait(worker.stopService())


def test_a_removal_on_the_cloud_reaches_legacy_and_nothing_adds_it_back(conn):
    """carol removed on the cloud leaves the legacy chat; a legacy client still listing her,
    and the bridge's own injections, add her back on neither stack nor deliver to her."""
    net, devices, worker, home = _scene(conn)
    alice = account(conn, "alice")
    removed = changes("to_legacy", "removed")
    before = _post(net, conn, alice, "before the removal")
    tx(conn, conversations_store.remove_member, CID, alice, "carol",
       int(net.clock.seconds() * 1000))
    after = _post(net, conn, alice, "after the removal")
    net.run(3.0)
    assert home.mem.chats[CHAT].members == ("alice", "bob")
    carol_got = {m.guid for m in devices["carol"].deliveries}
    assert before in carol_got and after not in carol_got
    stale = devices["bob"].send(CHAT, ("alice", "bob", "carol"), "from a stale list")
    net.run(3.0)
    assert home.mem.chats[CHAT].members == ("alice", "bob")
    assert cloud_members(conn) == {"alice", "bob"}
    assert stale not in {m.guid for m in devices["carol"].deliveries}
    assert conn.execute("SELECT count(*) FROM messages WHERE legacy_guid = %s",
                        (stale,)).fetchone()[0] == 1  # mirrored, to the members left
    assert conn.execute(
        "SELECT seq, sub, kind, state FROM outbox_to_legacy ORDER BY seq, sub").fetchall() == [
        (2, 0, "message", "done"), (2, 1, "members", "done"), (3, 0, "message", "done")]
    assert worker.injector.membership_changes == 1
    assert changes("to_legacy", "removed") - removed == 1
    net.wait(worker.stopService())


def test_a_cloud_removal_forgotten_by_a_crashed_home_is_queued_again_not_undone(conn):
    """The home crashes and forgets carol's removal; bob's stale list brings her back on
    legacy, but not on the cloud: the bridge queues her removal again, and the next message
    from that stale list is not delivered to her."""
    net, devices, worker, home = _scene(conn)
    alice = account(conn, "alice")
    tx(conn, conversations_store.remove_member, CID, alice, "carol",
       int(net.clock.seconds() * 1000))
    net.run(3.0)
    assert home.mem.chats[CHAT].members == ("alice", "bob")
    net.wait(home.crash())
    net.run(1.0)
    net.wait(home.restart())
    net.run(5.0)
    devices["bob"].send(CHAT, ("alice", "bob", "carol"), "stale list, to a home that forgot")
    net.run(5.0)
    assert cloud_members(conn) == {"alice", "bob"}
    assert home.mem.chats[CHAT].members == ("alice", "bob")
    assert conn.execute(
        "SELECT kind, remove_handles, state FROM outbox_to_legacy ORDER BY seq, sub"
    ).fetchall() == [("members", ["carol"], "done"), ("members", ["carol"], "done")]
    later = devices["bob"].send(CHAT, ("alice", "bob", "carol"), "stale list again")
    net.run(3.0)
    assert later not in {m.guid for m in devices["carol"].deliveries}
    assert cloud_members(conn) == {"alice", "bob"}
    net.wait(worker.stopService())


def test_a_member_removed_on_the_cloud_is_added_back_only_on_the_cloud(conn):
    """Once carol is added again on the cloud, legacy lists that name her are honoured."""
    mirror(conn, (("alice", "bob", "carol"), CHANGE))
    alice = account(conn, "alice")
    tx(conn, conversations_store.remove_member, CID, alice, "carol", 5)
    mirror(conn, (("alice", "bob"), ECHO), (("alice", "bob", "carol"), CHANGE))
    assert cloud_members(conn) == {"alice", "bob"}
    tx(conn, conversations_store.add_member, CID, alice, "carol", 6)
    mirror(conn, (("alice", "bob", "carol"), ECHO), (("alice", "bob"), CHANGE),
           (("alice", "bob", "carol"), CHANGE))
    assert cloud_members(conn) == {"alice", "bob", "carol"}
