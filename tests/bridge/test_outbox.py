"""Cloud -> legacy: the outbox injector against real PostgreSQL and the in-memory legacy network.

The injector, the supernodes and the network all run on the LegacyNet's one ``SimClock`` and
the store runs inline (``InlineDatabase``), so a tick, its injections and their Acks happen
inside ``net.run`` and every scenario is exact. The NOTIFY listener is the one part that needs
a real thread: it is tested against the real database with a stub reactor.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import attrs
import psycopg
import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer, error

from bridge import ids
from bridge.outbox import (
    InjectorConfig,
    LegacyPeers,
    OutboxInjector,
    fail_outbox_item,
    record_pass,
    refuse_outbox_item,
)
from cloud.db import DatabaseUnavailable, InlineDatabase, TransactionRunner
from cloud.model import Message
from cloud.store import accounts as accounts_store
from cloud.store import messages as messages_store
from cloud.store import outbox as outbox_store
from legacy import wire
from legacy.peer import PeerConnection, connect_peer
from legacy.supernode import Supernode
from servicekit.loop import LoopState
from servicekit.retry import RetryPolicy
from tests.cloud.store.storefixture import NOW
from tests.dbfixture import ScriptedDatabase, make_account, make_conversation, round_trips, tx
from tests.legacy.netfixture import PEER_SECRET, LegacyNet

T0 = 1_700_000_000.0  # seconds; the simulated clock starts here so stored times look real
FAST = InjectorConfig(batch=200, claim_s=5.0, poll_interval_s=0.5, inject_timeout_s=1.0,
                      retry=RetryPolicy(initial_s=0.5, factor=2, cap_s=2, jitter=0.5),
                      window=4)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def outbox_rows(conn, cid: uuid.UUID) -> list[tuple]:
    return conn.execute("SELECT seq, state, attempts, claimed_until_ms, last_error "
                        "FROM outbox_to_legacy WHERE conversation_id = %s ORDER BY seq",
                        (cid,)).fetchall()


def findings(conn) -> list[tuple]:
    return conn.execute("SELECT kind, state, conversation_id, detail FROM reconcile_findings "
                        "ORDER BY finding_id").fetchall()


class NetPeers:
    """``LegacyPeers`` over a LegacyNet: one connection per supernode, reopened in the
    background when it closed (``for_chat`` answers None until it is back), as the worker's
    TCP implementation does."""

    def __init__(self, net: LegacyNet) -> None:
        self.net = net
        self.conns = {sn: net.peer(sn, name="bridge-test") for sn in net.supernodes}
        self.connecting: set[str] = set()

    def for_chat(self, chat_id: str) -> PeerConnection | None:
        return self.to(self.net.ring.home_of(chat_id))

    def any(self) -> PeerConnection | None:
        return next(filter(None, (self.to(sn) for sn in sorted(self.net.supernodes))), None)

    def to(self, sn: str) -> PeerConnection | None:
        conn = self.conns.get(sn)
        if conn is not None and not conn.closed.called:
            return conn
        self.conns.pop(sn, None)
        if sn not in self.connecting:
            self.connecting.add(sn)
            addr = self.net.directory[sn]
            d = connect_peer(self.net.net, addr.host, addr.port, name="bridge-test",
                             secret=PEER_SECRET)
            d.addCallbacks(lambda c: self.conns.__setitem__(sn, c), lambda f: None)
            d.addBoth(lambda _: self.connecting.discard(sn))
        return None


class SilentPeer:
    """A connection whose supernode never answers."""

    def inject_batch(self, chat_id: str, members: tuple, messages: list) -> defer.Deferred:
        return defer.Deferred()


class ScriptedPeers:
    """Answers the next ``for_chat`` calls as scripted, then like *inner*.

    ``down``: None; ``silent``: a peer that never answers; ``wrong_home``: a connection to a
    supernode that is not the chat's home (it answers ``not_home``); ``lost``: a connection
    that fails the request with ConnectionLost.
    """

    def __init__(self, inner: NetPeers, script: list[str]) -> None:
        self.inner = inner
        self.script = list(script)
        self.calls = 0

    def for_chat(self, chat_id: str):
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if step == "down":
            return None
        if step == "silent":
            return SilentPeer()
        if step == "wrong_home":
            home = self.inner.net.ring.home_of(chat_id)
            return self.inner.to(next(sn for sn in sorted(self.inner.conns) if sn != home))
        if step == "lost":
            lost = SilentPeer()
            lost.inject_batch = lambda c, ms, m: defer.fail(error.ConnectionLost("gone"))
            return lost
        return self.inner.for_chat(chat_id)

    def any(self):
        return self.inner.any()


@attrs.define
class Scene:
    conn: psycopg.Connection
    net: LegacyNet
    peers: NetPeers
    #: what the injector uses: *peers*, or the test's wrapper around them
    links: LegacyPeers
    injector: OutboxInjector

    def now_ms(self) -> int:
        return round(self.net.clock.seconds() * 1000)

    def post(self, cid: uuid.UUID, sender: uuid.UUID, body: str,
             sent_ms: int | None = None) -> Message:
        message, created = tx(self.conn, messages_store.post_message, cid, sender,
                              str(uuid.uuid4()), body,
                              self.now_ms() if sent_ms is None else sent_ms)
        assert created
        return message

    def history(self, chat_id: str) -> list[wire.ChatMessage]:
        return self.net.supernodes[self.net.ring.home_of(chat_id)].history(chat_id)

    def run(self, seconds: float) -> None:
        self.net.run(seconds)

    def stop_home(self, cid: uuid.UUID) -> Supernode:
        """Stop the home supernode of *cid*'s chat (to the injector: unreachable); return it."""
        home = self.net.supernodes[self.net.ring.home_of(ids.chat_for_cloud_conversation(cid))]
        self.net.wait(home.stopService())
        self.run(0.1)
        return home


@pytest.fixture
def make_scene(conn):
    """Build a Scene: a 4-supernode LegacyNet at T0 and an injector on its clock."""
    made: list[Scene] = []

    def make(*, config: InjectorConfig = FAST, seed: int = 0,
             wrap_peers: Callable[[NetPeers], LegacyPeers] | None = None,
             db: TransactionRunner | None = None, start: bool = True) -> Scene:
        net = LegacyNet(4)
        net.clock.advance(T0)
        net.start()
        peers = NetPeers(net)
        links = wrap_peers(peers) if wrap_peers else peers
        injector = OutboxInjector(net.clock, db or InlineDatabase(conn), links,
                                  random.Random(seed), config)
        if start:
            injector.startService()
        made.append(Scene(conn, net, peers, links, injector))
        return made[-1]

    yield make
    for s in made:
        if s.injector.running:
            s.injector.stopService()


@pytest.fixture
def outbox_log(log_events):
    return log_events("bridge.outbox")


def two_party(conn, a: str = "alice", b: str = "bob") -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """*a* (dual) and *b* (legacy) in one conversation: (conversation, a, b)."""
    alice, bob = make_account(conn, a), make_account(conn, b, "legacy")
    return make_conversation(conn, alice, bob), alice, bob


# ---------------------------------------------------------------- configuration

def test_injector_config_is_validated():
    """A nonsensical injector configuration fails when it is built, naming the field."""
    for kwargs, name in (({"batch": 0}, "batch"), ({"window": 0}, "window"),
                         ({"per_conversation": 0}, "per_conversation"),
                         ({"poll_interval_s": 0}, "poll_interval_s"),
                         ({"inject_timeout_s": -1}, "inject_timeout_s"),
                         ({"claim_s": 5, "inject_timeout_s": 5}, "claim_s")):
        with pytest.raises(ValueError, match=name):
            InjectorConfig(**kwargs)
    with pytest.raises(TypeError, match="retry"):
        InjectorConfig(retry=5)


# ---------------------------------------------------------------- delivery

