"""Targeted gaps runs (--account, --conversation) and --max-rate, on the deterministic legacy
network and a real PostgreSQL: a targeted run repairs its scope only, keeps its own resume
cursor, never counts as the gate's clean run, and paced requests start 1/N s apart."""

from __future__ import annotations

import psycopg
import pytest
from twisted.internet import defer

from bridge import ids
from cloud import admin
from cloud.db import run_transaction
from cloud.store import findings as findings_store
from reconcilers import gaps_scope, runner
from reconcilers.gaps import GapsConfig, GapsReconciler
from reconcilers.pacing import PacedLinks
from tests.bridge.test_follower import chat_messages
from tests.reconcilers.test_gaps import Scene, drop_from_cloud

CONFIG = GapsConfig(margin_ms=1000, confirm_after_s=0.5)


@pytest.fixture
def scene(conn, db_dsn):
    s = Scene(conn, db_dsn)
    yield s
    s.lock_conn.close()


def account(scene, ref: str) -> gaps_scope.GapsScope:
    return run_transaction(scene.conn, "scope", gaps_scope.resolve_account, ref)


def conversation(scene, ref: str) -> gaps_scope.GapsScope:
    return run_transaction(scene.conn, "scope", gaps_scope.resolve_conversation, ref)


def targeted(scene, scope, *, links=None, stop_after=None, max_seconds=None, actor=None,
             dry_run=False):
    """One run limited to *scope* (None: a full pass), as ``reconcile gaps --account``
    runs it."""
    scene.net.run(15.0)  # let the watermark pass everything sent so far
    rec = GapsReconciler(links or scene.links, CONFIG, scope)
    d = defer.Deferred.fromCoroutine(runner.run_one(
        rec, clock=scene.net.clock, db=scene.db, lock_conn=scene.lock_conn, dry_run=dry_run,
        max_seconds=max_seconds, scope=None if scope is None else scope.label, actor=actor,
        stop_requested=lambda: stop_after is not None
        and rec.counters.digest_requests >= stop_after))
    return scene.net.wait(d, timeout=600), rec


def runs(conn) -> list[tuple]:
    return conn.execute("SELECT run_id, state, scope FROM reconcile_runs "
                        "ORDER BY run_id").fetchall()


def test_an_account_run_repairs_that_accounts_conversations_only(scene):
    """--account alice: her two chats are compared and repaired, carol's chat keeps its gap;
    the run row and report name the scope."""
    a1 = scene.chat("chat-a1", 6)
    a2 = scene.chat("chat-a2", 4, members=("alice", "erin"))
    other = scene.chat("chat-c", 5, members=("carol", "dave"))
    scene.mirror()
    drop_from_cloud(scene.conn, a1[:2] + a2[:1] + other[:3])
    report, _ = targeted(scene, account(scene, "alice"))
    assert report.exit_code() == runner.EXIT_IN_SYNC and report.scope == "account:alice"
    assert report.compared == 2 and (report.confirmed, report.repaired) == (3, 3)
    assert report.detail["scope"]["label"] == "account:alice"
    assert report.detail["scope"]["conversations"] == 2
    assert len(chat_messages(scene.conn, "chat-a1")) == 6
    assert len(chat_messages(scene.conn, "chat-a2")) == 4
    assert len(chat_messages(scene.conn, "chat-c")) == 2  # out of scope: still missing
    assert runs(scene.conn) == [(report.run_id, "finished", "account:alice")]
    full, _ = targeted(scene, None)  # the cron pass finds carol's gap
    assert full.compared == 3 and full.repaired == 3 and full.scope is None


def audit_rows(conn) -> list[tuple]:
    return conn.execute("SELECT actor, action, subject, detail, "
                        "(extract(epoch FROM at) * 1000)::bigint FROM audit_log "
                        "WHERE action LIKE 'reconcile_%' ORDER BY audit_id").fetchall()


