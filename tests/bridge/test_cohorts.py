"""Named cohorts through ``bridge.cohorts`` and ``phases.apply_plan``, against a real
PostgreSQL: an advance through the gates (held members and why), a reverse that moves each
member back exactly to its phase before the advance and never forward (also over random
histories), the back-fill of a reverse out of cloud-only, cancel, and the freeze."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import cohorts
from bridge.cohorts import CohortRefused, CohortSelection
from bridge.phases import BACKWARD, GateConfig, MigrationOutcome
from cloud import admin
from cloud.model import PHASES
from cloud.store import cohorts as cohorts_store
from cloud.store import controls as controls_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from tests.bridge.test_phases import (
    ACTOR,
    NOW,
    add_finding,
    apply,
    audit_rows,
    healthy,
    make_account,
    phase_of,
)
from tests.dbfixture import failing_inserts, truncate_all, tx


def new_cohort(conn, refs, name: str = "pilot"):
    _plan, cohort = tx(conn, cohorts.create, name, CohortSelection(refs=tuple(refs)),
                       actor=ACTOR, now_ms=NOW)
    return cohort


def advance(conn, to: str, *, force: bool = False, name: str = "pilot"):
    """``bridgectl cohort advance NAME --to TO``: plan and record, apply, finish."""
    move = tx(conn, cohorts.load_advance, name, to, GateConfig(), NOW, force=force,
              record=True, actor=ACTOR)
    outcome = apply(conn, move.plan) if move.plan.to_move else MigrationOutcome()
    if move.advance_no is not None:
        tx(conn, cohorts.finish_advance, move, outcome, actor=ACTOR, now_ms=NOW)
    return move, outcome


def back(conn, load=cohorts.load_reverse, name: str = "pilot"):
    """``bridgectl cohort reverse NAME`` (or cancel): plan, apply, finish."""
    move = tx(conn, load, name, NOW)
    outcome = apply(conn, move.plan) if move.plan.to_move else MigrationOutcome()
    complete = tx(conn, cohorts.finish_back, move, outcome, actor=ACTOR, now_ms=NOW)
    return move, outcome, complete


def phases_of(conn, ids) -> list[str]:
    return [phase_of(conn, a) for a in ids]


def test_an_advance_goes_through_the_gates_and_records_the_held_and_the_phases_before(conn):
    """Healthy members move, one with an open finding is held (its gate and reason kept),
    one already past the target stays (promote-only); every member's phase before the
    advance is recorded, and each move's audit row names the cohort."""
    healthy(conn)
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    carol = make_account(conn, "carol", "cloud")
    add_finding(conn, "gap", account_id=bob)
    cohort = new_cohort(conn, ["alice", "bob", "carol"])
    move, outcome = advance(conn, "dual")
    assert move.advance_no == 1 and [c.handle for c in outcome.moved] == ["alice"]
    assert [m.change.handle for m in move.plan.held] == ["bob"]
    assert "already past dual" in move.plan.unchanged[0].reason
    assert phases_of(conn, [alice, bob, carol]) == ["dual", "legacy", "cloud"]
    assert tx(conn, cohorts_store.phases_before, cohort.cohort_id, 1) == {
        alice: "legacy", bob: "legacy", carol: "cloud"}
    held, total = tx(conn, cohorts_store.held_members, cohort.cohort_id, 1, 10)
    assert total == 1 and held[0].handle == "bob" and held[0].when == "plan"
    assert [g["name"] for g in held[0].gates] == ["no_open_findings"]
    assert "1 open finding" in held[0].gates[0]["reason"]
    rows = audit_rows(conn)
    assert [(r[1], r[3].get("cohort")) for r in rows] == [
        ("cohort_created", None), ("phase_change", "pilot"), ("cohort_advanced", None)]
    assert rows[2][3] == {"advance": 1, "to": "dual", "forced": False, "moved": 1,
                          "held": 1, "failed": 0, "unchanged": 1}


