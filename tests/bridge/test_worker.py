"""A bridge worker on the deterministic legacy network: discovery, heartbeat, health."""

from __future__ import annotations

import json
import random
import uuid

from prometheus_client import REGISTRY
from twisted.internet import defer
from twisted.web.test.requesthelper import DummyRequest

from bridge.faults import p99_ms
from bridge.follower import FollowerConfig
from bridge.ops.health import OperationsResource
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import DatabaseUnavailable, InlineDatabase
from cloud.passwords import verify_password
from tests.bridge.test_follower import chat_messages, send_some
from tests.dbfixture import ScriptedDatabase
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet


def make_worker(net: LegacyNet, conn, db=None) -> BridgeWorker:
    config = WorkerConfig(worker_id="w1", bootstrap_host=HOST, bootstrap_port=net.login_port,
                          heartbeat_s=1.0, follower=FollowerConfig(linger_s=0.01))
    return BridgeWorker(net.clock, net.net, db or InlineDatabase(conn), PEER_SECRET,
                        random.Random(1), config)


def test_worker_discovers_every_supernode_and_mirrors_and_reports(conn):
    """From the login server alone the worker finds all supernodes, mirrors, heartbeats."""
    net = LegacyNet(5, seed=4).start()
    net.login.host_cache_size = 2  # the login server gives a sample; a supernode gives all
    send_some(net, 10)
    worker = make_worker(net, conn)
    worker.startService()
    net.run(3.0)
    assert set(worker.followers) == set(net.directory) and worker.ready
    assert len(chat_messages(conn, "chat-1")) == 10
    home = net.ring.home_of("chat-1")
    # injections get a link of their own to the home, opened on first need, not the feed's
    assert worker.for_chat("chat-1") is None
    net.run(0.5)
    link = worker.for_chat("chat-1")
    assert link is not None and link is not worker.followers[home].peer
    assert link.server_id == home
    row = conn.execute("SELECT state, mirrored_to_cloud, feeds FROM bridge_workers "
                       "WHERE worker_id = 'w1'").fetchone()
    assert row == ("ready", 10, 5)
    sample = REGISTRY.get_sample_value
    assert sample("bridge_accounts_by_phase", {"phase": "legacy"}) == 2  # alice and bob
    assert sample("bridge_leases_held") == 5
    net.wait(worker.stopService())
    assert conn.execute("SELECT state FROM bridge_workers").fetchone() == ("stopped",)


def test_the_store_gauges_are_read_at_most_every_store_metrics_s(conn):
    """With ``store_metrics_s`` the heartbeat reads the store's gauges at its first beat and
    then once that long has passed, not at every beat (0, the default: every beat)."""
    reads: list[float] = []
    net = LegacyNet(2, seed=4).start()

    class Counting(InlineDatabase):
        def run(self, desc, fn, *args, **kwargs):
            if desc == "read_store_metrics":
                reads.append(net.clock.seconds())
            return super().run(desc, fn, *args, **kwargs)

    config = WorkerConfig(worker_id="w1", bootstrap_host=HOST, bootstrap_port=net.login_port,
                          heartbeat_s=1.0, store_metrics_s=10.0,
                          follower=FollowerConfig(linger_s=0.01))
    worker = BridgeWorker(net.clock, net.net, Counting(conn), PEER_SECRET, random.Random(1),
                          config)
    worker.startService()
    start = net.clock.seconds()
    net.run(25.5)
    beats = conn.execute("SELECT heartbeat_ms FROM bridge_workers").fetchone()[0]
    assert beats >= (start + 24) * 1000  # it kept beating every second
    assert [round(t - start) for t in reads] == [0, 10, 20]
    net.wait(worker.stopService())