def test_cloud_messages_reach_the_home_supernode_in_seq_order(conn, make_scene):
    """Each posted message is injected once at its chat's home: derived GUID, origin cloud."""
    s = make_scene(start=False)
    born, alice, bob = two_party(conn)
    carol = make_account(conn, "carol", "legacy")
    linked = make_conversation(conn, alice, carol, chat="legacy-chat-7")
    sent = [s.post(born, alice if i % 2 else bob, f"born {i}") for i in range(5)]
    s.run(0.25)
    sent += [s.post(linked, carol, "linked 0"), s.post(linked, alice, "linked 1")]
    mirrored, lag = (metric("bridge_mirrored_messages_total", direction="to_legacy"),
                     metric("bridge_mirror_lag_seconds_count", direction="to_legacy"))
    s.injector.startService()
    s.run(1)

    born_chat = ids.chat_for_cloud_conversation(born)
    for chat_id, messages in ((born_chat, sent[:5]), ("legacy-chat-7", sent[5:])):
        history = sorted(s.history(chat_id), key=lambda m: m.legacy_seq)
        assert [(m.guid, m.sender, m.body, m.ts_ms, m.origin) for m in history] == [
            (ids.guid_for_cloud_message(m.message_id), m.sender_handle, m.body, m.sent_ms,
             "cloud") for m in messages]
    assert s.injector.injected == 7 and s.injector.duplicates == s.injector.skipped == 0
    assert metric("bridge_mirrored_messages_total", direction="to_legacy") - mirrored == 7
    assert metric("bridge_mirror_lag_seconds_count", direction="to_legacy") - lag == 7
    assert metric("bridge_backlog_messages", direction="to_legacy") == 0
    assert [r[1] for r in outbox_rows(conn, born) + outbox_rows(conn, linked)] == ["done"] * 7
    guids = dict(conn.execute("SELECT message_id, legacy_guid FROM messages").fetchall())
    assert guids == {m.message_id: ids.guid_for_cloud_message(m.message_id) for m in sent}
    assert conn.execute("SELECT legacy_chat_id FROM conversations WHERE conversation_id = %s",
                        (born,)).fetchone()[0] == born_chat


def test_the_injector_sends_the_guid_the_store_holds(conn, make_scene):
    """A message goes to legacy under the GUID its row in the store has (so both stacks'
    digests hash the same GUID); one queued without a GUID gets the made-up one, and the
    store records it."""
    s = make_scene()
    cid, alice, _ = two_party(conn)
    for i in range(2):
        s.post(cid, alice, f"m{i}")
    conn.execute("UPDATE messages SET legacy_guid = 'cloud:as-stored' WHERE seq = 1")
    conn.execute("UPDATE messages SET legacy_guid = NULL WHERE seq = 2")  # an older writer's
    s.run(1)
    (_, second), = conn.execute("SELECT seq, message_id FROM messages WHERE seq = 2")
    made_up = ids.guid_for_cloud_message(second)
    assert [m.guid for m in s.history(ids.chat_for_cloud_conversation(cid))] == [
        "cloud:as-stored", made_up]
    assert [r[0] for r in conn.execute("SELECT legacy_guid FROM messages ORDER BY seq")] == [
        "cloud:as-stored", made_up]


def test_reinjection_after_a_crash_before_complete_is_a_duplicate(conn, make_scene):
    """A row injected but never completed is injected again: Ack duplicate, nothing new."""
    s = make_scene()
    cid, alice, _ = two_party(conn)
    for i in range(3):
        s.post(cid, alice, f"m{i}")
    s.run(1)
    chat_id = ids.chat_for_cloud_conversation(cid)
    before = s.history(chat_id)
    assert len(before) == 3 and s.injector.injected == 3
    # The crash: the Acks arrived but complete_outbox never committed.
    conn.execute("UPDATE outbox_to_legacy SET state = 'pending', claimed_until_ms = 0, "
                 "done_ms = NULL WHERE conversation_id = %s", (cid,))
    duplicates = metric("bridge_duplicates_suppressed_total", direction="to_legacy")
    s.injector.wake()
    s.run(1)
    assert s.history(chat_id) == before
    assert (s.injector.injected, s.injector.duplicates) == (3, 3)
    assert metric("bridge_duplicates_suppressed_total", direction="to_legacy") - duplicates == 3
    assert [r[1] for r in outbox_rows(conn, cid)] == ["done"] * 3
    # each message has the GUID legacy has it under
    assert sorted(r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %s", (cid,))) == sorted(
        m.guid for m in before)


def test_conversation_whose_legacy_members_went_cloud_only_is_skipped(conn, make_scene):
    """Nobody left on legacy when the row is drained: skipped, nothing injected, no finding."""
    s = make_scene(start=False)
    cid, alice, bob = two_party(conn)
    s.post(cid, alice, "too late for legacy")
    tx(conn, accounts_store.set_phase, alice, "cloud-only")
    tx(conn, accounts_store.set_phase, bob, "cloud-only")
    s.injector.startService()
    s.run(1)
    assert [r[1] for r in outbox_rows(conn, cid)] == ["skipped"]
    chat_id = ids.chat_for_cloud_conversation(cid)
    assert all(sn.history(chat_id) == [] for sn in s.net.supernodes.values())
    assert (s.injector.skipped, s.injector.injected) == (1, 0) and findings(conn) == []


class CountingPeers:
    """Passes through to *inner*, counting injected rows awaiting their answer."""

    def __init__(self, inner: NetPeers) -> None:
        self.inner = inner
        self.in_flight = self.most_in_flight = 0

    def for_chat(self, chat_id: str):
        peer = self.inner.for_chat(chat_id)
        return None if peer is None else CountingPeer(self, peer)

    def any(self):
        return self.inner.any()


@attrs.define
class CountingPeer:
    peers: CountingPeers
    peer: PeerConnection

    def inject_batch(self, chat_id: str, members: tuple, messages: list) -> defer.Deferred:
        self.peers.in_flight += len(messages)
        self.peers.most_in_flight = max(self.peers.most_in_flight, self.peers.in_flight)

        def done(result):
            self.peers.in_flight -= len(messages)
            return result

        return self.peer.inject_batch(chat_id, members, messages).addBoth(done)


def test_conversations_run_concurrently_up_to_the_bound(conn, make_scene):
    """Six conversations with a window of 2: two injections in flight at most, all arrive in
    order."""
    s = make_scene(config=attrs.evolve(FAST, window=2), wrap_peers=CountingPeers,
                   start=False)
    alice = make_account(conn, "alice")
    cids = [make_conversation(conn, alice, make_account(conn, f"friend{i}", "legacy"))
            for i in range(6)]
    for cid in cids:
        for i in range(3):
            s.post(cid, alice, f"m{i}")
    s.injector.startService()
    s.run(1)
    assert s.links.most_in_flight == 2 and s.injector.injected == 18
    for cid in cids:
        history = s.history(ids.chat_for_cloud_conversation(cid))
        assert [m.body for m in sorted(history, key=lambda m: m.legacy_seq)] == [
            "m0", "m1", "m2"]


# ---------------------------------------------------------------- failures and retries

