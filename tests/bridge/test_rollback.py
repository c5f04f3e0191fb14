"""A rollback out of cloud-only, end to end: real supernodes on the in-memory network, the
outbox injector, the migration commands' plan and apply, the gaps reconciler, and a real
PostgreSQL. Checked from both stacks' records: every cloud message is in the home
supernode's history (in seq order) and has its legacy GUID in the store, and a digest
comparison finds nothing missing."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from twisted.internet import defer

from bridge import ids, migration_report, phases
from bridge.discovery import SupernodeLinks
from bridge.outbox import OutboxInjector
from bridge.phases import GateConfig, Selection
from cloud import admin
from cloud.db import InlineDatabase, TransactionRunner
from cloud.model import Message
from cloud.store import accounts as accounts_store
from cloud.store import outbox as outbox_store
from cloud.store import outbox_backfill
from cloud.store.outbox_backfill import Backfill
from reconcilers import runner
from reconcilers.gaps import GapsConfig, GapsReconciler
from tests.bridge.test_outbox import FAST, T0, NetPeers, Scene, ScriptedPeers
from tests.bridge.test_phases import FailingStore
from tests.dbfixture import failing_inserts, make_account, make_conversation, tx
from tests.legacy.netfixture import PEER_SECRET, LegacyNet

DAY_MS = 86_400_000


@pytest.fixture
def make_scene(conn):
    """A 4-supernode LegacyNet at T0 (with its login server) and a running injector."""
    made: list[Scene] = []

    def make(db: Callable[[InlineDatabase], TransactionRunner] | None = None, *,
             start: bool = True, script: list[str] | None = None) -> Scene:
        net = LegacyNet(4)
        net.clock.advance(T0)
        net.start()
        peers = NetPeers(net)
        links = ScriptedPeers(peers, script) if script else peers
        inline = InlineDatabase(conn)
        injector = OutboxInjector(net.clock, db(inline) if db else inline, links,
                                  random.Random(0), FAST)
        if start:
            injector.startService()
        made.append(Scene(conn, net, peers, links, injector))
        return made[-1]

    yield make
    for s in made:
        if s.injector.running:
            s.injector.stopService()


def users(s: Scene, phase: str, *handles: str) -> list[uuid.UUID]:
    """Accounts linked to legacy handles the login server knows."""
    for h in handles:
        s.net.add_user(h)
    return [make_account(s.conn, h, phase) for h in handles]


def move(s: Scene, handles: list[str], to: str, *,
         db: TransactionRunner | None = None) -> phases.MigrationOutcome:
    """``bridgectl migrate --to TO --accounts ... --force --allow-rollback``, on the
    scene's clock."""
    the_plan = tx(s.conn, phases.load_plan, Selection(refs=tuple(handles)), to, GateConfig(),
                  s.now_ms(), force=True, allow_rollback=True)
    return s.net.wait(defer.Deferred.fromCoroutine(phases.apply_plan(
        the_plan, db or InlineDatabase(s.conn), s.net.login_peer(), actor="ops",
        now_ms=s.now_ms(), clock=s.net.clock)))


def legacy_guids(s: Scene, cid: uuid.UUID) -> list[str]:
    """The GUIDs in the home supernode's history of *cid*'s chat, in legacy_seq order."""
    chat_id = (s.conn.execute("SELECT legacy_chat_id FROM conversations "
                              "WHERE conversation_id = %s", (cid,)).fetchone()[0]
               or ids.chat_for_cloud_conversation(cid))
    return [m.guid for m in sorted(s.history(chat_id), key=lambda m: m.legacy_seq)]


def guids(messages: list[Message]) -> list[str]:
    return [ids.guid_for_cloud_message(m.message_id) for m in sorted(messages,
                                                                      key=lambda m: m.seq)]