def test_worker_copies_legacy_passwords_so_they_work_on_the_cloud(conn):
    """Handles seen on a feed get accounts; the periodic sync adds their password hashes."""
    net = LegacyNet(3, seed=12).start()
    send_some(net, 3)
    worker = make_worker(net, conn)
    worker.startService()
    net.run(3.0)
    assert worker.accounts_synced is not None and worker.accounts_synced.seen == 2
    encoded = conn.execute("SELECT password_hash FROM accounts WHERE handle = 'alice'"
                           ).fetchone()[0]
    assert verify_password("pw-alice", encoded) and not verify_password("pw-bob", encoded)
    net.wait(worker.stopService())


def test_worker_retries_discovery_until_the_login_server_answers(conn):
    """A bootstrap that is down is retried with backoff; the worker is not ready meanwhile."""
    net = LegacyNet(3, seed=5).start()
    net.wait(net.login.stopService())
    worker = make_worker(net, conn)
    worker.startService()
    net.run(5.0)
    assert worker.followers == {} and not worker.ready
    net.wait(net.login.startService())
    net.run(20.0)
    assert set(worker.followers) == set(net.directory) and worker.ready
    net.wait(worker.stopService())


def render(resource, path: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    request = DummyRequest([])
    request.path, request.method = path, method
    body = resource.render(request)
    return request.responseCode or 200, body


def test_readyz_reports_reasons_and_metrics_are_served():
    """/readyz is 503 with reasons until ready, then 200; /metrics is Prometheus text."""
    reasons = ["no supernode feed is streaming"]
    ops = OperationsResource(lambda: list(reasons))
    status, body = render(ops, b"/readyz")
    assert status == 503 and json.loads(body)["reasons"] == reasons
    reasons.clear()
    assert render(ops, b"/readyz")[0] == 200 and render(ops, b"/healthz")[0] == 200
    status, body = render(ops, b"/metrics")
    assert status == 200 and b"bridge_mirrored_messages_total" in body
    assert render(ops, b"/nope")[0] == 404 and render(ops, b"/readyz", b"POST")[0] == 405


def test_p99_of_lags():
    """p99_ms picks the 99th percentile in milliseconds, None without samples."""
    assert p99_ms([]) is None
    assert p99_ms([i / 1000 for i in range(1, 101)]) == 100


def test_a_worker_reports_ready_as_soon_as_its_first_feed_streams(conn):
    """The heartbeat at start says degraded (no feed yet); the first feed to stream writes
    ready at once, not a heartbeat period later (the migration gates hold on degraded)."""
    net = LegacyNet(3, seed=6).start()
    config = WorkerConfig(worker_id="w1", bootstrap_host=HOST, bootstrap_port=net.login_port,
                          heartbeat_s=60.0, follower=FollowerConfig(linger_s=0.01))
    worker = BridgeWorker(net.clock, net.net, InlineDatabase(conn), PEER_SECRET,
                          random.Random(1), config)
    states = []
    worker.startService()
    for _ in range(500):  # half a simulated second: far less than one heartbeat period
        net.run(0.001)
        row = conn.execute("SELECT state FROM bridge_workers").fetchone()
        if row and (not states or states[-1] != row[0]):
            states.append(row[0])
    assert states == ["degraded", "ready"] and worker.ready
    assert conn.execute("SELECT feeds FROM bridge_workers").fetchone()[0] >= 1
    net.wait(worker.stopService())


def test_the_heartbeat_reports_the_outbox_as_the_injector_last_counted_it(conn):
    """Each heartbeat carries the pending outbox rows and the oldest's age (detail), so
    status and operators see a stuck cloud -> legacy leg from the workers' own reports."""
    from bridge.outbox import InjectorConfig, OutboxInjector

    net = LegacyNet(3, seed=6).start()
    config = WorkerConfig(worker_id="w1", bootstrap_host=HOST, bootstrap_port=net.login_port,
                          heartbeat_s=1.0, follower=FollowerConfig(linger_s=0.01))
    worker = BridgeWorker(
        net.clock, net.net, InlineDatabase(conn), PEER_SECRET, random.Random(1), config,
        injector_factory=lambda w: OutboxInjector(net.clock, InlineDatabase(conn), w,
                                                  random.Random(2), InjectorConfig()))
    net.clock.advance(5)  # rows 4.5 s old: the store keeps no time before the epoch (0024)
    now_ms = round(net.clock.seconds() * 1000)
    for seq in (1, 2):  # waiting rows (of no message: nothing will ever inject them)
        conn.execute("INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, "
                     "created_ms) VALUES (%s, %s, %s, %s)",
                     (uuid.UUID(int=1), seq, uuid.uuid4(), now_ms - 4_500))
    worker.startService()
    net.run(2.5)
    detail = conn.execute("SELECT detail FROM bridge_workers WHERE worker_id = 'w1'"
                          ).fetchone()[0]
    assert detail["outbox_pending"] == 2 and detail["outbox_oldest_age_ms"] >= 4_500
    net.wait(worker.stopService())


def test_each_discovery_moves_the_one_lease_timer_instead_of_adding_a_balancing_chain(conn):
    """Every discovery asks for a lease balance; the worker keeps a single lease timer, so
    an hour of discoveries balances at the lease pace, not once more per discovery (it
    added a timer chain per discovery: a month-long simulation balanced thousands of
    times a minute)."""
    net = LegacyNet(3, seed=5).start()
    config = WorkerConfig(worker_id="w1", bootstrap_host=HOST, bootstrap_port=net.login_port,
                          heartbeat_s=10.0, discovery_s=5.0, lease_ttl_s=30.0,
                          follower=FollowerConfig(linger_s=0.01))
    balances = []

    class Counting(InlineDatabase):
        def run(self, desc, fn, *args, **kwargs):
            if desc == "live_workers":  # once per balance
                balances.append(net.clock.seconds())
            return super().run(desc, fn, *args, **kwargs)

    worker = BridgeWorker(net.clock, net.net, Counting(conn), PEER_SECRET, random.Random(1),
                          config)
    worker.startService()
    net.run(3600.0)
    assert set(worker.followers) == set(net.directory)
    timers = [c for c in net.clock.getDelayedCalls() if c.func == worker._lease_tick]
    assert len(timers) == 1
    # a balance every lease_ttl_s / 3 = 10 s (plus the first ones): about 360, not 720 more
    # for the 720 discoveries
    assert 300 <= len(balances) <= 420, len(balances)
    net.wait(worker.stopService())


class HangingHeartbeats:
    """The store, but a heartbeat transaction that never ends while *hang* is set (a
    statement stuck on a lock: what only the systemd watchdog can end)."""

    def __init__(self, inner) -> None:
        self.inner, self.hang = inner, False

    def run(self, desc, fn, *args, **kwargs):
        if self.hang and desc == "heartbeat_worker":
            return defer.Deferred()
        return self.inner.run(desc, fn, *args, **kwargs)


def test_a_worker_whose_heartbeats_stop_finishing_is_stalled_but_not_one_in_an_outage(conn):
    """stalled() (what the systemd watchdog asks) is None while heartbeats finish, also when
    they fail because the store is down, and says why once none finished for 6 intervals."""
    net = LegacyNet(3, seed=4).start()
    db = HangingHeartbeats(ScriptedDatabase.down_for(InlineDatabase(conn), 0))
    worker = make_worker(net, conn, db)
    worker.startService()
    net.run(3.0)
    assert worker.stalled() is None and worker.db_ok
    # down for the next 10 s, whatever runs (the heartbeat reads the operator's controls and
    # the store's gauges too, so count transactions generously)
    db.inner.faults = [DatabaseUnavailable("server closed the connection")] * 10_000
    net.run(10.0)  # heartbeat_s = 1: ten failed heartbeats, each finished at once
    assert not worker.db_ok and worker.stalled() is None
    db.inner.faults = []
    db.hang = True
    net.run(5.5)
    assert worker.stalled() is None  # within 6 heartbeat intervals
    net.run(1.0)
    assert worker.stalled() is not None and "no heartbeat has finished for" in worker.stalled()
    db.hang = False  # the last heartbeat of the stop goes through
    net.wait(worker.stopService())