def test_home_supernode_down_rows_wait_with_backoff_then_arrive(conn, make_scene):
    """An unreachable home keeps rows pending, retried with backoff, delivered once it is back."""
    s = make_scene(start=False, seed=3)
    cid, alice, bob = two_party(conn)
    chat_id = ids.chat_for_cloud_conversation(cid)
    home = s.stop_home(cid)
    sent = [s.post(cid, alice, "first"), s.post(cid, bob, "second")]
    retries = metric("bridge_retries_total", what="inject")
    s.injector.startService()
    tick_ms = s.now_ms()
    s.run(0)
    replica = random.Random(3)
    first_delay = FAST.retry.delay(1, replica)
    assert outbox_rows(conn, cid) == [
        (1, "pending", 1, tick_ms + round(first_delay * 1000),
         f"home supernode of {chat_id!r} is unreachable"),
        # the second row waited behind the first, untried: its claim's attempt is given back
        (2, "pending", 0, tick_ms + round(first_delay * 1000),
         f"home supernode of {chat_id!r} is unreachable")]
    s.run(5)
    sent.append(s.post(cid, alice, "third"))
    s.run(3)
    rows = outbox_rows(conn, cid)
    assert all(r[1] == "pending" for r in rows) and rows[0][2] >= 4
    assert s.injector.failures == metric("bridge_retries_total", what="inject") - retries >= 4
    s.net.wait(home.restart())
    s.run(10)
    history = sorted(s.history(chat_id), key=lambda m: m.legacy_seq)
    assert [m.body for m in history] == [m.body for m in sent]
    assert [r[1] for r in outbox_rows(conn, cid)] == ["done"] * 3


@pytest.mark.parametrize("fault", ["down", "silent", "wrong_home", "lost"])
def test_order_per_conversation_is_kept_when_the_first_item_fails(conn, make_scene, fault):
    """The first row fails (no peer, no Ack, not_home, lost link): no later row overtakes it."""
    config = attrs.evolve(FAST, retry=RetryPolicy(initial_s=3, cap_s=3, jitter=0))
    s = make_scene(config=config, wrap_peers=lambda peers: ScriptedPeers(peers, [fault]),
                   start=False)
    cid, alice, bob = two_party(conn)
    sent = [s.post(cid, alice if i % 2 else bob, f"m{i}") for i in range(4)]
    s.injector.startService()
    s.run(FAST.inject_timeout_s + 0.1)  # the first attempt has failed, the retry is at +3 s
    chat_id = ids.chat_for_cloud_conversation(cid)
    assert s.history(chat_id) == [] and s.injector.failures == 1
    # only the first row was tried; the others waited behind it and get their attempt back
    assert [r[:3] for r in outbox_rows(conn, cid)] == [
        (1, "pending", 1), *[(i, "pending", 0) for i in (2, 3, 4)]]
    s.run(5)
    history = sorted(s.history(chat_id), key=lambda m: m.legacy_seq)
    assert [m.guid for m in history] == [ids.guid_for_cloud_message(m.message_id)
                                         for m in sent]
    # the first row took two tries, the others one (their untried claim was given back)
    assert [r[1:3] for r in outbox_rows(conn, cid)] == [("done", 2), *[("done", 1)] * 3]


def test_refused_messages_are_skipped_with_an_inject_refused_finding(conn, make_scene):
    """Legacy will never take these (one member; too old for the SN): skipped plus a finding."""
    s = make_scene(start=False)
    alice = make_account(conn, "alice")
    alone = make_conversation(conn, alice)
    s.post(alone, alice, "talking to myself")
    old, _, bob = two_party(conn, "dora", "bob")
    month_ago = s.now_ms() - 31 * 86_400_000
    s.post(old, bob, "from the archive", sent_ms=month_ago)
    s.injector.startService()
    s.run(1)
    assert [r[1] for r in outbox_rows(conn, alone) + outbox_rows(conn, old)] == ["skipped"] * 2
    assert s.injector.skipped == 2 and s.injector.injected == 0
    got = {cid: (kind, state, detail["reason"]) for kind, state, cid, detail in findings(conn)}
    assert got == {
        alone: ("inject_refused", "open", "fewer than 2 distinct members"),
        old: ("inject_refused", "open", "the supernode refused it: ts_ms is older than this "
                                         "supernode's retention window")}
    old_chat = ids.chat_for_cloud_conversation(old)
    assert s.history(old_chat) == []
    # a conversation none of whose rows would go gets no legacy chat; one legacy refused
    # after the send has its chat recorded (it was sent)
    assert dict(conn.execute("SELECT conversation_id, legacy_chat_id FROM conversations"
                             ).fetchall()) == {alone: None, old: old_chat}
    # Safe to run twice: the row is no longer pending, so no second finding.
    item = outbox_store.OutboxItem(old, 1, uuid.uuid4(), None, "bob", month_ago, "", (), 1, 1)
    assert tx(conn, refuse_outbox_item, item, old_chat, "again", s.now_ms()) is False
    assert len(findings(conn)) == 2


def test_a_message_whose_sender_is_not_among_its_members_is_refused(conn, make_scene):
    """A row whose member list leaves out its sender: skipped with a finding saying so,
    nothing injected."""
    s = make_scene(start=False)
    cid, alice, _ = two_party(conn)
    s.post(cid, alice, "from outside")
    conn.execute("UPDATE outbox_to_legacy SET member_handles = %s WHERE conversation_id = %s",
                 (["bob", "carol"], cid))
    s.injector.startService()
    s.run(1)
    assert [r[1] for r in outbox_rows(conn, cid)] == ["skipped"]
    assert [(kind, detail["reason"]) for kind, _, _, detail in findings(conn)] == [
        ("inject_refused", "the sender is not among the members")]
    assert legacy_bodies(s, cid) == [] and s.injector.injected == 0


def test_loop_survives_database_outages_and_unexpected_errors(conn, make_scene, outbox_log):
    """Failed ticks are counted and retried; an outage is logged once, a bug with traceback."""
    down = DatabaseUnavailable("connection refused")
    faults = [down, down, None, down, RuntimeError("bug in a tick"), None]
    s = make_scene(db=ScriptedDatabase(InlineDatabase(conn), outbox_store.claim_outbox, faults),
                   start=False)
    cid, alice, _ = two_party(conn)
    s.post(cid, alice, "hello")
    before = {r: metric("bridge_outbox_loop_failures_total", reason=r)
              for r in ("database_unavailable", "error")}
    s.injector.startService()
    s.run(0)
    assert s.injector.state is LoopState.WAITING and not s.injector.ready
    s.run(5)
    assert s.injector.ready and s.injector.injected == 1 and s.injector.ticks >= len(faults)
    assert [r[1] for r in outbox_rows(conn, cid)] == ["done"]
    after = {r: metric("bridge_outbox_loop_failures_total", reason=r) - before[r]
             for r in before}
    assert after == {"database_unavailable": 3, "error": 1}
    assert s.injector.loop_failures == 4
    formats = [e["log_format"] for e in outbox_log]
    assert sum(f.startswith("database unavailable") for f in formats) == 2  # two outages
    assert sum(f.startswith("database reachable again") for f in formats) == 2
    [bug] = [e for e in outbox_log if "log_failure" in e]
    assert bug["log_failure"].check(RuntimeError)


def test_database_lost_after_the_acks_reinjects_once_the_claim_runs_out(conn, make_scene):
    """The Acks arrived but their one completion failed: the rows come due after claim_s and
    are injected again (Ack duplicate, nothing new on legacy), in order."""
    down = DatabaseUnavailable("server closed the connection")
    s = make_scene(db=ScriptedDatabase(InlineDatabase(conn), record_pass, [down]), start=False)
    cid, alice, _ = two_party(conn)
    s.post(cid, alice, "once")
    s.post(cid, alice, "twice")
    s.injector.startService()
    s.run(1)
    chat_id = ids.chat_for_cloud_conversation(cid)
    assert len(s.history(chat_id)) == 2  # both acknowledged, recorded together: not at all
    assert [r[1] for r in outbox_rows(conn, cid)] == ["pending", "pending"]
    assert (s.injector.injected, s.injector.duplicates) == (0, 0)
    s.run(FAST.claim_s)
    assert [m.body for m in sorted(s.history(chat_id), key=lambda m: m.legacy_seq)] == [
        "once", "twice"]
    assert (s.injector.injected, s.injector.duplicates) == (0, 2)
    assert [r[1:3] for r in outbox_rows(conn, cid)] == [("done", 2), ("done", 2)]