def test_a_gate_that_fails_when_applied_is_recorded_as_held_then(conn):
    """A finding opened between the plan and the move holds it; the advance records the
    member as held when applied, with the gate."""
    healthy(conn)
    alice = make_account(conn, "alice")
    cohort = new_cohort(conn, ["alice"])
    move = tx(conn, cohorts.load_advance, "pilot", "dual", GateConfig(), NOW, force=False,
              record=True, actor=ACTOR)
    add_finding(conn, "gap", account_id=alice)
    outcome = apply(conn, move.plan)
    tx(conn, cohorts.finish_advance, move, outcome, actor=ACTOR, now_ms=NOW)
    assert phase_of(conn, alice) == "legacy"
    [held], _ = tx(conn, cohorts_store.held_members, cohort.cohort_id, 1, 10)
    assert held.when == "apply" and held.gates[0]["name"] == "no_open_findings"
    [adv] = tx(conn, cohorts_store.advances, cohort.cohort_id)
    assert (adv.moved, adv.held) == (0, 1)


def test_reverse_moves_each_member_back_exactly_and_never_forward(conn):
    """Reverse undoes the last advance: each member back to its phase before it, including
    one promoted separately since (it goes back to where the cohort found it); one moved
    back separately behind that phase stays (never forward); one held stays. A second
    reverse undoes the advance before; a third has nothing to undo."""
    healthy(conn)
    a, b, c, d = (make_account(conn, h, linked=False) for h in ("a", "b", "c", "d"))
    new_cohort(conn, ["a", "b", "c", "d"])
    advance(conn, "dual")
    add_finding(conn, "gap", account_id=d)
    advance(conn, "cloud")
    assert phases_of(conn, [a, b, c, d]) == ["cloud", "cloud", "cloud", "dual"]
    tx(conn, admin.apply_phase_change, b, "cloud", "cloud-only", actor="other", now_ms=NOW)
    tx(conn, admin.apply_phase_change, c, "cloud", "legacy", actor="other", now_ms=NOW)
    move, outcome, complete = back(conn)
    assert move.advance_no == 2 and complete
    assert phases_of(conn, [a, b, c, d]) == ["dual", "dual", "legacy", "dual"]
    reasons = {m.change.handle: m.reason for m in move.plan.unchanged}
    assert "a reverse never moves anyone forward" in reasons["c"]
    assert reasons["d"] == "at its phase before advance 2 (dual)"
    move, _, _ = back(conn)
    assert move.advance_no == 1
    assert phases_of(conn, [a, b, c, d]) == ["legacy"] * 4
    with pytest.raises(CohortRefused, match="every advance that moved someone is reversed"):
        back(conn)
    reversed_rows = [r[3] for r in audit_rows(conn) if r[1] == "cohort_reversed"]
    assert [(r["advances"], r["moved"], r["complete"]) for r in reversed_rows] == [
        ([2], 2, True), ([1], 3, True)]


def test_a_reverse_out_of_cloud_only_backfills_legacy_in_the_move(conn):
    """Messages posted while every member was cloud-only get outbox rows when the reverse
    moves them out, in the move's own transaction: when that write fails the member stays
    cloud-only, nothing is queued and the advance stays to reverse; run again, it finishes."""
    healthy(conn)
    ann, ben = make_account(conn, "ann", linked=False), make_account(conn, "ben", linked=False)
    talk = uuid.uuid4()
    tx(conn, conversations_store.create_conversation, talk, [ann, ben])
    new_cohort(conn, ["ann", "ben"])
    advance(conn, "cloud-only")
    for i in range(3):
        tx(conn, messages_store.post_message, talk, ann, f"c{i}", f"while cloud-only {i}",
           NOW + i)
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy").fetchone() == (0,)
    with failing_inserts(conn, "outbox_to_legacy", "disk full"):
        move, outcome, complete = back(conn)
    assert not complete and len(outcome.failed) == 2 and outcome.moved == ()
    assert "disk full" in outcome.failed[0][1]
    assert phases_of(conn, [ann, ben]) == ["cloud-only", "cloud-only"]
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy").fetchone() == (0,)
    assert [r[3]["complete"] for r in audit_rows(conn) if r[1] == "cohort_reversed"] == [False]
    move, outcome, complete = back(conn)  # the same advance, finished
    assert complete and move.advance_no == 1 and len(outcome.moved) == 2
    assert phases_of(conn, [ann, ben]) == ["legacy", "legacy"]
    assert conn.execute("SELECT seq, state FROM outbox_to_legacy ORDER BY seq").fetchall() == [
        (1, "pending"), (2, "pending"), (3, "pending")]
    queued = [r[3]["backfill"]["queued_for_legacy"] for r in audit_rows(conn)
              if r[1] == "phase_change" and r[3]["from"] == "cloud-only"]
    assert queued == [3, 0]  # ann's move queued them; ben's found them queued