def cloud_guids(conn, cid: uuid.UUID) -> list[str | None]:
    """The legacy GUIDs the store recorded for *cid*'s messages, in seq order."""
    return [r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %s ORDER BY seq", (cid,))]


def outbox_states(conn, cid: uuid.UUID) -> list[tuple]:
    return conn.execute("SELECT seq, state, skip_reason FROM outbox_to_legacy "
                        "WHERE conversation_id = %s ORDER BY seq", (cid,)).fetchall()


def reconcile(s: Scene, db_dsn: str) -> tuple[runner.Report, GapsReconciler]:
    """One gaps reconciler run over every chat (digests, then lists where they differ)."""
    s.run(15.0)  # the watermark passes everything sent so far
    links = SupernodeLinks(s.net.net, list(s.net.directory.values()), name="reconciler",
                           secret=PEER_SECRET)
    rec = GapsReconciler(links, GapsConfig(margin_ms=1000, confirm_after_s=0.5))
    with psycopg.connect(db_dsn, autocommit=True) as lock_conn:
        report = s.net.wait(defer.Deferred.fromCoroutine(runner.run_one(
            rec, clock=s.net.clock, db=InlineDatabase(s.conn), lock_conn=lock_conn,
            dry_run=True, max_seconds=None)), timeout=600)
    return report, rec


def test_a_rollback_out_of_cloud_only_leaves_no_hole(conn, db_dsn, make_scene):
    """Cloud posts made while every member was cloud-only (none queued, or skipped) reach the
    home supernode after the rollback, in seq order, and get their GUIDs in the store; the
    gaps reconciler, blind to them before, compares them all and finds nothing missing."""
    s = make_scene()
    alice, bob = users(s, "cloud", "alice", "bob")
    talk = make_conversation(conn, alice, bob)
    sent = [s.post(talk, alice, "hello"), s.post(talk, bob, "hi")]
    s.run(1)                      # injected while both still have legacy clients
    assert legacy_guids(s, talk) == guids(sent)
    s.net.wait(s.injector.stopService())  # (a bridge down for a moment)
    sent.append(s.post(talk, alice, "posted before the move, drained after it"))
    assert len(move(s, ["alice", "bob"], "cloud-only").moved) == 2
    s.injector.startService()
    s.run(1)                      # nobody has legacy clients now: skipped
    assert outbox_states(conn, talk)[-1] == (3, "skipped", "no_legacy_clients")
    born = make_conversation(conn, alice, bob)  # created on the cloud among cloud-only users
    born_sent = []
    for i in range(3):
        s.run(0.2)
        sent.append(s.post(talk, alice if i % 2 else bob, f"while cloud-only {i}"))
        born_sent.append(s.post(born, bob, f"born {i}"))
    old = s.post(talk, bob, "older than legacy keeps", sent_ms=s.now_ms() - 31 * DAY_MS)
    s.run(1)
    assert len(legacy_guids(s, talk)) == 2 and legacy_guids(s, born) == []
    before, _ = reconcile(s, db_dsn)
    assert before.clean, "the digests cover GUIDs only: the hole is invisible to them"

    outcome = move(s, ["alice"], "cloud")
    assert outcome.backfills == {alice: Backfill(conversations=2, queued=6, requeued=1,
                                                 too_old=1)}
    report = migration_report.plan_to_json(move_plan := tx(
        conn, phases.load_plan, Selection(refs=("alice",)), "cloud", GateConfig(),
        s.now_ms()), outcome)
    assert report["queued_for_legacy"] == 7 and report["older_than_legacy_retention"] == 1
    assert move_plan.moves[0].outcome == phases.UNCHANGED
    s.run(2)

    # the legacy stack's records: every message legacy can keep, once, in seq order
    assert legacy_guids(s, talk) == guids(sent)
    assert legacy_guids(s, born) == guids(born_sent)
    # the cloud's: every one of them has its legacy GUID; only the too-old one has none
    assert cloud_guids(conn, talk) == guids(sent) + [None]
    assert cloud_guids(conn, born) == guids(born_sent)
    assert {r[1] for r in outbox_states(conn, talk) + outbox_states(conn, born)} == {"done"}
    assert old.seq not in {r[0] for r in outbox_states(conn, talk)}
    # and the digests of both stacks agree over every message
    after, rec = reconcile(s, db_dsn)
    assert after.clean and after.compared == 2 and after.suspects == 0
    assert rec.counters.messages_covered == len(sent) + len(born_sent)


def test_a_rollback_under_traffic_keeps_each_conversations_order(conn, make_scene):
    """Posts go on every 50 ms before, during and after the move, in two conversations,
    while the injector runs: each home supernode's history is the cloud's seq order, every
    message once."""
    s = make_scene()
    alice, bob, carol = users(s, "cloud-only", "alice", "bob", "carol")
    talks = [make_conversation(conn, alice, bob), make_conversation(conn, alice, carol)]
    sent: dict[uuid.UUID, list[Message]] = {cid: [] for cid in talks}
    senders = {talks[0]: (alice, bob), talks[1]: (carol, alice)}

    def post(i: int) -> None:
        cid = talks[i % 2]
        sent[cid].append(s.post(cid, senders[cid][i % 3 % 2], f"m{i}"))

    start = s.net.clock.seconds()
    for i in range(80):
        s.net.clock.callLater(start + 0.05 * i - s.net.clock.seconds(), post, i)
    s.run(1.5)                                       # 30 posts, none queued
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy").fetchone()[0] == 0
    outcome = move(s, ["alice"], "dual")             # the login server's answer takes a while
    assert outcome.backfills[alice].queued >= 30
    s.run(4)
    assert sum(len(v) for v in sent.values()) == 80
    for cid in talks:
        assert legacy_guids(s, cid) == guids(sent[cid])
        assert cloud_guids(conn, cid) == guids(sent[cid])


def test_a_failed_or_repeated_rollback_loses_and_duplicates_nothing(conn, make_scene):
    """The store write dies after the login server was told, then the phase change's
    transaction fails after its back-fill ran: nothing is queued either time; the re-run
    queues each message once, a further re-run nothing, and legacy gets each once."""
    s = make_scene()
    alice, bob = users(s, "cloud-only", "alice", "bob")
    talk = make_conversation(conn, alice, bob)
    sent = [s.post(talk, alice if i % 2 else bob, f"m{i}") for i in range(4)]
    s.run(1)

    outcome = move(s, ["alice"], "cloud", db=FailingStore())
    assert "run the same command again" in outcome.failed[0][1]
    with failing_inserts(conn, "audit_log", "killed before the commit"):
        outcome = move(s, ["alice"], "cloud")
    assert "killed before the commit" in outcome.failed[0][1] and not outcome.backfills
    assert outbox_states(conn, talk) == []
    assert accounts_store.get_account(conn, alice).phase == "cloud-only"

    assert move(s, ["alice"], "cloud").backfills[alice].queued == 4
    again = move(s, ["alice"], "cloud")
    assert again.moved == () and again.backfills == {}
    assert tx(conn, outbox_backfill.backfill_outbox, bob, 0, s.now_ms()).total == 0
    s.run(2)
    assert legacy_guids(s, talk) == guids(sent)
    assert cloud_guids(conn, talk) == guids(sent)
    assert [r[1] for r in outbox_states(conn, talk)] == ["done"] * 4
    assert conn.execute("SELECT count(*) FROM audit_log WHERE detail ? 'backfill'"
                        ).fetchone()[0] == 1


def test_backfilled_messages_age_and_lag_from_when_they_were_queued(conn, make_scene):
    """A message sent two days before the rollback is not given up at its first failed
    injection for being older than max_age_s, and the lag to legacy it reports is the time
    since it was queued, not two days."""
    s = make_scene(script=["down"])  # the home supernode is unreachable at the first try
    alice, bob = users(s, "cloud-only", "alice", "bob")
    talk = make_conversation(conn, alice, bob)
    sent = [s.post(talk, alice, "two days ago", sent_ms=s.now_ms() - 2 * DAY_MS)]
    assert FAST.max_age_s < 2 * 86400
    assert move(s, ["alice"], "cloud").backfills[alice].queued == 1
    s.run(5)
    assert s.links.calls == 2 and s.injector.failures == 1 and s.injector.given_up == 0
    assert legacy_guids(s, talk) == guids(sent)
    assert outbox_states(conn, talk) == [(1, "done", None)]
    [(_, lag, met_fault)] = s.injector.recent_lags
    assert lag < 10  # seconds since the move queued it (the retry's backoff), not two days
    assert met_fault  # its first injection failed: its lag is the fault's


class MoveBeforeTheSkip:
    """A TransactionRunner that, when the injector first skips a row for want of legacy
    clients, moves ``account`` out of cloud-only just before (the race: the claim counted
    nobody, the move commits before the skip is written)."""

    def __init__(self, inner: InlineDatabase, now_ms: Callable[[], int]) -> None:
        self.inner, self.now_ms = inner, now_ms
        self.account: uuid.UUID | None = None
        self.moved: list[admin.AppliedChange] = []

    def run(self, desc: str, fn: Callable, *args: Any, **kwargs: Any) -> defer.Deferred:
        if fn is outbox_store.complete_outbox and kwargs.get("skipped") and not self.moved:
            self.moved.append(tx(self.inner.conn, admin.apply_phase_change, self.account,
                                 "cloud-only", "cloud", actor="ops", now_ms=self.now_ms(),
                                 forced=True, backfill_since_ms=0))
        return self.inner.run(desc, fn, *args, **kwargs)


def test_a_row_the_injector_was_skipping_when_the_account_left_is_injected(conn, make_scene):
    """The injector claimed a row while nobody had legacy clients; the account left
    cloud-only before the skip was written: the row is not skipped but injected."""
    race: list[MoveBeforeTheSkip] = []

    def wrap(inner: InlineDatabase) -> MoveBeforeTheSkip:
        race.append(MoveBeforeTheSkip(inner, lambda: s.now_ms()))
        return race[0]

    s = make_scene(db=wrap, start=False)
    alice, bob = users(s, "cloud-only", "alice", "bob")
    race[0].account = alice
    tx(conn, accounts_store.set_phase, bob, "cloud")
    talk = make_conversation(conn, alice, bob)
    sent = [s.post(talk, alice, "in flight")]
    tx(conn, accounts_store.set_phase, bob, "cloud-only")
    s.injector.startService()
    s.run(2)
    [applied] = race[0].moved
    assert applied.moved and applied.backfill.total == 0  # the row was pending, claimed
    assert legacy_guids(s, talk) == guids(sent)
    assert outbox_states(conn, talk) == [(1, "done", None)]
    assert s.injector.skipped == 0 and s.injector.injected == 1
