"""Coalesced presence fan-out: one frame per subscriber supernode per moment, last state wins."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from twisted.internet.task import Clock

from legacy import wire
from legacy.supernode import presence
from tests.legacy.netfixture import LegacyNet


def record_fanouts(net: LegacyNet, sn_id: str) -> list[wire.PresenceFanout]:
    """Every PresenceFanout supernode *sn_id* serves from now on, in arrival order."""
    node = net.supernodes[sn_id]
    got: list[wire.PresenceFanout] = []
    serve = node.handle_supernode_frame

    def recording(f: Any) -> None:
        if isinstance(f, wire.PresenceFanout):
            got.append(f)
        serve(f)

    node.handle_supernode_frame = recording
    return got


def test_changes_in_one_moment_reach_a_subscriber_once_in_their_last_state():
    """Two status changes in one moment reach the subscriber's SN as one entry: the last."""
    net = LegacyNet(4).start()
    x = net.handle_indexed_at("sn2", "xavier")  # hub sn2, x at sn1, subscriber at sn3
    sub = net.device(net.add_user("sub", contacts=(x,)), at="sn3")
    x_dev = net.device(net.add_user(x), at="sn1")
    net.online(sub, x_dev)
    net.run(1)
    assert sub.presence[x] == "online"
    fanouts = record_fanouts(net, "sn3")
    notices = net.stats.presence_notices

    x_dev.proto.send(wire.SetPresence(status="away"))
    x_dev.proto.send(wire.SetPresence(status="busy"))
    net.run(1)
    assert [[(e.handle, e.status) for e in f.entries] for f in fanouts] == [[(x, "busy")]]
    assert sub.presence[x] == "busy"
    assert net.stats.presence_notices == notices + 1
    assert net.supernodes["sn3"].mem.seen[x].version == net.supernodes["sn2"].mem.hub[x].version


def refreshing_net() -> tuple[LegacyNet, list[str], Any]:
    """Five users at sn1 whose hub is sn2, watched by a user at sn3; TTL 30 s, refresh every
    10 s; online at about 1 s."""
    net = LegacyNet(4, presence_ttl=30.0, refresh_interval=10.0).start()
    handles = [h for h in (f"user-{i}" for i in range(200))
               if net.ring.index_owner(h) == "sn2"][:5]
    users = [net.device(net.add_user(h), at="sn1") for h in handles]
    sub = net.device(net.add_user("sub", contacts=tuple(handles)), at="sn3")
    net.online(sub, *users)
    return net, handles, sub


def test_a_refresh_round_reaches_a_subscriber_supernode_in_one_frame():
    """A refresh of many users at one SN reaches a subscriber's SN as one frame per hub,
    and only when the expiry the subscriber holds is within half a TTL of lapsing: the
    round at 10 s (expiries at about 31 s, 21 s ahead) sends nothing, the one at 20 s
    (11 s ahead, under 15) sends them all in one frame."""
    net, handles, sub = refreshing_net()
    net.run_until(9.0)
    before = {h: net.supernodes["sn3"].mem.seen[h].expires_ms for h in handles}
    fanouts = record_fanouts(net, "sn3")

    net.run_until(10.5)  # the first refresh round, at 10 s
    assert fanouts == []
    assert all(net.supernodes["sn2"].mem.hub[h].expires_ms > before[h] for h in handles)
    net.run_until(20.5)  # the second
    assert len(fanouts) == 1
    assert sorted(e.handle for e in fanouts[0].entries) == sorted(handles)
    seen = net.supernodes["sn3"].mem.seen
    assert all(seen[h].expires_ms > before[h] for h in handles)
    assert all(sub.presence[h] == "online" for h in handles)


