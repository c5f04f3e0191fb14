"""Gates that see known divergence and cover the cohort (issue 17, case 4), on the
deterministic legacy network and a real PostgreSQL:

- a feed gap, which names no conversation, holds every account homed at its supernode;
- failed findings hold like open ones, until repaired or dismissed;
- a resumed reconcile run vouches only for the conversations it compared;
- the gates are evaluated again in the transaction that applies the move.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from twisted.internet import defer

from bridge import ids, migration_report, phases
from cloud.db import InlineDatabase
from cloud.store import conversations as conversations_store
from cloud.store import findings as findings_store
from cloud.store.errors import Conflict, NotFound
from tests.bridge.test_follower import Bridge
from tests.bridge.test_phases import (
    NOW,
    add_finding,
    add_worker,
    apply,
    audit_rows,
    healthy,
    legacy_login,
    make_account,
    phase_of,
    plan,
)
from tests.legacy.netfixture import LegacyNet
from tests.reconcilers.test_gaps import Scene


@pytest.fixture
def scene(conn, db_dsn):
    s = Scene(conn, db_dsn)
    yield s
    s.lock_conn.close()


def now_of(scene: Scene) -> int:
    return int(scene.net.clock.seconds() * 1000)


def gate(move: phases.PlannedMove, name: str) -> phases.GateResult:
    [g] = [g for g in move.gates if g.name == name]
    return g


def by_handle(the_plan: phases.MigrationPlan) -> dict[str, phases.PlannedMove]:
    return {m.change.handle: m for m in the_plan.moves}


def legacy_conversation(conn, chat_id: str, members) -> uuid.UUID:
    cid = ids.conversation_id(chat_id)
    with conn.transaction():
        conversations_store.create_conversation(conn, cid, members, legacy_chat_id=chat_id)
    return cid


def cover(conn, cid: uuid.UUID, at_ms: int) -> None:
    """What a gaps pass writes for a conversation it compared clean up to *at_ms*."""
    conn.execute("UPDATE conversations SET last_clean_reconcile_ms = %s "
                 "WHERE conversation_id = %s", (at_ms, cid))


# ---------------------------------------------------------------- 4.1 feed gaps

def test_a_feed_gap_holds_every_account_with_a_conversation_homed_at_its_supernode(scene):
    """A supernode restart is a feed_gap about that supernode: it holds the members of the
    conversations homed there and nobody else; a pass that repairs them vouches for them
    only on the next clean compare, and then they move."""
    net, conn = scene.net, scene.conn
    gap_sn, calm_sn = sorted(net.directory)[:2]
    hit, calm = net.chat_homed_at(gap_sn, "hit"), net.chat_homed_at(calm_sn, "calm")
    scene.chat(hit, 3, members=("alice", "bob"))
    scene.chat(calm, 3, members=("carol", "dave"))
    bridge = Bridge(net, scene.db).start()
    net.run(3.0)
    net.wait(net.supernodes[gap_sn].crash())
    net.run(1.0)
    net.wait(net.supernodes[gap_sn].restart())
    net.run(10.0)
    bridge.stop(net)
    rows = conn.execute("SELECT source, detail->'ring', conversation_id, account_id "
                        "FROM reconcile_findings WHERE kind = 'feed_gap'").fetchall()
    assert rows and {r[0] for r in rows} == {gap_sn}
    assert all(r[1] == sorted(net.directory) and r[2] is None and r[3] is None for r in rows)

    everyone = ["alice", "bob", "carol", "dave"]
    moves = by_handle(plan(conn, everyone, "dual", now=now_of(scene)))
    for held in ("alice", "bob"):
        g = gate(moves[held], "no_open_findings")
        assert not g.passed and "feed_gap: " in g.reason
        assert f"open feed_gap of supernode {gap_sn} (finding " in g.reason
        assert "the home of 1 of its conversations" in g.reason
    for free in ("carol", "dave"):
        assert gate(moves[free], "no_open_findings").passed

    first, _ = scene.reconcile()  # gives the lost history back to the restarted supernode
    assert first.clean and first.repaired == 3
    # a restart's gap is an epoch gap: what only the supernode held died with it, so it
    # closes unrecoverable (what the cloud held was given back: the 3 repairs)
    assert conn.execute("SELECT state FROM reconcile_findings WHERE kind = 'feed_gap'"
                        ).fetchall() == [("unrecoverable",)] * len(rows)
    add_worker(conn, "w1", now=now_of(scene))
    moves = by_handle(plan(conn, everyone, "dual", now=now_of(scene)))
    assert [moves[h].outcome for h in everyone] == [phases.HELD, phases.HELD,
                                                    phases.MOVE, phases.MOVE]
    g = gate(moves["alice"], "recent_clean_reconcile")
    assert "1 of its 1 conversation not compared clean" in g.reason and \
        f"chat {hit} never compared clean" in g.reason
    assert gate(moves["alice"], "no_open_findings").passed

    second, _ = scene.reconcile()
    assert second.clean and second.confirmed == 0
    add_worker(conn, "w2", now=now_of(scene))
    the_plan = plan(conn, everyone, "dual", now=now_of(scene))
    assert {m.outcome for m in the_plan.moves} == {phases.MOVE}


def test_a_findings_ring_is_built_once_for_every_accounts_gates(conn, monkeypatch):
    """The gates match a supernode's finding to conversations on the ring it recorded: that
    ring is built once, however many accounts and plans ask (each used to build its own),
    and it answers as a fresh one does."""
    from bridge import gates

    built = []

    class CountingRing(gates.HashRing):
        def __init__(self, ids) -> None:
            built.append(tuple(ids))
            super().__init__(ids)

    monkeypatch.setattr(gates, "HashRing", CountingRing)
    gates._ring.cache_clear()
    ring = ("sn-a", "sn-b", "sn-c")
    fresh = gates.HashRing(ring)
    chats = [f"chat-{i}" for i in range(8)]
    source = fresh.home_of(chats[0])
    handles = []
    for i, chat in enumerate(chats):
        a, b = f"u{i}a", f"u{i}b"
        legacy_conversation(conn, chat, [make_account(conn, a), make_account(conn, b)])
        handles += [a, b]
    with conn.transaction():
        findings_store.record_finding(conn, "feed_gap", {"ring": list(ring)}, NOW - 1000,
                                      source=source)
    built.clear()
    for _ in range(2):
        moves = by_handle(plan(conn, handles, "dual"))
    assert built == [ring]
    held = {h for h, m in moves.items() if not gate(m, "no_open_findings").passed}
    homed = {chat for chat in chats if fresh.home_of(chat) == source}
    assert held == {f"u{chats.index(c)}{s}" for c in homed for s in "ab"} and held
    gates._ring.cache_clear()


# ---------------------------------------------------------------- 4.2 failed findings

def test_failed_findings_hold_until_repaired_or_dismissed(conn):
    """A failed repair holds the conversation's members like an open finding; an operator's
    dismissal (audited) releases them; an unrecoverable loss holds no one but still asks for
    a clean compare after it."""
    healthy(conn)
    a, b = make_account(conn, "a"), make_account(conn, "b")
    cid = legacy_conversation(conn, "chat-x", [a, b])
    cover(conn, cid, NOW - 500)
    add_finding(conn, "missing_in_cloud", conversation_id=cid, state="failed")  # NOW - 1000
    [failed_id] = [r[0] for r in conn.execute("SELECT finding_id FROM reconcile_findings")]
    moves = by_handle(plan(conn, ["a", "b"], "dual"))
    for m in moves.values():
        g = gate(m, "no_open_findings")
        assert m.outcome == phases.HELD and not g.passed
        assert g.reason.startswith("1 failed finding for the account or its conversations "
                                   "(missing_in_cloud (failed): 1)")

    with conn.transaction():
        was = findings_store.dismiss_finding(conn, failed_id, actor="ops-alice",
                                             why="looked: the sender deleted it", now_ms=NOW)
    assert was == "failed"
    assert conn.execute("SELECT state, detail->>'dismissed_by' FROM reconcile_findings"
                        ).fetchone() == ("dismissed", "ops-alice")
    assert [r[:3] for r in audit_rows(conn)] == [
        ("ops-alice", "finding_dismissed", str(failed_id))]
    with pytest.raises(Conflict), conn.transaction():
        findings_store.dismiss_finding(conn, failed_id, actor="x", why="y", now_ms=NOW)
    with pytest.raises(NotFound), conn.transaction():
        findings_store.dismiss_finding(conn, 10**9, actor="x", why="y", now_ms=NOW)
    assert len(audit_rows(conn)) == 1

    # unrecoverable: the legacy network's own loss; not held on, but compared after
    add_finding(conn, "feed_gap_lost", conversation_id=cid, state="unrecoverable")
    assert {m.outcome for m in plan(conn, ["a", "b"], "dual").moves} == {phases.MOVE}
    conn.execute("UPDATE reconcile_findings SET created_ms = %s WHERE state = 'unrecoverable'",
                 (NOW - 100,))  # made after the last clean compare (NOW - 500)
    move = by_handle(plan(conn, ["a"], "dual"))["a"]
    assert gate(move, "no_open_findings").passed
    g = gate(move, "recent_clean_reconcile")
    assert not g.passed and "chat chat-x compared clean up to 0 s ago, last finding 0 s ago" \
        in g.reason


def test_a_clean_compare_repairs_the_failed_findings_it_answers(scene):
    """A failed repair of a conversation is repaired when a later pass compares it clean."""
    scene.chat("chat-a", 3)
    scene.mirror()
    cid = ids.conversation_id("chat-a")
    with scene.conn.transaction():
        findings_store.record_finding(scene.conn, "missing_in_cloud", {"count": 1},
                                      now_of(scene), conversation_id=cid)
        scene.conn.execute("UPDATE reconcile_findings SET state = 'failed'")
    report, _ = scene.reconcile()
    assert report.clean and report.detail["findings_closed"] == 1
    assert scene.conn.execute(
        "SELECT state, (detail->>'resolved_by_run')::bigint, detail->>'was' "
        "FROM reconcile_findings").fetchone() == ("repaired", report.run_id, "failed")


# ---------------------------------------------------------------- 4.3 coverage per cohort

def test_a_resumed_run_vouches_only_for_the_conversations_it_compared(scene):
    """Run 1 stops after the first conversations (as at its deadline); a finding then lands on
    one of them; run 2 resumes, compares only the tail and finishes clean. Its members are
    held (their conversation was not compared after the finding); the tail's move."""
    conn = scene.conn
    chats = [f"chat-{i}" for i in range(6)]
    for i, chat in enumerate(chats):
        scene.chat(chat, 2, members=(f"u{i}a", f"u{i}b"))
    scene.mirror()
    first, _ = scene.reconcile(stop_after=2)
    assert not first.completed and 1 <= first.compared < 6
    covered = {r[0] for r in conn.execute(
        "SELECT legacy_chat_id FROM conversations WHERE last_clean_reconcile_ms IS NOT NULL")}
    assert covered == set(sorted(chats)[:first.compared])
    head = sorted(covered)[0]
    with conn.transaction():  # e.g. the bridge could not store one of its messages
        findings_store.record_finding(conn, "mirror_refused", {"reason": "nul byte"},
                                      now_of(scene), conversation_id=ids.conversation_id(head))
    second, _ = scene.reconcile()
    assert second.resumed and second.clean and first.compared + second.compared == 6
    add_worker(conn, now=now_of(scene))
    handles = [f"u{i}{x}" for i in range(6) for x in "ab"]
    moves = by_handle(plan(conn, handles, "dual", now=now_of(scene)))
    i = chats.index(head)
    for h in (f"u{i}a", f"u{i}b"):
        g = gate(moves[h], "recent_clean_reconcile")
        assert not g.passed and f"chat {head} compared clean up to" in g.reason
        assert "last finding" in g.reason
    tail = [c for c in chats if c not in covered]
    assert tail
    for chat in tail:
        j = chats.index(chat)
        for h in (f"u{j}a", f"u{j}b"):
            assert moves[h].outcome == phases.MOVE, moves[h].reason