def test_cancel_undoes_every_advance_at_once_then_ends_the_cohort(conn):
    """Cancel moves each member to its phase before the oldest advance not reversed, in
    one move (cloud-only -> legacy once, not step by step), then the cohort is cancelled
    and can not advance; its members may join another cohort."""
    healthy(conn)
    ann, ben = make_account(conn, "ann", linked=False), make_account(conn, "ben", "dual",
                                                                       linked=False)
    cohort = new_cohort(conn, ["ann", "ben"])
    advance(conn, "cloud")
    advance(conn, "cloud-only")
    _, outcome, complete = back(conn, cohorts.load_cancel)
    assert complete and len(outcome.moved) == 2
    assert phases_of(conn, [ann, ben]) == ["legacy", "dual"]
    moves = [(r[3]["from"], r[3]["to"]) for r in audit_rows(conn) if r[1] == "phase_change"]
    assert moves[-2:] == [("cloud-only", "legacy"), ("cloud-only", "dual")]
    assert tx(conn, cohorts_store.get_cohort, "pilot").state == "cancelled"
    assert all(a.reversed_ms == NOW for a in tx(conn, cohorts_store.advances,
                                               cohort.cohort_id))
    with pytest.raises(CohortRefused, match="is cancelled"):
        advance(conn, "dual")
    new_cohort(conn, ["ann"], name="again")


def test_the_freeze_holds_an_advance_and_reverse_skips_an_advance_that_moved_nobody(conn):
    """Frozen, an advance holds everyone with gate frozen (force included), recorded as
    held; reverse then undoes the advance before it, which did move members."""
    healthy(conn)
    ann = make_account(conn, "ann", linked=False)
    cohort = new_cohort(conn, ["ann"])
    advance(conn, "dual")
    tx(conn, controls_store.freeze_on, reason="incident 7", actor="ops", now_ms=NOW)
    for force in (False, True):
        move, outcome = advance(conn, "cloud", force=force)
        assert outcome.moved == () and len(move.plan.held) == 1
        assert "frozen: promotions frozen by ops" in move.plan.held[0].reason
    assert phase_of(conn, ann) == "dual"
    [held], _ = tx(conn, cohorts_store.held_members, cohort.cohort_id, 3, 10)
    assert held.gates[0]["name"] == "frozen" and "incident 7" in held.gates[0]["reason"]
    move, _, _ = back(conn)  # backward moves are not held by the freeze
    assert move.advance_no == 1 and phase_of(conn, ann) == "legacy"