def test_a_refreshed_user_never_lapses_at_a_subscriber_and_a_silent_one_does():
    """While the users' supernode refreshes on time their presence never lapses at the
    subscriber's supernode (its sweep never sets them offline) though only every other
    round is fanned out; once the refreshes stop (their supernode forgets them), the
    subscriber's copy lapses no later than the hub's own entry."""
    net, handles, sub = refreshing_net()
    seen = net.supernodes["sn3"].mem.seen
    for t in range(2, 120):
        net.run_until(float(t))
        assert all(seen[h].status == "online" for h in handles), t
        assert all(sub.presence[h] == "online" for h in handles), t
    hub = net.supernodes["sn2"].mem.hub
    hub_expiry = max(hub[h].expires_ms for h in handles)
    net.supernodes["sn1"].mem.local_status.clear()  # nothing left to refresh
    net.run_until(net.clock.seconds() + 60.0)
    assert all(seen[h].status == "offline" for h in handles)
    assert all(sub.presence[h] == "offline" for h in handles)
    assert max(seen[h].expires_ms for h in handles) <= hub_expiry


def test_a_fanout_longer_than_one_frame_is_split_and_all_of_it_arrives():
    """More handles owed than one frame holds go out in frames of MAX_FANOUT_ENTRIES."""
    net = LegacyNet(4).start()
    hub = net.supernodes["sn2"]
    n = 2 * wire.MAX_FANOUT_ENTRIES + 50
    expires = hub.now_ms() + 60_000
    for i in range(n):
        h = f"h{i}"
        hub.presence.on_presence_publish(wire.PresencePublish(
            handle=h, status="online", version=1, expires_ms=expires, origin="legacy",
            source="sn1"))
        hub.presence.on_presence_subscribe(wire.PresenceSubscribe(handle=h, subscriber_sn="sn3"))
    fanouts = record_fanouts(net, "sn3")
    net.run(1)
    assert [len(f.entries) for f in fanouts] == [wire.MAX_FANOUT_ENTRIES,
                                                 wire.MAX_FANOUT_ENTRIES, 50]
    seen = net.supernodes["sn3"].mem.seen
    assert all(seen[f"h{i}"].status == "online" for i in range(n))


def test_what_a_hub_owed_when_it_crashed_is_not_sent():
    """A hub that crashes in the moment it owed fan-out sends nothing, and fails nothing."""
    net = LegacyNet(4).start()
    hub = net.supernodes["sn2"]
    hub.presence.on_presence_publish(wire.PresencePublish(
        handle="h", status="online", version=1, expires_ms=hub.now_ms() + 60_000,
        origin="legacy", source="sn1"))
    hub.presence.on_presence_subscribe(wire.PresenceSubscribe(handle="h", subscriber_sn="sn3"))
    fanouts = record_fanouts(net, "sn3")
    hub.crash()
    hub.restart()
    net.run(1)
    assert fanouts == []
    assert "h" not in net.supernodes["sn3"].mem.seen


def test_hubs_owing_at_one_moment_all_send_and_a_hubs_failure_still_surfaces():
    """Two hubs owe fan-out at one moment: one timer sends both. If one hub's send fails,
    the other's still goes, and the failure comes out of the clock (a bug is not hidden)."""
    class Hub:
        def __init__(self, fail: bool) -> None:
            self.fail, self.sent = fail, []

        def _send_owed(self, mem: Any) -> None:
            self.sent.append(mem)
            if self.fail:
                raise RuntimeError("hub bug")

    clock = Clock()
    bad, good = Hub(True), Hub(False)
    moment = presence._end_of_moment(clock)
    assert presence._end_of_moment(clock) is moment
    moment.append((bad, "m1"))
    moment.append((good, "m2"))
    assert len(clock.getDelayedCalls()) == 1
    with pytest.raises(RuntimeError, match="hub bug"):
        clock.advance(0)
    assert (bad.sent, good.sent) == (["m1"], ["m2"])


def test_a_network_done_with_is_not_kept_alive_by_its_fanout_timer():
    """The end-of-moment registry holds clocks weakly: once a test's network is dropped,
    nothing of it stays in memory through the registry."""
    net = LegacyNet(3).start()
    x = net.handle_indexed_at("sn1", "xavier")
    net.online(net.device(net.add_user("sub", contacts=(x,)), at="sn2"),
               net.device(net.add_user(x), at="sn0"))
    net.run(2)
    assert net.clock in presence._MOMENTS  # the fan-out went through a moment
    clock, node = weakref.ref(net.clock), weakref.ref(net.supernodes["sn1"])
    del net
    gc.collect()
    assert clock() is None and node() is None