# ---------------------------------------------------------------- 4.4 checked again at apply

def test_a_finding_opened_between_plan_and_apply_holds_the_move(conn, db_dsn):
    """Planned to move; another connection opens a finding on its conversation; applying
    evaluates the gates again in the move's transaction: held, nothing written, exit-3 text."""
    healthy(conn)
    a, b = make_account(conn, "a"), make_account(conn, "b")
    cid = legacy_conversation(conn, "chat-x", [a])
    cover(conn, cid, NOW - 500)
    the_plan = plan(conn, ["a", "b"], "dual")
    assert [m.outcome for m in the_plan.moves] == [phases.MOVE, phases.MOVE]
    with psycopg.connect(db_dsn, autocommit=True) as other, other.transaction():
        findings_store.record_finding(other, "inject_failed", {"reason": "timeout"}, NOW,
                                      conversation_id=cid)
    outcome = apply(conn, the_plan)
    [(change, gates)] = outcome.held
    assert change.account_id == a and phase_of(conn, a) == "legacy"
    assert [c.account_id for c in outcome.moved] == [b]
    assert not gates[0].passed and "inject_failed: 1" in gates[0].reason
    assert [r[2] for r in audit_rows(conn)] == [str(b)]
    report = migration_report.plan_to_json(the_plan, outcome)
    row = next(x for x in report["accounts"] if x["handle"] == "a")
    assert row["result"] == "held" and "(when applied)" in row["reason"]
    text = migration_report.render_plan(report)
    assert "held by no_open_findings (when applied): 1 open finding" in text
    assert "held by no_open_findings: 1 account" in text