def test_a_targeted_run_writes_its_start_and_end_to_the_audit_log(scene):
    """An operator's targeted resync is audited: who started it, on what, and what it
    repaired, at the injected clock's times; a dry run and a full pass write nothing."""
    one = scene.chat("chat-1", 5)
    scene.mirror()
    drop_from_cloud(scene.conn, one[:2])
    scope = conversation(scene, "chat-1")
    dry, _ = targeted(scene, scope, actor="ops-ann", dry_run=True)
    full, _ = targeted(scene, None)
    assert dry.confirmed == 2 and full.repaired == 2 and audit_rows(scene.conn) == []
    drop_from_cloud(scene.conn, one[2:3])
    report, _ = targeted(scene, scope, actor="ops-ann")
    assert report.repaired == 1
    (s_actor, s_action, s_subject, s_detail, s_at), \
        (e_actor, e_action, e_subject, e_detail, e_at) = audit_rows(scene.conn)
    assert (s_actor, s_action, s_subject) == ("ops-ann", "reconcile_started", scope.label)
    assert s_detail == {"kind": "gaps", "run_id": report.run_id, "scope": scope.label,
                        "resumed": False}
    assert (e_actor, e_action, e_subject) == ("ops-ann", "reconcile_ended", scope.label)
    assert e_detail["state"] == "finished" and e_detail["run_id"] == report.run_id
    assert (e_detail["repaired"], e_detail["failed"], e_detail["error"]) == (1, 0, None)
    assert s_at <= e_at <= int(scene.net.clock.seconds() * 1000)


def test_an_account_run_finds_a_chat_the_cloud_never_saw(scene):
    """A chat that only legacy knows (sent while no bridge ran) is found through the
    supernodes' listings, by its members, and written to the cloud."""
    scene.chat("chat-seen", 2)
    scene.mirror()
    late = scene.chat("chat-late", 3)  # alice and bob again, never mirrored
    scene.chat("chat-other", 2, members=("carol", "dave"))
    report, _ = targeted(scene, account(scene, "bob"))
    assert report.compared == 2 and report.repaired == 3
    assert sorted(r[1] for r in chat_messages(scene.conn, "chat-late")) == sorted(late)
    assert chat_messages(scene.conn, "chat-other") == []


def test_a_conversation_run_by_id_or_by_chat_id_repairs_that_conversation(scene):
    """--conversation takes the conversation id or its legacy chat id: one conversation
    compared (no supernode listed), the other's gap left alone."""
    one = scene.chat("chat-1", 5)
    two = scene.chat("chat-2", 5, members=("carol", "dave"))
    scene.mirror()
    drop_from_cloud(scene.conn, one[:2] + two[:2])
    by_chat = conversation(scene, "chat-1")
    by_id = conversation(scene, str(ids.conversation_id("chat-1")))
    assert by_chat == by_id and by_id.label == f"conversation:{ids.conversation_id('chat-1')}"
    report, rec = targeted(scene, by_id)
    assert report.compared == 1 and report.repaired == 2 and report.clean
    assert len(chat_messages(scene.conn, "chat-1")) == 5
    assert len(chat_messages(scene.conn, "chat-2")) == 3
    assert rec.counters.digest_requests >= 1


def test_unknown_accounts_and_conversations_are_refused(scene):
    """An unknown handle or conversation is refused before anything runs, clearly."""
    scene.chat("chat-1", 1)
    scene.mirror()
    with pytest.raises(gaps_scope.UnknownScope, match="unknown account: 'nobody'"):
        account(scene, "nobody")
    with pytest.raises(gaps_scope.UnknownScope, match="unknown conversation"):
        conversation(scene, "chat-none")
    with pytest.raises(gaps_scope.UnknownScope, match="unknown conversation"):
        conversation(scene, "00000000-0000-0000-0000-000000000001")
    assert runs(scene.conn) == []


def test_a_targeted_run_keeps_the_full_passes_resume_cursor(scene):
    """An interrupted full pass is neither resumed nor superseded by a targeted run (nor
    the reverse): each resumes its own; the targeted run is never the gate's clean run and
    closes no feed gap."""
    for i in range(6):
        scene.chat(f"chat-{i}", 2, members=(f"u{i}a", f"u{i}b"))
    for i in range(3):
        scene.chat(f"hub-{i}", 2, members=("hub", f"h{i}"))
    scene.mirror()
    home = scene.net.ring.home_of("chat-0")
    with scene.conn.transaction():
        findings_store.record_finding(scene.conn, "feed_gap", {"source": home,
                                                               "gap": "expired"},
                                      int(scene.net.clock.seconds() * 1000))
    full, _ = targeted(scene, None, stop_after=2)
    assert not full.completed
    cursor = scene.conn.execute("SELECT progress FROM reconcile_runs WHERE run_id = %s",
                                (full.run_id,)).fetchone()[0]
    scope = account(scene, "u0a")
    small, _ = targeted(scene, scope)
    assert small.completed and small.clean and not small.resumed and small.compared == 1
    assert scene.conn.execute("SELECT state, progress FROM reconcile_runs WHERE run_id = %s",
                              (full.run_id,)).fetchone() == ("interrupted", cursor)
    assert run_transaction(scene.conn, "last", admin.last_clean_reconcile) is None
    assert scene.conn.execute("SELECT state FROM reconcile_findings WHERE kind = 'feed_gap'"
                              ).fetchone() == ("open",)
    # a targeted run stopped midway is resumed by the same scope only
    wide = account(scene, "hub")
    cut, _ = targeted(scene, wide, stop_after=1)
    assert not cut.completed and cut.compared == 1
    again, _ = targeted(scene, wide)
    assert again.resumed and again.scope == "account:hub" and again.compared == 2
    resumed, _ = targeted(scene, None)
    assert resumed.resumed and resumed.completed and full.compared + resumed.compared == 9
    assert resumed.clean and scene.conn.execute(
        "SELECT state FROM reconcile_findings WHERE kind = 'feed_gap'").fetchone() == (
        "repaired",)
    assert run_transaction(scene.conn, "last", admin.last_clean_reconcile).run_id == \
        resumed.run_id
    states = {r[0]: (r[1], r[2]) for r in runs(scene.conn)}
    assert states[full.run_id] == ("failed", None)  # superseded by the full pass only
    assert states[cut.run_id] == ("failed", "account:hub")  # by its own scope only


