"""A live bridge worker follows the operator's runtime controls (``bridgectl control``)
within one heartbeat: a paused injector claims nothing and a resumed one drains the outbox;
a new injector concurrency bounds the injections in flight; the metrics say so."""

from __future__ import annotations

import random
import uuid

import attrs
from prometheus_client import REGISTRY

from bridge import ids
from bridge.follower import FollowerConfig
from bridge.outbox import OutboxInjector
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import InlineDatabase
from cloud.store import controls as controls_store
from cloud.store import messages as messages_store
from tests.bridge.test_outbox import FAST, T0, CountingPeers
from tests.dbfixture import make_account, make_conversation, tx
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet

HEARTBEAT_S = 1.0


class CountingClaims(InlineDatabase):
    """Counts the injector's claims (its only way to take outbox rows)."""

    def __init__(self, conn) -> None:
        super().__init__(conn)
        self.claims = 0

    def run(self, desc, fn, *args, **kwargs):
        if desc == "claim_outbox":
            self.claims += 1
        return super().run(desc, fn, *args, **kwargs)


@attrs.define
class Scene:
    conn: object
    net: LegacyNet
    db: CountingClaims
    peers: CountingPeers | None = None
    worker: BridgeWorker | None = None

    def start_worker(self) -> BridgeWorker:
        config = WorkerConfig(worker_id="w1", bootstrap_host=HOST,
                              bootstrap_port=self.net.login_port, heartbeat_s=HEARTBEAT_S,
                              follower=FollowerConfig(linger_s=0.01), accounts_sync_s=0)

        def injector(worker: BridgeWorker) -> OutboxInjector:
            self.peers = CountingPeers(worker)
            return OutboxInjector(self.net.clock, self.db, self.peers, random.Random(2),
                                  attrs.evolve(FAST, window=8))

        self.worker = BridgeWorker(self.net.clock, self.net.net, InlineDatabase(self.conn),
                                   PEER_SECRET, random.Random(1), config,
                                   injector_factory=injector)
        self.worker.startService()
        return self.worker

    def post(self, cid: uuid.UUID, sender: uuid.UUID, n: int, tag: str) -> None:
        for i in range(n):
            _message, created = tx(self.conn, messages_store.post_message, cid, sender,
                                   str(uuid.uuid4()), f"{tag} {i}",
                                   round(self.net.clock.seconds() * 1000))
            assert created

    def pending(self) -> int:
        return self.conn.execute("SELECT count(*) FROM outbox_to_legacy "
                                 "WHERE state = 'pending'").fetchone()[0]

    def on_legacy(self, cid: uuid.UUID) -> list[str]:
        chat = ids.chat_for_cloud_conversation(cid)
        history = self.net.supernodes[self.net.ring.home_of(chat)].history(chat)
        return [m.body for m in sorted(history, key=lambda m: m.legacy_seq)]

    def now_ms(self) -> int:
        return round(self.net.clock.seconds() * 1000)

    def stop(self) -> None:
        self.net.wait(self.worker.stopService())


def scene(conn) -> Scene:
    net = LegacyNet(3, seed=7)
    net.clock.advance(T0)
    net.start()
    return Scene(conn, net, CountingClaims(conn))


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_live_worker_stops_claiming_within_a_heartbeat_of_a_pause_and_drains_on_resume(
        conn):
    """Paused in the store while the worker runs: after one heartbeat it claims nothing
    (new messages wait in the outbox, none reaches legacy) and reports it; resumed: within
    one heartbeat the waiting messages reach legacy in order."""
    s = scene(conn)
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob", "legacy")
    cid = make_conversation(conn, alice, bob)
    s.start_worker()
    s.post(cid, alice, 3, "before")
    s.net.run(3.0)
    assert s.on_legacy(cid) == ["before 0", "before 1", "before 2"] and s.pending() == 0
    assert sample("bridge_control_paused", what="injection") == 0

    tx(conn, controls_store.pause, "injection", reason="SN upgrade", actor="ops-dana",
       now_ms=s.now_ms())
    s.net.run(HEARTBEAT_S + 0.01)  # one heartbeat
    assert s.worker.injector.paused
    assert sample("bridge_control_paused", what="injection") == 1
    claims = s.db.claims
    s.post(cid, alice, 3, "during")
    s.net.run(10.0)
    assert s.db.claims == claims  # not one claim while paused
    assert s.pending() == 3 and s.on_legacy(cid) == ["before 0", "before 1", "before 2"]
    detail = conn.execute("SELECT detail FROM bridge_workers").fetchone()[0]
    assert detail["injection"] == {"paused": True, "window": 8}

    tx(conn, controls_store.resume, "injection", actor="ops-dana", now_ms=s.now_ms())
    s.net.run(HEARTBEAT_S + 0.01)
    assert not s.worker.injector.paused and s.pending() == 0
    assert s.on_legacy(cid)[3:] == ["during 0", "during 1", "during 2"]
    assert sample("bridge_control_paused", what="injection") == 0
    s.stop()


