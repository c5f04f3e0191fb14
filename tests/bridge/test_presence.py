"""Presence both ways on the deterministic legacy network and a real PostgreSQL."""

from __future__ import annotations

from bridge import ids
from bridge.presence import PresenceMirror
from cloud.db import InlineDatabase
from cloud.model import Presence
from cloud.presence import effective_status
from cloud.store import accounts as accounts_store
from cloud.store import presence as presence_store
from tests.bridge.test_follower import Bridge
from tests.legacy.netfixture import LegacyNet


class AnyPeer:
    def __init__(self, peer) -> None:
        self.peer = peer

    def any(self):
        return self.peer


def now_ms(net) -> int:
    return int(net.clock.seconds() * 1000)


def test_legacy_presence_reaches_the_cloud_per_supernode_and_expires(conn):
    """A legacy device online shows as online in the cloud; after its supernode crashes the
    presence expires instead of staying online forever."""
    net = LegacyNet(3, seed=6).start()
    alice = net.add_user("alice")
    device = net.device(alice, at="sn1")  # pinned: it cannot come back through another SN
    net.online(device)
    bridge = Bridge(net, InlineDatabase(conn)).start()
    net.run(2.0)
    aid = ids.account_id("alice")
    live = presence_store.read_presence(conn, [aid], now_ms(net))[aid]
    assert [p.source.startswith("legacy:") and p.status for p in live] == ["online"]
    assert effective_status(live, now_ms(net)) == "online"
    assert live[0].source == "legacy:sn1"
    net.wait(net.supernodes["sn1"].crash())
    net.run(400.0)
    assert effective_status(presence_store.read_presence(conn, [aid], now_ms(net)).get(aid, []),
                            now_ms(net)) == "offline"
    bridge.stop(net)


def test_cloud_presence_reaches_legacy_watchers_and_is_not_mirrored_back(conn):
    """A cloud device's 'busy' reaches a legacy contact; the feed's echo is not re-mirrored."""
    net = LegacyNet(3, seed=7).start()
    alice = net.add_user("alice", contacts=("bob",))
    net.add_user("bob")
    watcher = net.device(alice)
    net.online(watcher)
    bob_id = ids.account_id("bob")
    with conn.transaction():
        accounts_store.ensure_linked_accounts(conn, {"bob": bob_id})
        accounts_store.set_phase(conn, bob_id, "dual")
        presence_store.set_presence(conn, Presence(bob_id, "cloud", "busy", now_ms(net),
                                                   now_ms(net) + 60_000))
    bridge = Bridge(net, InlineDatabase(conn)).start()
    mirror = PresenceMirror(net.clock, InlineDatabase(conn), AnyPeer(net.peer("sn0")))
    mirror.startService()
    net.run(3.0)
    assert watcher.presence.get("bob") == "busy" and mirror.injected == 1
    sources = {p.source for p in presence_store.read_presence(conn, [bob_id], now_ms(net))[bob_id]}
    assert sources == {"cloud"}  # the injected presence did not come back as a legacy source
    net.run(3.0)
    assert mirror.injected == 1  # nothing new: nothing injected again
    net.wait(mirror.stopService())
    bridge.stop(net)