def test_a_cohort_in_and_out_of_cloud_only_tells_the_login_server(conn):
    """Advanced to cloud-only, a linked member's legacy login is refused as moved; the
    reverse tells the login server first and the member logs in on legacy again. Without
    a login server link, recording the advance is refused before anything is written."""
    from legacy import wire
    from tests.bridge.test_phases import legacy_login
    from tests.legacy.netfixture import LegacyNet

    net = LegacyNet(1).start()
    net.add_user("alice")
    healthy(conn)
    alice = make_account(conn, "alice", "cloud")
    cohort = new_cohort(conn, ["alice"])
    with pytest.raises(cohorts.NeedsLoginServer):
        tx(conn, cohorts.load_advance, "pilot", "cloud-only", GateConfig(), NOW, force=False,
           record=True, actor=ACTOR, have_login=False)
    assert tx(conn, cohorts_store.advances, cohort.cohort_id) == []
    peer = net.login_peer()
    move = tx(conn, cohorts.load_advance, "pilot", "cloud-only", GateConfig(), NOW,
              force=False, record=True, actor=ACTOR)
    outcome = apply(conn, move.plan, login=peer, net=net)
    tx(conn, cohorts.finish_advance, move, outcome, actor=ACTOR, now_ms=NOW)
    assert phase_of(conn, alice) == "cloud-only"
    refused = legacy_login(net, "alice")
    assert isinstance(refused, wire.Error) and refused.code == "moved"
    move = tx(conn, cohorts.load_reverse, "pilot", NOW)
    assert move.plan.needs_login_server
    outcome = apply(conn, move.plan, login=peer, net=net)
    assert tx(conn, cohorts.finish_back, move, outcome, actor=ACTOR, now_ms=NOW)
    assert phase_of(conn, alice) == "cloud" and net.login.accounts["alice"][1] is False
    assert isinstance(legacy_login(net, "alice"), wire.Credential)


# ---------------------------------------------------------------- random histories

#: A cohort's history as rounds: maybe a finding on a member (it holds that member's
#: promotions from then on), an advance (to, forced?), members moved elsewhere after it
#: (by `migrate` or another operator, either way), then 0-2 reverses.
ROUNDS = st.lists(st.tuples(
    st.none() | st.integers(0, 3),
    st.sampled_from(PHASES[1:]), st.booleans(),
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from(PHASES)), max_size=3),
    st.integers(0, 2),
), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(start=st.lists(st.sampled_from(PHASES), min_size=4, max_size=4), rounds=ROUNDS)
def test_reverse_never_moves_a_member_forward_over_random_histories(conn, start, rounds):
    """Over random histories (advances held or not, forced or not, members moved elsewhere
    between them, reverses), an advance never moves a member backward, and a reverse moves
    each member exactly to its phase before the advance it undoes when it was past it, else
    leaves it: never forward."""
    truncate_all(conn)
    healthy(conn)
    members = [make_account(conn, f"m{i}", p, linked=False) for i, p in enumerate(start)]
    cohort = new_cohort(conn, [f"m{i}" for i in range(4)])
    for finding, to, force, elsewhere, reverses in rounds:
        if finding is not None:
            add_finding(conn, "gap", account_id=members[finding])
        before = phases_of(conn, members)
        advance(conn, to, force=force)
        after = phases_of(conn, members)
        assert all(PHASES.index(y) >= PHASES.index(x)
                   for x, y in zip(before, after, strict=True))
        for i, phase in elsewhere:
            tx(conn, admin.apply_phase_change, members[i], phase_of(conn, members[i]), phase,
               actor="other", now_ms=NOW, backfill_since_ms=0)
        for _ in range(reverses):
            before = phases_of(conn, members)
            last = tx(conn, cohorts_store.advance_to_reverse, cohort.cohort_id)
            if last is None:
                with pytest.raises(CohortRefused):
                    back(conn)
                assert phases_of(conn, members) == before
                continue
            recorded = tx(conn, cohorts_store.phases_before, cohort.cohort_id,
                          last.advance_no)
            move, _, complete = back(conn)
            assert complete and move.advance_no == last.advance_no
            assert all(m.change.direction == BACKWARD for m in move.plan.to_move)
            after = phases_of(conn, members)
            for m, was, now in zip(members, before, after, strict=True):
                target = recorded[m]
                want = target if PHASES.index(was) > PHASES.index(target) else was
                assert now == want, (was, target, now)