def test_a_conversations_acknowledged_rows_are_completed_in_one_transaction(conn, make_scene):
    """Five rows of one conversation: one completion transaction, not one per message."""
    calls: list[str] = []

    class Recording(InlineDatabase):
        def run(self, desc, fn, *args, **kwargs):
            calls.append(desc)
            return super().run(desc, fn, *args, **kwargs)

    s = make_scene(db=Recording(conn), start=False)
    cid, alice, _ = two_party(conn)
    for i in range(5):
        s.post(cid, alice, f"m{i}")
    s.injector.startService()
    s.run(1)
    assert s.injector.injected == 5 and [r[1] for r in outbox_rows(conn, cid)] == ["done"] * 5
    assert calls.count("complete_outbox_batch") == 1 and "complete_outbox" not in calls


def test_a_late_completion_from_an_expired_claim_is_counted_and_changes_nothing(
        conn, make_scene, outbox_log):
    """The claim ran out and another claimant took the rows before the Acks were recorded:
    the late completion writes nothing, and says so."""
    s = make_scene(start=False)
    cid, alice, _ = two_party(conn)
    s.post(cid, alice, "slow")
    # queued by an older writer without its GUID: a completion under its claim would add it
    conn.execute("UPDATE messages SET legacy_guid = NULL")
    message = "SELECT ctid, legacy_guid FROM messages"
    posted = conn.execute(message).fetchall()

    class Overtaken(InlineDatabase):
        def run(self, desc, fn, *args, **kwargs):
            if desc == "complete_outbox_batch":  # another worker claims them first
                tx(conn, outbox_store.claim_outbox, s.now_ms() + 10 * 60_000, 10, 5000)
            return super().run(desc, fn, *args, **kwargs)

    s.injector._db = Overtaken(conn)
    s.injector.startService()
    s.run(1)
    assert (s.injector.injected, s.injector.late_claims) == (0, 1)
    assert [r[1:3] for r in outbox_rows(conn, cid)] == [("pending", 2)]
    assert conn.execute(message).fetchall() == posted  # the message as it was
    assert [e["what"] for e in outbox_log if "ran out before" in e["log_format"]] == ["complete"]


# ---------------------------------------------------------------- pacing and stopping

def test_wake_ticks_at_once_and_a_full_batch_ticks_again(conn, make_scene):
    """NOTIFY (wake) does not wait for the poll; a claim of a full batch is followed by
    another at once, one that was not full is not (what waits is behind its conversations,
    and the pass that ends wakes the loop)."""
    s = make_scene(config=attrs.evolve(FAST, poll_interval_s=60.0, batch=2, per_conversation=2))
    s.run(0)
    assert s.injector.ticks == 1
    cid, alice, _ = two_party(conn)
    for i in range(5):
        s.post(cid, alice, f"m{i}")
    s.run(1)
    assert s.injector.ticks == 1 and s.injector.injected == 0
    s.injector.wake()
    s.run(0.5)
    # 2 + 2 + 1 within half a second of a 60 s poll: a full claim is followed at once by
    # another (which finds the conversation's head claimed: nothing), and a pass that ends
    # with rows due behind it wakes the loop for them; the claim of 1 is not followed at
    # once, and its pass, which leaves nothing due, ends without a tick
    assert s.injector.injected == 5 and s.injector.ticks == 1 + 2 * 2 + 1
    assert s.injector.state is LoopState.WAITING


class Hooked(InlineDatabase):
    """Runs every transaction at once, records how many rows each claim took (``claims``),
    and runs the next callback queued for a transaction just before it (``before[desc]``)
    or just after it (``after[desc]``): a post or a NOTIFY that lands at that moment."""

    def __init__(self, conn) -> None:
        super().__init__(conn)
        self.claims: list[int] = []
        self.before: dict[str, list[Callable[[], object]]] = {}
        self.after: dict[str, list[Callable[[], object]]] = {}

    def run(self, desc, fn, *args, **kwargs):
        if self.before.get(desc):
            self.before[desc].pop(0)()
        d = super().run(desc, fn, *args, **kwargs)
        if desc == "claim_outbox":
            self.claims.append(len(d.result) if isinstance(d.result, list) else -1)
        if self.after.get(desc):
            self.after[desc].pop(0)()
        return d


class FailingOnce:
    """Runs every transaction on *inner*, but the first one named *desc* raises."""

    def __init__(self, inner, desc: str) -> None:
        self.inner, self.desc, self.failed = inner, desc, False

    def run(self, desc, fn, *args, **kwargs):
        if desc == self.desc and not self.failed:
            self.failed = True
            return defer.fail(RuntimeError("injected failure"))
        return self.inner.run(desc, fn, *args, **kwargs)


def test_a_chat_id_that_could_not_be_recorded_holds_back_only_its_conversation(
        conn, make_scene, outbox_log):
    """Recording a cloud-born conversation's chat id fails unexpectedly: its rows go back
    untried, due after the retry delay, and arrive then; the pass's other conversation
    goes on at once."""
    s = make_scene(start=False, db=FailingOnce(InlineDatabase(conn), "map_cloud_chats"))
    born, alice, _ = two_party(conn)
    carol = make_account(conn, "carol", "legacy")
    linked = make_conversation(conn, alice, carol, chat="legacy-chat-7")
    s.post(born, alice, "born")
    s.post(linked, alice, "linked")
    s.injector.startService()
    s.run(0.1)
    assert [m.body for m in s.history("legacy-chat-7")] == ["linked"]
    assert legacy_bodies(s, born) == []
    (row,) = conn.execute("SELECT state, attempts, last_error FROM outbox_to_legacy "
                          "WHERE conversation_id = %s", (born,)).fetchall()
    assert row[:2] == ("pending", 0) and "chat id could not be recorded" in row[2]
    assert s.injector.loop_failures == 1
    s.run(5)
    assert legacy_bodies(s, born) == ["born"]
    assert [r[1] for r in outbox_rows(conn, born)] == ["done"]


def test_a_conversation_whose_chat_id_was_not_recorded_is_let_go(conn, make_scene):
    """Recording a cloud-born conversation's chat id fails once: its rows go back and its
    pass lets go of it all the same (it is not left held), so its next post's NOTIFY starts
    a claim at once, not at the next poll."""
    s = make_scene(start=False, db=FailingOnce(InlineDatabase(conn), "map_cloud_chats"),
                   config=attrs.evolve(FAST, poll_interval_s=60.0))
    born, alice, _ = two_party(conn)
    s.post(born, alice, "first")
    s.injector.startService()
    s.run(0.1)
    assert s.injector.loop_failures == 1 and legacy_bodies(s, born) == []
    assert s.injector.passes_in_flight == 0 and not s.injector._held
    s.run(FAST.retry.cap_s + 1)  # "first" is due again after its retry delay
    s.injector.notified(str(born))
    s.run(0.5)
    assert legacy_bodies(s, born) == ["first"]
    s.post(born, alice, "second")
    s.injector.notified(str(born))
    s.run(0.5)
    assert legacy_bodies(s, born) == ["first", "second"]


def test_a_notify_for_a_conversation_a_pass_holds_waits_for_that_pass_to_end(conn, make_scene):
    """A NOTIFY naming a conversation this injector's pass in flight holds starts no claim
    (none could take its row before the pass ends); one naming another conversation, or
    none, does; the pass that ends wakes the loop."""
    s = make_scene(config=attrs.evolve(FAST, poll_interval_s=60.0),
                   wrap_peers=lambda p: ScriptedPeers(p, ["silent"]))
    held, alice, _ = two_party(conn)
    other, carol, _ = two_party(conn, "carol", "dave")
    s.post(held, alice, "first")
    s.injector.notified(str(held))
    s.run(0.1)  # claimed; its pass waits on a supernode that does not answer
    assert s.injector.passes_in_flight == 1
    ticks = s.injector.ticks
    s.post(held, alice, "second")
    s.injector.notified(str(held))
    s.run(0.1)
    assert s.injector.ticks == ticks
    for payload in (str(other), None, "not a conversation id"):
        s.injector.notified(payload)
        s.run(0.1)
        ticks += 1
        assert s.injector.ticks == ticks
    s.run(3)  # the silent request times out (both rows go back, for a retry) and the
    # pass that ends wakes the loop at once, not at the 60 s poll
    assert s.injector.passes_in_flight == 0 and s.injector.ticks == ticks + 1
    s.run(61)
    assert legacy_bodies(s, held) == ["first", "second"]