class RacingStore:
    """Runs transactions on *conn*; just before the move's own transaction, another
    connection opens a finding about the account (after every earlier check passed)."""

    def __init__(self, conn, dsn: str, account_id: uuid.UUID) -> None:
        self.inner, self.dsn, self.account_id = InlineDatabase(conn), dsn, account_id

    def run(self, desc, fn, *args, **kwargs) -> defer.Deferred:
        if desc == "apply_phase_change":
            with psycopg.connect(self.dsn, autocommit=True) as other, other.transaction():
                findings_store.record_finding(other, "notification_failed", {}, NOW,
                                              account_id=self.account_id)
        return self.inner.run(desc, fn, *args, **kwargs)


@pytest.fixture
def net() -> LegacyNet:
    return LegacyNet(1).start()


def test_a_finding_opened_after_the_login_server_was_told_holds_and_sets_it_back(
        conn, db_dsn, net):
    """Into cloud-only: gates pass at plan and before the login server is told; the finding
    lands just before the move's transaction, which holds it and sets the login server back,
    so legacy still lets the user in and the store says cloud."""
    from legacy import wire

    net.add_user("alice")
    healthy(conn)
    alice = make_account(conn, "alice", "cloud")
    the_plan = plan(conn, ["alice"], "cloud-only")
    assert the_plan.moves[0].outcome == phases.MOVE
    outcome = apply(conn, the_plan, login=net.login_peer(), net=net,
                    db=RacingStore(conn, db_dsn, alice))
    [(change, gates)] = outcome.held
    assert outcome.failed == () and outcome.moved == ()
    assert "notification_failed: 1" in gates[0].reason
    assert phase_of(conn, alice) == "cloud" and audit_rows(conn) == []
    assert net.login.accounts["alice"][1] is False
    assert isinstance(legacy_login(net, "alice"), wire.Credential)


def test_force_still_moves_when_the_apply_time_gates_fail(conn, db_dsn):
    """--force: a gate failing at apply is overridden and recorded in the audit row."""
    healthy(conn)
    a = make_account(conn, "a")
    the_plan = plan(conn, ["a"], "dual", force=True)
    with psycopg.connect(db_dsn, autocommit=True) as other, other.transaction():
        findings_store.record_finding(other, "notification_failed", {}, NOW, account_id=a)
    outcome = apply(conn, the_plan)
    assert [c.account_id for c in outcome.moved] == [a] and outcome.held == ()
    [row] = audit_rows(conn)
    assert row[3]["forced"] is True
    assert not row[3]["gates"][0]["passed"]
