"""Named cohorts in the store, against a real PostgreSQL: membership (one active cohort per
account), what an advance records, which advance a reverse undoes, ending a cohort, and the
audit rows; a refused write leaves nothing behind."""

from __future__ import annotations

import psycopg
import pytest

from cloud.store import cohorts as cohorts_store
from cloud.store.errors import Conflict
from tests.cloud.store.storefixture import NOW, table_rows
from tests.dbfixture import make_account, tx


def audit(conn) -> list[tuple]:
    return conn.execute("SELECT actor, action, subject, detail FROM audit_log "
                        "ORDER BY audit_id").fetchall()


def create(conn, name: str, members, **selection):
    return tx(conn, cohorts_store.create_cohort, name, selection or {"handles": ["x"]},
              members, actor="ops", now_ms=NOW)


@pytest.fixture
def trio(conn):
    return [make_account(conn, h, "legacy") for h in ("alice", "bob", "carol")]


def test_a_cohort_stores_its_members_and_is_audited(conn, trio):
    """create_cohort stores the cohort, its members (active) and a cohort_created row."""
    cohort = create(conn, "pilot", trio, percent=10)
    assert (cohort.name, cohort.state, cohort.selection) == ("pilot", "active", {"percent": 10})
    assert tx(conn, cohorts_store.get_cohort, "pilot") == cohort
    assert [a.account_id for a in tx(conn, cohorts_store.member_accounts, cohort.cohort_id)
            ] == trio  # in handle order
    assert tx(conn, cohorts_store.members_per_phase, [cohort.cohort_id]) == {
        cohort.cohort_id: {"legacy": 3, "dual": 0, "cloud": 0, "cloud-only": 0}}
    assert audit(conn) == [("ops", "cohort_created", "pilot",
                            {"selection": {"percent": 10}, "members": 3})]


def test_a_taken_name_or_a_member_of_another_active_cohort_writes_nothing(conn, trio):
    """A name is never reused; an account is in one active cohort at a time (the index
    refuses it even when the caller did not look); each refusal leaves no row behind."""
    first = create(conn, "pilot", trio[:2])
    with pytest.raises(Conflict, match="exists already"):
        create(conn, "pilot", trio[2:])
    with pytest.raises(Conflict, match="joined another active cohort"):
        create(conn, "wave-1", trio[1:])
    assert table_rows(conn, "cohorts") == 1 and table_rows(conn, "cohort_members") == 2
    assert len(audit(conn)) == 1
    assert tx(conn, cohorts_store.active_memberships, trio) == {trio[0]: "pilot",
                                                               trio[1]: "pilot"}
    tx(conn, cohorts_store.end_cohort, first, "completed", actor="ops", now_ms=NOW + 1)
    assert tx(conn, cohorts_store.active_memberships, trio) == {}
    create(conn, "wave-1", trio[1:])  # free again once the first one ended
    with pytest.raises(Conflict, match="exists already"):
        create(conn, "pilot", trio[2:])  # an ended cohort's name stays taken
    with pytest.raises(psycopg.errors.CheckViolation):  # the schema checks names too
        conn.execute("INSERT INTO cohorts (name, selection, created_by, created_ms) "
                     "VALUES ('Bad Name', '{}', 'x', 0)")