def test_a_notify_that_comes_while_a_claim_runs_claims_again_only_for_what_it_left(
        conn, make_scene):
    """A NOTIFY that arrives while a claim runs, naming a conversation that claim takes,
    starts no second claim (its pass holds the conversation; the pass that ends wakes the
    loop); one naming a conversation whose row came too late for the claim starts one at
    once, not at the next poll."""
    db = Hooked(conn)
    claims = db.claims
    # the NOTIFY comes after the claim's query, before the claim is in
    during = db.after.setdefault("claim_outbox", [])
    s = make_scene(db=db, start=False, config=attrs.evolve(FAST, poll_interval_s=60.0))
    taken, alice, _ = two_party(conn)
    late, carol, _ = two_party(conn, "carol", "dave")
    s.post(taken, alice, "taken")
    during.append(lambda: s.injector.notified(str(taken)))
    s.injector.startService()
    s.run(0.5)
    # the claim alone (a NOTIFY during the claim started another, which found the
    # conversation held; the pass that ends, with nothing due behind it, starts none)
    assert claims == [1] and legacy_bodies(s, taken) == ["taken"]
    # a row of the conversation the claim takes, committed after its query: the pass that
    # ends finds it due and claims it at once
    s.post(taken, alice, "again")
    during.append(lambda: (s.post(taken, alice, "after the claim's query"),
                           s.injector.notified(str(taken))))
    s.injector.notified(str(taken))
    s.run(0.5)
    assert claims == [1, 1, 1] and legacy_bodies(s, taken) == [
        "taken", "again", "after the claim's query"]
    s.run(1)
    del claims[:]

    def late_post() -> None:
        s.post(late, carol, "late")
        s.injector.notified(str(late))

    during.append(late_post)
    s.injector.notified(None)  # a claim that finds nothing; the late row comes meanwhile
    s.run(0.5)
    assert claims == [0, 1], claims  # the late row at once, not at the 60 s poll
    assert legacy_bodies(s, late) == ["late"]


def test_a_pass_that_ends_claims_again_only_for_rows_due_behind_it(conn, make_scene):
    """A pass ends without a claim when nothing of its conversations is due; a row that
    came while it held the conversation is claimed when it ends, not at the next poll:
    one its recording saw (here posted without a NOTIFY, as a post behind a waiting row
    sends none), and one that committed after it, whose NOTIFY came while it was held."""
    db = Hooked(conn)
    claims = db.claims
    s = make_scene(db=db, start=False, config=attrs.evolve(FAST, poll_interval_s=60.0))
    cid, alice, _ = two_party(conn)
    s.post(cid, alice, "first")
    s.injector.startService()
    s.run(0.5)
    assert claims == [1]  # its pass left nothing due: no claim after it
    # before the recording: it sees this row
    db.before["complete_outbox_batch"] = [lambda: s.post(cid, alice, "seen by the recording")]
    s.post(cid, alice, "second")
    s.injector.notified(str(cid))
    s.run(0.5)
    assert claims == [1, 1, 1] and legacy_bodies(s, cid) == [
        "first", "second", "seen by the recording"]

    # after the recording: only its NOTIFY tells
    db.after["complete_outbox_batch"] = [lambda: (s.post(cid, alice, "after the recording"),
                                                  s.injector.notified(str(cid)))]
    s.post(cid, alice, "third")
    s.injector.notified(str(cid))
    s.run(0.5)
    assert claims == [1, 1, 1, 1, 1] and legacy_bodies(s, cid)[-2:] == [
        "third", "after the recording"]


@pytest.mark.parametrize("passes", [1, 2])
def test_the_next_batch_is_claimed_while_the_last_is_injected(conn, make_scene, passes):
    """With two passes, the second conversation's rows are claimed before the first's are
    recorded (database and supernode round trips overlap); with one, claims and records
    alternate. Either way every row arrives, in order."""
    calls: list[str] = []

    class Recording(InlineDatabase):
        def run(self, desc, fn, *args, **kwargs):
            calls.append(desc)
            return super().run(desc, fn, *args, **kwargs)

    s = make_scene(db=Recording(conn), start=False, config=attrs.evolve(
        FAST, batch=2, per_conversation=2, passes=passes))
    first, alice, _ = two_party(conn)
    second, carol, _ = two_party(conn, "carol", "dave")
    for i in range(2):
        s.post(first, alice, f"a{i}")
        s.post(second, carol, f"c{i}")
    s.injector.startService()
    s.run(1)
    assert s.injector.injected == 4
    for cid in (first, second):
        assert [r[1] for r in outbox_rows(conn, cid)] == ["done"] * 2
    steps = [c for c in calls if c in ("claim_outbox", "complete_outbox_batch")]
    if passes == 2:
        assert steps[:3] == ["claim_outbox", "claim_outbox", "complete_outbox_batch"]
    else:
        assert steps[:4] == ["claim_outbox", "complete_outbox_batch"] * 2


def test_stop_waits_for_the_pass_in_flight_and_hands_back_the_rest(conn, make_scene):
    """stopService fires after the pass in flight (its injection); unsent rows are due at once (a
    window of 1 keeps the second row waiting to be sent)."""
    s = make_scene(config=attrs.evolve(FAST, window=1), start=False)
    cid, alice, _ = two_party(conn)
    for i in range(3):
        s.post(cid, alice, f"m{i}")
    s.injector.startService()
    s.run(0)  # claimed; the first injection waits for its Ack on the network
    assert s.injector.passes_in_flight == 1
    stopped = s.injector.stopService()
    assert not stopped.called
    s.run(1)
    assert stopped.called and s.injector.state is LoopState.IDLE
    rows = outbox_rows(conn, cid)
    assert [r[1] for r in rows] == ["done", "pending", "pending"]
    assert all(r[3] <= s.now_ms() for r in rows[1:])  # handed back, not left claimed
    successor = OutboxInjector(s.net.clock, InlineDatabase(conn), s.peers, random.Random(1),
                               FAST)
    successor.startService()
    s.run(1)
    successor.stopService()
    assert [r[1] for r in outbox_rows(conn, cid)] == ["done"] * 3
    assert [m.body for m in sorted(s.history(ids.chat_for_cloud_conversation(cid)),
                                   key=lambda m: m.legacy_seq)] == ["m0", "m1", "m2"]


def test_a_row_that_keeps_failing_is_given_up_with_a_finding_and_the_rest_go_on(conn,
                                                                                make_scene):
    """After max_attempts failed injections the conversation's head row is given up (state
    failed, an inject_failed finding naming the message, the metric); its later rows are not
    held behind it, and arrive once the home supernode is back."""
    config = attrs.evolve(FAST, max_attempts=3)
    s = make_scene(config=config, start=False, seed=4)
    cid, alice, bob = two_party(conn)
    chat_id = ids.chat_for_cloud_conversation(cid)
    home = s.stop_home(cid)
    doomed = s.post(cid, alice, "never arrives")
    given_up = metric("bridge_outbox_given_up_total")
    s.injector.startService()
    s.run(6)  # three failed attempts: given up; the row after it was never posted yet
    rows = outbox_rows(conn, cid)
    assert [(r[0], r[1], r[2]) for r in rows] == [(1, "failed", 3)]
    assert "given up after 3 attempts" in rows[0][4]
    assert metric("bridge_outbox_given_up_total") - given_up == 1 == s.injector.given_up
    [(_kind, state, conversation, detail)] = [
        f for f in findings(conn) if f[0] == "inject_failed"]
    assert (state, conversation) == ("open", cid)
    assert detail["message_id"] == str(doomed.message_id)
    assert detail["attempts"] == 3 and "unreachable" in detail["reason"]
    later = s.post(cid, bob, "arrives")
    s.net.wait(home.restart())
    s.run(5)
    assert [m.body for m in s.history(chat_id)] == [later.body]
    assert [r[1] for r in outbox_rows(conn, cid)] == ["failed", "done"]


