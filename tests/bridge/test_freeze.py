"""The migration freeze holds every promotion through the gate ``frozen`` (force included),
when planning and again when applying; backward moves still work."""

from __future__ import annotations

from bridge import phases
from cloud.store import controls as controls_store
from tests.bridge.test_phases import (
    NOW,
    apply,
    audit_rows,
    healthy,
    make_account,
    phase_of,
    plan,
)
from tests.dbfixture import tx


def freeze(conn, reason: str = "incident 42", at: int = NOW - 120_000) -> None:
    tx(conn, controls_store.freeze_on, reason=reason, actor="ops-dana", now_ms=at)


def test_a_freeze_holds_promotions_with_who_when_and_why(conn):
    """Every other gate passes; the frozen gate alone holds the move and says who froze,
    when and why; nothing moves and nothing is audited but the freeze."""
    healthy(conn)
    alice = make_account(conn, "alice")
    freeze(conn)
    [move] = plan(conn, ["alice"], "dual").moves
    assert move.outcome == phases.HELD
    failed = [g for g in move.gates if not g.passed]
    assert [g.name for g in failed] == ["frozen"]
    assert failed[0].reason == ("promotions frozen by ops-dana at 2023-11-14 22:11:20 UTC "
                                "(2 min ago): incident 42")
    assert move.reason == "frozen: " + failed[0].reason
    outcome = apply(conn, plan(conn, ["alice"], "dual"))
    assert outcome.moved == () and phase_of(conn, alice) == "legacy"
    assert [r[1] for r in audit_rows(conn)] == ["migration_frozen"]


def test_force_does_not_override_a_freeze(conn):
    """--force moves past failed gates, but never past the freeze."""
    make_account(conn, "alice")
    freeze(conn)
    [move] = plan(conn, ["alice"], "dual", force=True).moves
    assert move.outcome == phases.HELD and "frozen: promotions frozen by" in move.reason


def test_backward_moves_work_while_frozen(conn):
    """A freeze holds promotions only: moving an account back is not held."""
    alice = make_account(conn, "alice", "cloud")
    freeze(conn)
    [move] = plan(conn, ["alice"], "dual").moves
    assert move.outcome == phases.MOVE
    outcome = apply(conn, plan(conn, ["alice"], "dual"))
    assert [c.account_id for c in outcome.moved] == [alice] and phase_of(conn, alice) == "dual"


def test_a_freeze_set_between_plan_and_apply_holds_the_move(conn):
    """The gates are evaluated again in the apply transaction: a freeze committed after the
    plan holds the move, even a forced one, and the outcome says so."""
    healthy(conn)
    alice = make_account(conn, "alice")
    for force in (False, True):
        the_plan = plan(conn, ["alice"], "dual", force=force)
        assert the_plan.moves[0].outcome == phases.MOVE
        freeze(conn)
        outcome = apply(conn, the_plan)
        assert outcome.moved == () and outcome.failed == ()
        [(change, gates)] = outcome.held
        assert change.account_id == alice
        assert [g.name for g in gates if not g.passed] == ["frozen"]
        tx(conn, controls_store.freeze_off, actor="ops-dana", now_ms=NOW)
    assert phase_of(conn, alice) == "legacy"
    assert [r[1] for r in audit_rows(conn)] == ["migration_frozen", "migration_unfrozen"] * 2


def test_promotions_go_through_again_once_the_freeze_is_lifted(conn):
    """After freeze off the same plan moves the account, its audit row showing frozen passed."""
    healthy(conn)
    alice = make_account(conn, "alice")
    freeze(conn)
    tx(conn, controls_store.freeze_off, actor="ops-eve", now_ms=NOW - 1)
    outcome = apply(conn, plan(conn, ["alice"], "dual"))
    assert [c.account_id for c in outcome.moved] == [alice]
    detail = audit_rows(conn)[-1][3]
    assert {g["name"]: g["passed"] for g in detail["gates"]}["frozen"] is True
