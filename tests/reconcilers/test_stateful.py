"""Hypothesis stateful test: random traffic and faults, then heal, one reconcile pass, and the
invariants of the design checked from both stacks' own records.

The legacy network is the deterministic in-memory one; the store is a real PostgreSQL. Rules
interleave legacy sends, cloud posts, supernode crashes (memory lost: a feed gap), bridge
crashes (a worker killed without draining, a new one started), push loss, partitions between
supernodes and the passing of time. The final check heals everything, lets the bridge catch
up, runs the gaps reconciler once, and then asserts:

1. every message still held by the legacy network, and every message posted on the cloud,
   exists exactly once in the cloud store; every cloud message of a chat with legacy clients
   exists on the legacy side; a legacy message acknowledged to its sender but in neither
   store was lost by a crash of its home supernode (the legacy network's own loss), never by
   the bridge;
2. nothing came back to the stack it came from (one row per GUID, origins as sent);
3. every owed notification is acknowledged or visibly failed (state plus finding);
4. presence agrees: each online legacy user is online in the cloud's merged view.
"""

from __future__ import annotations

import random

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from twisted.internet import defer

from bridge import ids
from bridge.discovery import SupernodeLinks
from bridge.follower import FollowerConfig
from bridge.outbox import InjectorConfig, OutboxInjector
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import InlineDatabase
from cloud.dispatcher import DispatcherConfig, NotificationDispatcher
from cloud.gateway import SimulatedPushGateway
from cloud.presence import effective_status
from cloud.push import NotificationChannel
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from cloud.store import notifications as notifications_store
from cloud.store import presence as presence_store
from reconcilers import runner
from reconcilers.gaps import GapsConfig, GapsReconciler
from reconcilers.notifications import NotificationsReconciler
from servicekit.retry import RetryPolicy
from tests.dbfixture import truncate_all
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet

FAST_RETRY = RetryPolicy(initial_s=0.2, factor=2.0, cap_s=2.0, jitter=0.2)
HANDLES = ("ann", "ben", "cat", "dan", "eve")
DUAL = ("ann", "ben")          # these also have cloud devices
CHATS = {"chat-x": ("ann", "ben", "cat"), "chat-y": ("cat", "dan"),
         "chat-z": ("ann", "dan", "eve")}