def test_a_failing_row_older_than_max_age_is_given_up_at_its_next_failure(conn, make_scene):
    """max_age_s bounds a row's retries by time too: a failure after it is a give-up."""
    config = attrs.evolve(FAST, max_age_s=60.0)
    s = make_scene(config=config, start=False, seed=5)
    cid, alice, _bob = two_party(conn)
    s.stop_home(cid)
    s.post(cid, alice, "posted long ago", sent_ms=s.now_ms() - 120_000)
    s.injector.startService()
    s.run(0)
    [(seq, state, attempts, _until, error)] = outbox_rows(conn, cid)
    assert (state, attempts) == ("failed", 1) and "given up after 1 attempts and 120 s" in error


def test_the_backlog_is_counted_every_few_seconds_not_every_pass(conn, make_scene):
    """Pending rows and the oldest's age reach the metrics; the count runs at most every
    backlog_every_s, however often the loop ticks."""
    config = attrs.evolve(FAST, backlog_every_s=5.0)
    s = make_scene(config=config, start=False)
    cid, alice, _bob = two_party(conn)
    s.stop_home(cid)
    s.post(cid, alice, "waits", sent_ms=s.now_ms())
    counted = [0]
    real = outbox_store.outbox_backlog

    def counting(conn_, now_ms):
        counted[0] += 1
        return real(conn_, now_ms)

    s.injector._db = CountingDatabase(InlineDatabase(conn), "outbox_backlog", counting)
    s.injector.startService()
    s.run(4.9)
    assert counted[0] == 1 and s.injector.ticks > 3
    assert metric("bridge_outbox_pending") == 1.0
    s.run(5.0)
    assert counted[0] == 2
    assert metric("bridge_outbox_oldest_age_seconds") >= 5.0


class CountingDatabase:
    """Runs every transaction on *inner*, but the one named *desc* through *replacement*."""

    def __init__(self, inner, desc: str, replacement) -> None:
        self.inner, self.desc, self.replacement = inner, desc, replacement

    def run(self, desc, fn, *args, **kwargs):
        return self.inner.run(desc, self.replacement if desc == self.desc else fn,
                              *args, **kwargs)


def test_a_give_up_from_an_expired_claim_changes_nothing(conn):
    """A worker whose claim ran out can not fail a row another worker now holds: no state
    change, no finding; under the live claim the give-up takes effect."""
    cid, alice, _bob = two_party(conn)
    now = round(T0 * 1000)
    tx(conn, messages_store.post_message, cid, alice, "c1", "hello", now)
    [stale] = tx(conn, outbox_store.claim_outbox, now, 10, 1000)
    [fresh] = tx(conn, outbox_store.claim_outbox, now + 2000, 10, 1000)
    assert tx(conn, fail_outbox_item, stale, "late", now + 2001) is False
    assert [r[1] for r in outbox_rows(conn, cid)] == ["pending"] and findings(conn) == []
    assert tx(conn, fail_outbox_item, fresh, "given up", now + 2002) is True
    assert [r[1] for r in outbox_rows(conn, cid)] == ["failed"]
    assert [f[0] for f in findings(conn)] == ["inject_failed"]


def test_rows_waiting_behind_a_failing_row_are_not_given_up_with_it(conn, make_scene):
    """attempts counts injections tried: the rows queued behind a row that fails until it is
    given up keep their own budget, and arrive once the home supernode is back."""
    config = attrs.evolve(FAST, max_attempts=3)
    s = make_scene(config=config, start=False, seed=6)
    cid, alice, bob = two_party(conn)
    chat_id = ids.chat_for_cloud_conversation(cid)
    home = s.stop_home(cid)
    s.post(cid, alice, "given up")
    waiting = [s.post(cid, bob, f"behind {i}") for i in range(3)]
    s.injector.startService()
    for _ in range(100):  # until the head has failed 3 times and is given up
        s.run(0.1)
        states = [(r[1], r[2]) for r in outbox_rows(conn, cid)]
        if states[0][0] == "failed":
            break
    assert states == [("failed", 3), *[("pending", 0)] * 3]  # never tried, nothing counted
    s.net.wait(home.restart())
    s.run(5)
    assert [m.body for m in s.history(chat_id)] == [m.body for m in waiting]


# ---------------------------------------------------------------- pipelining under faults

class FaultyPeers:
    """``LegacyPeers`` whose injections meet faults, drawn from a seeded stream:
    ``duplicate`` sends the injection twice (the second Ack is the caller's), ``cut`` sends it
    and then drops the connection (its Ack and every later one in flight are lost; the
    connection comes back in the background)."""

    def __init__(self, inner: NetPeers, seed: int = 7, p_duplicate: float = 0.08,
                 p_cut: float = 0.03) -> None:
        self.inner = inner
        self.rng = random.Random(seed)
        self.p_duplicate, self.p_cut = p_duplicate, p_cut
        self.faults = {"duplicate": 0, "cut": 0}

    def for_chat(self, chat_id: str):
        peer = self.inner.for_chat(chat_id)
        return None if peer is None else FaultyPeer(self, peer)

    def any(self):
        return self.inner.any()


@attrs.define
class FaultyPeer:
    peers: FaultyPeers
    peer: PeerConnection

    def inject_batch(self, chat_id: str, members: tuple, messages: list) -> defer.Deferred:
        draw = self.peers.rng.random()
        if draw < self.peers.p_duplicate:
            self.peers.faults["duplicate"] += 1
            self.peer.inject_batch(chat_id, members, messages).addErrback(lambda _f: None)
        d = self.peer.inject_batch(chat_id, members, messages)
        if self.peers.p_duplicate <= draw < self.peers.p_duplicate + self.peers.p_cut:
            self.peers.faults["cut"] += 1
            self.peer.transport.abortConnection()
        return d


def test_pipelined_order_holds_with_injections_lost_and_duplicated(conn, make_scene):
    """Eight conversations, 40 messages each, posted in waves while injections are sent
    twice or lost with their connection mid-pipeline: every chat's legacy history is its
    conversation's messages, each once, in seq order, and every row ends done."""
    s = make_scene(wrap_peers=FaultyPeers, start=False)
    alice = make_account(conn, "alice")
    cids = [make_conversation(conn, alice, make_account(conn, f"friend{i}", "legacy"))
            for i in range(8)]
    s.injector.startService()
    for wave in range(4):
        for cid in cids:
            for i in range(10):
                s.post(cid, alice, f"m{wave * 10 + i:02d}")
        s.injector.wake()
        s.run(0.3)
    s.run(60)
    assert s.links.faults["duplicate"] > 3 and s.links.faults["cut"] > 1
    assert s.injector.failures > 0  # the cuts made some rows go back and come again
    for cid in cids:
        assert {r[1] for r in outbox_rows(conn, cid)} == {"done"}
        history = sorted(s.history(ids.chat_for_cloud_conversation(cid)),
                         key=lambda m: m.legacy_seq)
        assert [m.body for m in history] == [f"m{i:02d}" for i in range(40)]
    # each row completed once: new, or a duplicate of a copy whose Ack was lost or doubled
    assert s.injector.injected + s.injector.duplicates == 320
    assert s.injector.duplicates > 0