def test_a_worker_started_while_injection_is_paused_claims_nothing(conn):
    """The pause is already on when the worker starts: its injector never claims a batch
    before the first heartbeat has read the controls."""
    s = scene(conn)
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob", "legacy")
    cid = make_conversation(conn, alice, bob)
    s.post(cid, alice, 2, "waiting")
    tx(conn, controls_store.pause, "injection", reason="", actor="ops-dana", now_ms=s.now_ms())
    s.start_worker()
    s.net.run(5.0)
    assert s.db.claims == 0 and s.pending() == 2 and s.on_legacy(cid) == []
    tx(conn, controls_store.resume, "injection", actor="ops-dana", now_ms=s.now_ms())
    s.net.run(HEARTBEAT_S + 0.01)
    assert s.pending() == 0 and s.on_legacy(cid) == ["waiting 0", "waiting 1"]
    s.stop()


def test_a_live_worker_takes_a_new_injector_concurrency_within_a_heartbeat(conn):
    """Concurrency 1 set while the worker runs: after one heartbeat its window is 1 and
    never more than one injection is in flight; back to default: its configured 8."""
    s = scene(conn)
    alice = make_account(conn, "alice")
    cids = [make_conversation(conn, alice, make_account(conn, f"friend{i}", "legacy"))
            for i in range(6)]
    s.start_worker()
    s.net.run(2.0)  # discovered, links open
    assert s.worker.injector.window == 8
    assert sample("bridge_injector_concurrency") == 8

    tx(conn, controls_store.set_injector_concurrency, 1, actor="ops-dana", now_ms=s.now_ms())
    s.net.run(HEARTBEAT_S + 0.01)
    assert s.worker.injector.window == 1 and sample("bridge_injector_concurrency") == 1
    s.peers.most_in_flight = 0
    for cid in cids:
        s.post(cid, alice, 3, "m")
    s.net.run(5.0)
    assert s.pending() == 0 and s.peers.most_in_flight == 1
    assert all(s.on_legacy(cid) == ["m 0", "m 1", "m 2"] for cid in cids)

    tx(conn, controls_store.set_injector_concurrency, None, actor="ops-dana",
       now_ms=s.now_ms())
    s.net.run(HEARTBEAT_S + 0.01)
    assert s.worker.injector.window == 8 and sample("bridge_injector_concurrency") == 8
    s.peers.most_in_flight = 0
    for cid in cids:
        s.post(cid, alice, 3, "n")
    s.net.run(5.0)
    assert s.pending() == 0 and s.peers.most_in_flight > 1
    s.stop()


def test_a_starting_worker_claims_only_once_its_injection_links_are_up(conn):
    """Rows waiting when a worker starts are claimed once every home has its injection link
    (not at the first heartbeat, before discovery): each goes out at its first attempt,
    none goes back to wait a retry."""
    s = scene(conn)
    alice = make_account(conn, "alice")
    cids = [make_conversation(conn, alice, make_account(conn, f"friend{i}", "legacy"))
            for i in range(8)]
    for cid in cids:
        s.post(cid, alice, 2, "waiting")
    s.start_worker()
    s.net.run(5.0)
    assert s.pending() == 0
    assert all(s.on_legacy(cid) == ["waiting 0", "waiting 1"] for cid in cids)
    assert conn.execute("SELECT DISTINCT attempts FROM outbox_to_legacy").fetchall() == [(1,)]
    s.stop()