def make_machine(conn: psycopg.Connection, dsn: str) -> type:
    class BridgeMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            truncate_all(conn)
            self.net = LegacyNet(4, seed=41).start()
            self.db = InlineDatabase(conn)
            self.rng = random.Random(5)
            self.devices = {}
            for h in HANDLES:
                device = self.net.device(self.net.add_user(h, contacts=HANDLES))
                self.devices[h] = device
            self.net.online(*self.devices.values())
            self.channel = NotificationChannel(self.net.clock)
            self.gateway = SimulatedPushGateway(self.net.clock, random.Random(6), self.channel)
            self.dispatcher = NotificationDispatcher(
                self.net.clock, self.db, self.gateway, random.Random(7),
                DispatcherConfig(poll_interval_s=0.2, resend_after_s=2.0, max_attempts=4,
                                 retry=FAST_RETRY))
            self.dispatcher.startService()
            self.workers = 0
            self.worker = self._start_worker()
            self.cloud_posts: list[tuple[str, str]] = []   # (chat, guid it must get)
            self.crashed_homes: dict[str, float] = {}       # sn -> last crash time
            for chat, members in sorted(CHATS.items()):  # every chat exists on both stacks
                self.devices[members[0]].send(chat, members, f"hello {chat}")
            self.net.run(2.0)
            with conn.transaction():
                for h in DUAL:
                    accounts_store.set_phase(conn, ids.account_id(h), "dual")

        def _start_worker(self) -> BridgeWorker:
            self.workers += 1
            config = WorkerConfig(worker_id=f"w{self.workers}", bootstrap_host=HOST,
                                  bootstrap_port=self.net.login_port, heartbeat_s=1.0,
                                  lease_ttl_s=3.0, accounts_sync_s=0,
                                  follower=FollowerConfig(linger_s=0.01, retry=FAST_RETRY))
            worker = BridgeWorker(
                self.net.clock, self.net.net, self.db, PEER_SECRET, random.Random(self.workers),
                config, injector_factory=lambda w: OutboxInjector(
                    self.net.clock, self.db, w, random.Random(8),
                    InjectorConfig(poll_interval_s=0.2, claim_s=15, inject_timeout_s=2,
                                   retry=FAST_RETRY)))
            worker.startService()
            return worker

        def _ack_pushes(self) -> None:
            for h in DUAL:
                aid = ids.account_id(h)
                for n in self.channel.pending(aid):
                    with conn.transaction():
                        notifications_store.ack_notification(conn, aid, n.notification_id,
                                                             int(self.net.clock.seconds() * 1000))
                    self.channel.ack(aid, n.notification_id)

        def _advance(self, seconds: float) -> None:
            end = self.net.clock.seconds() + seconds
            while self.net.clock.seconds() < end:
                self.net.run(min(0.5, end - self.net.clock.seconds()))
                self._ack_pushes()

        @rule(chat=st.sampled_from(sorted(CHATS)), who=st.integers(0, 2),
              text=st.text(max_size=20), count=st.integers(1, 4))
        def legacy_send(self, chat: str, who: int, text: str, count: int) -> None:
            members = CHATS[chat]
            for i in range(count):
                self.devices[members[who % len(members)]].send(chat, members,
                                                               f"{text or 'hi'} {i}")
                self.net.run(0.02)

        # the cloud API refuses NUL (as PostgreSQL does); legacy sends may try it
        @rule(chat=st.sampled_from(sorted(CHATS)),
              text=st.text(st.characters(blacklist_categories=("Cs",),
                                         blacklist_characters="\x00"), min_size=1,
                           max_size=20))
        def cloud_post(self, chat: str, text: str) -> None:
            sender = next((h for h in CHATS[chat] if h in DUAL), None)
            cid = ids.conversation_id(chat)
            with conn.transaction():
                if not conversations_store.conversation_exists(conn, cid) or sender is None:
                    return  # the chat has not reached the cloud yet, or has no cloud user
                n = len(self.cloud_posts)
                message, _ = messages_store.post_message(conn, cid, ids.account_id(sender), f"p{n}",
                                                         text, int(self.net.clock.seconds() * 1000))
            self.cloud_posts.append((chat, ids.guid_for_cloud_message(message.message_id)))

        @rule(i=st.integers(0, 3))
        def crash_supernode(self, i: int) -> None:
            sn = sorted(self.net.supernodes)[i]
            node = self.net.supernodes[sn]
            if node.mem is None:
                return
            self.net.wait(node.crash())
            self.crashed_homes[sn] = self.net.clock.seconds()
            self.net.clock.callLater(self.rng.uniform(0.5, 3.0),
                                     lambda: node.mem is None and node.restart())

        @rule()
        def crash_bridge(self) -> None:
            w = self.worker
            for call in w._calls:
                if call.active():
                    call.cancel()
            for child in list(w):
                child.running = False
                for attr in ("_timer", "_call", "_linger", "_sleep_call"):
                    call = getattr(child, attr, None)
                    if call is not None and hasattr(call, "active") and call.active():
                        call.cancel()
                peer = getattr(child, "peer", None)
                if peer is not None:
                    peer.disconnect()
            w.running = False
            self.worker = self._start_worker()

        @rule(lossy=st.booleans())
        def push_loss(self, lossy: bool) -> None:
            self.gateway.loss = 1.0 if lossy else 0.0

        @rule()
        def partition(self) -> None:
            sns = sorted(self.net.supernodes)
            self.net.hop_faults.partition(frozenset(sns[:2]), frozenset(sns[2:]))
            self.net.clock.callLater(2.0, self.net.hop_faults.unpartition)

        @rule(seconds=st.floats(0.1, 4.0))
        def advance(self, seconds: float) -> None:
            self._advance(seconds)

        def teardown(self) -> None:
            try:
                self._heal_and_check()
            finally:
                for f in self.worker.followers.values():
                    if f.peer is not None:
                        f.peer.disconnect()

        # -- the check --------------------------------------------------------------------

        def _heal_and_check(self) -> None:
            net = self.net
            self.gateway.loss = 0.0
            net.hop_faults.unpartition()
            for node in net.supernodes.values():
                if node.mem is None:
                    net.wait(node.restart())
            self._advance(20.0)
            links = SupernodeLinks(net.net, list(net.directory.values()), name="rec",
                                   secret=PEER_SECRET)
            with psycopg.connect(dsn, autocommit=True) as lock_conn:
                reports = [net.wait(defer.Deferred.fromCoroutine(runner.run_one(
                    reconciler, clock=net.clock, db=self.db, lock_conn=lock_conn,
                    dry_run=False, max_seconds=None)), timeout=600) for reconciler in (
                    GapsReconciler(links, GapsConfig(margin_ms=0, confirm_after_s=0.5)),
                    NotificationsReconciler())]
            links.close()
            for report in reports:
                assert report.error is None and report.failed == 0, (report, conn.execute(
                    "SELECT detail->>'error' FROM reconcile_findings WHERE state = 'failed'"
                ).fetchall())
            self._advance(30.0)  # injections, pushes and acks settle
            cloud = conn.execute("SELECT legacy_guid, count(*), min(origin) FROM messages "
                                 "WHERE legacy_guid IS NOT NULL GROUP BY 1").fetchall()
            cloud_count = {g: n for g, n, _ in cloud}
            cloud_origin = {g: o for g, _, o in cloud}
            legacy_history = {}
            for chat in CHATS:
                home = net.supernodes[net.ring.home_of(chat)]
                for m in home.history(chat):
                    legacy_history[m.guid] = (chat, m.origin)
            # 1. everything the legacy network holds is in the cloud exactly once
            for guid in legacy_history:
                assert cloud_count.get(guid) == 1, (guid, cloud_count.get(guid))
            # ... and everything in the cloud is on the legacy side (every member here still
            # has legacy clients), including what a crashed home supernode forgot
            for guid in cloud_count:
                assert guid in legacy_history, f"{guid} is in the cloud, not on legacy"
            # ... every cloud post is in the cloud once and on the legacy side
            for chat, guid in self.cloud_posts:
                assert cloud_count.get(guid) == 1 and cloud_origin[guid] == "cloud"
                assert guid in legacy_history, f"cloud post {guid} never reached {chat}"
            # ... an acknowledged legacy message missing everywhere died with its home SN
            acked = {a.guid: a.chat_id for d in self.devices.values() for a in d.acks}
            for guid, chat in acked.items():
                if guid not in cloud_count:
                    assert net.ring.home_of(chat) in self.crashed_homes, f"{guid} lost"
            # 2. no loops: one row per GUID (checked above), origins as they were born
            for guid, (_chat, origin) in legacy_history.items():
                if origin == "legacy":
                    assert cloud_origin[guid] == "legacy"
            # 3. every owed notification acknowledged or visibly failed
            states = dict(conn.execute(
                "SELECT state, count(*) FROM notifications GROUP BY 1").fetchall())
            assert set(states) <= {"acked", "failed"}, states
            failed = conn.execute(
                "SELECT count(*) FROM notifications n WHERE state = 'failed' AND NOT EXISTS "
                "(SELECT 1 FROM reconcile_findings f WHERE f.kind = 'notification_failed' "
                " AND f.detail->>'notification_id' = n.notification_id::text)").fetchone()[0]
            assert failed == 0
            # 4. presence: online legacy users are online in the cloud's merged view
            now = int(net.clock.seconds() * 1000)
            live = presence_store.read_presence(conn, [ids.account_id(h) for h in HANDLES], now)
            for h, device in self.devices.items():
                if device.state == "online":
                    assert effective_status(live.get(ids.account_id(h), []), now) != "offline", h

    BridgeMachine.TestCase.settings = settings(
        max_examples=8, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    return BridgeMachine


def test_random_traffic_and_faults_then_one_reconcile_pass_keep_the_invariants(conn, db_dsn):
    """After faults stop and one reconcile pass, the stacks agree (invariants 1-4)."""
    machine = make_machine(conn, db_dsn)
    run_state_machine_as_test(machine, settings=machine.TestCase.settings)