# ---------------------------------------------------------------- batches

class RecordingPeers:
    """Passes through to *inner*, recording every request sent (not one the wire format
    refused): ``("batch", bodies)`` or ``("members", add, remove)``."""

    def __init__(self, inner: NetPeers) -> None:
        self.inner = inner
        self.requests: list[tuple] = []

    def for_chat(self, chat_id: str):
        peer = self.inner.for_chat(chat_id)
        return None if peer is None else RecordingPeer(self, peer)

    def any(self):
        return self.inner.any()


@attrs.define
class RecordingPeer:
    peers: RecordingPeers
    peer: PeerConnection

    def inject_batch(self, chat_id: str, members: tuple, messages: list) -> defer.Deferred:
        d = self.peer.inject_batch(chat_id, members, messages)  # WireError: nothing sent
        self.peers.requests.append(("batch", [m.body for m in messages]))
        return d

    def inject_membership(self, chat_id: str, add: tuple, remove: tuple,
                          origin: str) -> defer.Deferred:
        d = self.peer.inject_membership(chat_id, add, remove, origin)
        self.peers.requests.append(("members", add, remove))
        return d


def legacy_bodies(s: Scene, cid: uuid.UUID) -> list[str]:
    """The bodies of the chat's legacy history, in legacy_seq order."""
    return [m.body for m in sorted(s.history(ids.chat_for_cloud_conversation(cid)),
                                   key=lambda m: m.legacy_seq)]


class ChatIdAtSend(RecordingPeers):
    """Records, for every request, the conversation's legacy chat id as the store has it
    committed at the moment the request goes (read on a connection of its own)."""

    def __init__(self, inner: NetPeers, dsn: str) -> None:
        super().__init__(inner)
        self.reader = psycopg.connect(dsn, autocommit=True)
        self.seen: list[tuple[str, str | None]] = []

    def for_chat(self, chat_id: str):
        (stored,) = self.reader.execute(
            "SELECT legacy_chat_id FROM conversations WHERE conversation_id = %s",
            (ids.conversation_id(chat_id),)).fetchone()
        self.seen.append((chat_id, stored))
        return super().for_chat(chat_id)


def test_a_cloud_born_chat_id_is_recorded_before_its_first_rows_go(conn, db_dsn, make_scene):
    """The chat id made up for a cloud-born conversation is committed before legacy gets its
    first rows (legacy echoes the chat at once, and the follower recording the echo raced a
    completion that recorded it, into deadlocks); a conversation nobody on legacy is owed
    gets none."""
    recording: list[ChatIdAtSend] = []
    s = make_scene(start=False, wrap_peers=lambda p: recording.append(
        ChatIdAtSend(p, db_dsn)) or recording[0])
    born, alice, bob = two_party(conn)
    quiet, carol, dave = two_party(conn, "carol", "dave")
    for i in range(3):
        s.post(born, alice, f"m{i}")
    s.post(quiet, carol, "nobody on legacy")
    tx(conn, accounts_store.set_phase, carol, "cloud-only")
    tx(conn, accounts_store.set_phase, dave, "cloud-only")
    s.injector.startService()
    s.run(1)
    try:
        chat = ids.chat_for_cloud_conversation(born)
        assert recording[0].seen == [(chat, chat)]
        assert legacy_bodies(s, born) == ["m0", "m1", "m2"]
        assert conn.execute("SELECT legacy_chat_id, conversation_id FROM "
                            "conversation_legacy_ids").fetchall() == [(chat, born)]
        assert conn.execute("SELECT legacy_chat_id FROM conversations WHERE "
                            "conversation_id = %s", (quiet,)).fetchone() == (None,)
        assert [r[1] for r in outbox_rows(conn, quiet)] == ["skipped"]
    finally:
        recording[0].reader.close()


@pytest.mark.parametrize("inject_batch,batches", [
    (64, [["m0", "m1", "m2"], ["m3", "m4"]]),
    (2, [["m0", "m1"], ["m2"], ["m3", "m4"]]),
])
def test_consecutive_messages_share_one_batch_and_a_membership_change_goes_alone(
        conn, make_scene, inject_batch, batches):
    """A conversation's message rows go as InjectBatches of at most inject_batch rows, one
    run per member list; a membership change between them is a request of its own, in
    order."""
    from cloud.store import conversations as conversations_store

    s = make_scene(config=attrs.evolve(FAST, window=8, inject_batch=inject_batch),
                   wrap_peers=RecordingPeers, start=False)
    alice = make_account(conn, "alice")
    cid = make_conversation(conn, alice, make_account(conn, "bob", "legacy"),
                            make_account(conn, "carol", "legacy"))
    for i in range(3):
        s.post(cid, alice, f"m{i}")
    tx(conn, conversations_store.remove_member, cid, alice, "carol", s.now_ms())
    for i in range(3, 5):
        s.post(cid, alice, f"m{i}")
    s.injector.startService()
    s.run(1)
    expected = [("batch", b) for b in batches if b[0] < "m3"] + [
        ("members", (), ("carol",))] + [("batch", b) for b in batches if b[0] >= "m3"]
    assert s.links.requests == expected
    assert legacy_bodies(s, cid) == [f"m{i}" for i in range(5)]
    assert (s.injector.injected, s.injector.membership_changes) == (5, 1)


def test_a_refused_item_in_the_middle_of_a_batch_is_skipped_and_the_rest_apply(
        conn, make_scene):
    """The home refuses the third of five messages in one batch (older than its retention):
    that row is skipped with an inject_refused finding; the home applied the items after it
    on their own, and they are acknowledged and recorded done, in order."""
    s = make_scene(config=attrs.evolve(FAST, window=8), wrap_peers=RecordingPeers,
                   start=False)
    cid, alice, bob = two_party(conn)
    for i in range(5):
        s.post(cid, alice if i % 2 else bob, f"m{i}",
               sent_ms=s.now_ms() - 31 * 86_400_000 if i == 2 else None)
    s.injector.startService()
    s.run(1)
    assert s.links.requests == [("batch", [f"m{i}" for i in range(5)])]  # one request
    assert [r[1] for r in outbox_rows(conn, cid)] == ["done", "done", "skipped", "done",
                                                      "done"]
    assert legacy_bodies(s, cid) == ["m0", "m1", "m3", "m4"]
    assert (s.injector.injected, s.injector.skipped, s.injector.failures) == (4, 1, 0)
    [(kind, state, conversation, detail)] = findings(conn)
    assert (kind, state, conversation) == ("inject_refused", "open", cid)
    assert detail["reason"] == ("the supernode refused it: ts_ms is older than this "
                                "supernode's retention window")


class CutAfterApplied:
    """``LegacyPeers`` whose first batch reaches the home, which applies it, but whose
    connection drops before its answer is read (every answer still in flight with it)."""

    def __init__(self, inner: NetPeers) -> None:
        self.inner = inner
        self.cut = False

    def for_chat(self, chat_id: str):
        peer = self.inner.for_chat(chat_id)
        return None if peer is None else CuttingPeer(self, peer)

    def any(self):
        return self.inner.any()


@attrs.define
class CuttingPeer:
    peers: CutAfterApplied
    peer: PeerConnection

    def inject_batch(self, chat_id: str, members: tuple, messages: list) -> defer.Deferred:
        d = self.peer.inject_batch(chat_id, members, messages)
        if self.peers.cut:
            return d
        self.peers.cut = True

        def drop(_answer):
            self.peer.transport.abortConnection()
            raise error.ConnectionLost("dropped before the answer was read")

        return d.addCallback(drop)