def test_advances_record_the_phases_before_and_reverse_picks_the_newest_that_moved(conn, trio):
    """begin_advance numbers advances and keeps each member's phase before it; the one to
    reverse is the newest not reversed that may have moved someone (an unfinished one
    counts, one that moved nobody does not); mark_reversed marks it and the later ones."""
    cohort = create(conn, "pilot", trio)
    alice, bob, carol = trio

    def advance(to: str, before: dict, held: dict | None = None) -> int:
        return tx(conn, cohorts_store.begin_advance, cohort.cohort_id, to, before, held or {},
                  forced=False, actor="ops", now_ms=NOW)

    assert tx(conn, cohorts_store.advance_to_reverse, cohort.cohort_id) is None
    one = advance("dual", {alice: "legacy", bob: "legacy", carol: "dual"},
                  {bob: [{"name": "mirror_lag", "passed": False, "reason": "slow"}]})
    tx(conn, cohorts_store.finish_advance, cohort, one, moved=1, held_at_apply={},
       held_total=1, failed=0, unchanged=1, actor="ops", now_ms=NOW)
    two = advance("cloud", {alice: "dual", bob: "legacy", carol: "dual"})
    assert (one, two) == (1, 2)
    assert tx(conn, cohorts_store.advance_to_reverse, cohort.cohort_id).advance_no == 2
    tx(conn, cohorts_store.finish_advance, cohort, two, moved=0, held_at_apply={
        alice: [{"name": "frozen", "passed": False, "reason": "x"}]}, held_total=3, failed=0,
        unchanged=0, actor="ops", now_ms=NOW)
    assert tx(conn, cohorts_store.advance_to_reverse, cohort.cohort_id).advance_no == 1
    assert tx(conn, cohorts_store.phases_before, cohort.cohort_id, 1) == {
        alice: "legacy", bob: "legacy", carol: "dual"}
    held, total = tx(conn, cohorts_store.held_members, cohort.cohort_id, 1, 10)
    assert total == 1 and [(h.handle, h.when, h.gates[0]["name"]) for h in held] == [
        ("bob", "plan", "mirror_lag")]
    held, _ = tx(conn, cohorts_store.held_members, cohort.cohort_id, 2, 10)
    assert [(h.handle, h.when) for h in held] == [("alice", "apply")]
    assert tx(conn, cohorts_store.phases_before_unreversed, cohort.cohort_id)[alice] == "legacy"

    marked = tx(conn, cohorts_store.mark_reversed, cohort, 1, actor="ops", now_ms=NOW + 5,
                detail={"moved": 1})
    assert marked == [1, 2]
    assert tx(conn, cohorts_store.advance_to_reverse, cohort.cohort_id) is None
    assert tx(conn, cohorts_store.phases_before_unreversed, cohort.cohort_id) == {}
    assert [(r[1], r[3].get("advance"), r[3].get("advances")) for r in audit(conn)] == [
        ("cohort_created", None, None), ("cohort_advanced", 1, None),
        ("cohort_advanced", 2, None), ("cohort_reversed", None, [1, 2])]
    assert [h["action"] for h in tx(conn, cohorts_store.history, "pilot")] == [
        "cohort_created", "cohort_advanced", "cohort_advanced", "cohort_reversed"]


def test_ending_a_cohort_once(conn, trio):
    """end_cohort completes or cancels an active cohort (a cancel marks its advances
    reversed), audited; a second end is refused and writes nothing."""
    cohort = create(conn, "pilot", trio)
    tx(conn, cohorts_store.begin_advance, cohort.cohort_id, "dual",
       dict.fromkeys(trio, "legacy"), {}, forced=False, actor="ops", now_ms=NOW)
    ended = tx(conn, cohorts_store.end_cohort, cohort, "cancelled", actor="ops",
               now_ms=NOW + 9, detail={"moved": 3})
    assert (ended.state, ended.ended_by, ended.ended_ms) == ("cancelled", "ops", NOW + 9)
    [adv] = tx(conn, cohorts_store.advances, cohort.cohort_id)
    assert adv.reversed_ms == NOW + 9
    before = audit(conn)
    with pytest.raises(Conflict, match="not active"):
        tx(conn, cohorts_store.end_cohort, cohort, "completed", actor="ops", now_ms=NOW + 10)
    assert audit(conn) == before and before[-1][1:3] == ("cohort_cancelled", "pilot")
    with pytest.raises(ValueError):
        tx(conn, cohorts_store.end_cohort, cohort, "active", actor="ops", now_ms=NOW)


def test_one_command_at_a_time_holds_a_cohort(conn, db_dsn, trio):
    """The cohort's advisory lock is taken by one connection; another can not until it is
    released."""
    cohort = create(conn, "pilot", trio)
    with psycopg.connect(db_dsn, autocommit=True) as other:
        assert cohorts_store.try_lock(conn, cohort.cohort_id)
        assert not cohorts_store.try_lock(other, cohort.cohort_id)
        cohorts_store.unlock(conn, cohort.cohort_id)
        assert cohorts_store.try_lock(other, cohort.cohort_id)
        cohorts_store.unlock(other, cohort.cohort_id)