def test_a_targeted_run_vouches_for_the_conversations_it_compared(scene):
    """What a targeted run compared clean counts for the gate's per-conversation check."""
    scene.chat("chat-a", 2)
    scene.chat("chat-c", 2, members=("carol", "dave"))
    scene.mirror()
    targeted(scene, account(scene, "alice"))
    vouched = dict(scene.conn.execute(
        "SELECT legacy_chat_id, last_clean_reconcile_ms IS NOT NULL FROM conversations"))
    assert vouched == {"chat-a": True, "chat-c": False}


class RecordingLinks:
    """The real links, noting when each request to a supernode starts (clock time)."""

    def __init__(self, links, clock) -> None:
        self._links, self._clock = links, clock
        self.ring, self.directory = links.ring, links.directory
        self.sent: list[tuple[str, float]] = []

    async def peer(self, sn_id):
        return _RecordingPeer(await self._links.peer(sn_id), self)

    async def for_chat(self, chat_id):
        return _RecordingPeer(await self._links.for_chat(chat_id), self)


class _RecordingPeer:
    def __init__(self, peer, links: RecordingLinks) -> None:
        self._peer, self._links = peer, links

    def __getattr__(self, name):
        attr = getattr(self._peer, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._links.sent.append((name, self._links._clock.seconds()))
            return attr(*args, **kwargs)
        return call


def test_max_rate_spaces_every_request_to_the_legacy_network(scene):
    """--max-rate 4: the pass (chat listings, digests, lists, fetches) sends its requests
    at least 1/4 s apart on the simulated clock, and still repairs everything."""
    guids = scene.chat("chat-a", 40)
    scene.chat("chat-b", 5, members=("carol", "dave"))
    scene.mirror()
    drop_from_cloud(scene.conn, guids[5:9])
    recorder = RecordingLinks(scene.links, scene.net.clock)
    paced = PacedLinks(recorder, scene.net.clock, 4.0)
    report, rec = targeted(scene, None, links=paced)
    assert report.exit_code() == runner.EXIT_IN_SYNC and report.repaired == 4
    kinds = {name for name, _ in recorder.sent}
    assert {"chats", "digests", "fetch"} <= kinds
    assert sum(name == "digests" for name, _ in recorder.sent) == rec.counters.digest_requests
    times = [t for _, t in recorder.sent]
    assert len(times) >= 6 and paced.pacer.started == len(times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.25 - 1e-9
    assert paced.pacer.delayed > 0


def test_a_run_waiting_for_its_rate_slot_still_ends_at_its_deadline(scene):
    """A tiny --max-rate can not hold a run past --max-seconds: the wait for a slot is cut
    off like any other, the run ends interrupted (exit 3) with its lock released."""
    for i in range(4):
        scene.chat(f"chat-{i}", 2, members=(f"v{i}a", f"v{i}b"))
    scene.mirror()
    paced = PacedLinks(scene.links, scene.net.clock, 0.1)  # one request per 10 s
    report, _ = targeted(scene, None, links=paced, max_seconds=25.0)
    assert not report.completed and report.exit_code() == runner.EXIT_DIFFERENCES
    started, finished = scene.conn.execute(
        "SELECT started_ms, finished_ms FROM reconcile_runs").fetchone()
    assert finished - started <= 25_000
    with psycopg.connect(scene.lock_conn.info.dsn, autocommit=True) as other:
        assert runner.try_lock(other, "gaps")
        runner.unlock(other, "gaps")