def test_a_batch_lost_with_its_connection_is_injected_again_as_duplicates(conn, make_scene):
    """Two batches in flight; the connection drops after the home applied them, before
    their answers were read: every row goes back, and is injected again once the connection
    is back, acknowledged as duplicates; legacy has each message once, in order."""
    s = make_scene(config=attrs.evolve(FAST, window=8, inject_batch=3),
                   wrap_peers=CutAfterApplied, start=False)
    cid, alice, _ = two_party(conn)
    for i in range(6):
        s.post(cid, alice, f"m{i}")
    s.injector.startService()
    s.run(0.1)
    assert legacy_bodies(s, cid) == [f"m{i}" for i in range(6)]  # the home applied both
    rows = outbox_rows(conn, cid)
    assert [r[1:3] for r in rows] == [("pending", 1)] + [("pending", 0)] * 5
    assert rows[0][4].endswith("dropped before the answer was read.")
    assert s.injector.failures == 1 and s.injector.injected == 0
    s.run(5)
    # the first retry found the connection still reopening (unreachable: tried again)
    assert [r[1:3] for r in outbox_rows(conn, cid)] == [("done", 3)] + [("done", 1)] * 5
    assert (s.injector.injected, s.injector.duplicates, s.injector.failures) == (0, 6, 2)
    assert legacy_bodies(s, cid) == [f"m{i}" for i in range(6)]


class LateAnswers:
    """``LegacyPeers`` whose first batch is applied at the home but answered only after
    *delay_s* (later than the injector waits)."""

    def __init__(self, inner: NetPeers, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.delayed = False

    def for_chat(self, chat_id: str):
        peer = self.inner.for_chat(chat_id)
        return None if peer is None else LatePeer(self, peer)

    def any(self):
        return self.inner.any()


@attrs.define
class LatePeer:
    peers: LateAnswers
    peer: PeerConnection

    def inject_batch(self, chat_id: str, members: tuple, messages: list) -> defer.Deferred:
        d = self.peer.inject_batch(chat_id, members, messages)
        if self.peers.delayed:
            return d
        self.peers.delayed = True
        late: defer.Deferred = defer.Deferred()
        clock = self.peers.inner.net.clock

        def hold(answer):
            clock.callLater(self.peers.delay_s,
                            lambda: None if late.called else late.callback(answer))

        d.addBoth(hold)
        return late


def test_a_batch_that_times_out_goes_back_and_its_late_answer_changes_nothing(
        conn, make_scene):
    """A batch answered after inject_timeout_s: its rows go back (the first tried, the rest
    given their attempt back), the late answer counts nothing, the window's slots are free
    again (the retry fills the same window), and the re-injection is all duplicates."""
    s = make_scene(wrap_peers=lambda peers: LateAnswers(peers, 3 * FAST.inject_timeout_s),
                   start=False)
    cid, alice, _ = two_party(conn)
    for i in range(4):  # one batch of 4: the whole window (FAST.window)
        s.post(cid, alice, f"m{i}")
    s.injector.startService()
    s.run(FAST.inject_timeout_s + 0.1)
    rows = outbox_rows(conn, cid)
    assert [r[1:3] for r in rows] == [("pending", 1)] + [("pending", 0)] * 3
    assert rows[0][4] == f"no answer from the home supernode within {FAST.inject_timeout_s}s"
    assert legacy_bodies(s, cid) == ["m0", "m1", "m2", "m3"]  # applied; answer not yet back
    s.run(5)  # the late answer arrives, and the retry runs
    assert [r[1:3] for r in outbox_rows(conn, cid)] == [("done", 2)] + [("done", 1)] * 3
    assert (s.injector.injected, s.injector.duplicates, s.injector.failures) == (0, 4, 1)
    assert legacy_bodies(s, cid) == ["m0", "m1", "m2", "m3"]


def test_a_conversation_whose_member_list_legacy_can_not_carry_is_refused_batch_by_batch(
        conn, make_scene):
    """Messages sent while a member with a handle longer than the wire's 128 bytes was in the
    conversation can never be injected: each of those rows is refused (an inject_refused
    finding, "not encodable"); the messages before and after, in batches of their own, are
    injected in order."""
    from cloud.store import conversations as conversations_store

    s = make_scene(config=attrs.evolve(FAST, window=8), wrap_peers=RecordingPeers,
                   start=False)
    cid, alice, _ = two_party(conn)
    long = "x" * 130
    make_account(conn, long, "legacy")
    s.post(cid, alice, "before")
    tx(conn, conversations_store.add_member, cid, alice, long, s.now_ms())
    s.post(cid, alice, "with 1")
    s.post(cid, alice, "with 2")
    tx(conn, conversations_store.remove_member, cid, alice, long, s.now_ms())
    s.post(cid, alice, "after")
    s.injector.startService()
    s.run(2)
    assert conn.execute("SELECT kind, state FROM outbox_to_legacy ORDER BY seq, sub"
                        ).fetchall() == [("message", "done"), ("members", "skipped"),
                                         ("message", "skipped"), ("message", "skipped"),
                                         ("members", "skipped"), ("message", "done")]
    refused = [d for kind, _, _, d in findings(conn) if kind == "inject_refused"]
    assert len(refused) == 4 and all("not encodable" in d["reason"] for d in refused)
    assert legacy_bodies(s, cid) == ["before", "after"]
    assert [r for r in s.links.requests if r[0] == "batch"] == [("batch", ["before"]),
                                                                ("batch", ["after"])]


class NoRoomForTwo(RecordingPeers):
    """Refuses (WireError too_large, nothing sent) any batch of more than one message, as
    if the frame had been counted wrong."""

    def for_chat(self, chat_id: str):
        peer = self.inner.for_chat(chat_id)
        return None if peer is None else CrampedPeer(self, peer)


class CrampedPeer(RecordingPeer):
    def inject_batch(self, chat_id: str, members: tuple, messages: list) -> defer.Deferred:
        if len(messages) > 1:
            raise wire.WireError("too_large", "counted wrong")
        return super().inject_batch(chat_id, members, messages)


def test_a_batch_that_does_not_fit_though_each_row_does_is_sent_row_by_row(
        conn, make_scene, outbox_log):
    """A batch the wire refuses whose rows each fit alone: nothing is refused, the rows go
    one request each, in order, and the mismatch is logged."""
    s = make_scene(config=attrs.evolve(FAST, window=8), wrap_peers=NoRoomForTwo, start=False)
    cid, alice, _ = two_party(conn)
    for i in range(3):
        s.post(cid, alice, f"m{i}")
    s.injector.startService()
    s.run(1)
    assert s.links.requests == [("batch", ["m0"]), ("batch", ["m1"]), ("batch", ["m2"])]
    assert [r[1] for r in outbox_rows(conn, cid)] == ["done"] * 3 and findings(conn) == []
    assert legacy_bodies(s, cid) == ["m0", "m1", "m2"]
    assert any("one by one" in e["log_format"] for e in outbox_log)


def test_a_pass_is_recorded_in_one_round_trip_and_sees_what_is_due(conn):
    """record_pass completes the pass's rows and probes its conversations for a due row in
    one round trip inside its transaction (three before: the completion's SET LOCAL, its
    update, the probe). The probe sees the completion: rows whose claims ran out are not
    due once recorded; a row posted meanwhile is."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cids = [make_conversation(conn, a, c, chat="legacy-7"), make_conversation(conn, a, c,
                                                                               chat="legacy-8")]
    for cid in cids:
        tx(conn, messages_store.post_message, cid, a, f"{cid}", "m", NOW)
    items = tx(conn, outbox_store.claim_outbox, NOW, 10, 1000)
    rows = [outbox_store.Injected(i, i.legacy_chat_id, f"cloud:{i.message_id}") for i in items]
    with conn.transaction(), round_trips(conn) as trips:
        done, due = record_pass(conn, rows, cids, NOW + 2000)  # both claims ran out
    assert trips.count == 1
    assert done == items and due is False
    tx(conn, messages_store.post_message, cids[1], a, "later", "m", NOW + 2100)
    assert tx(conn, record_pass, [], cids, NOW + 2200) == ([], True)
