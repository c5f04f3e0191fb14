"""``run_one`` and an operator's pause of the reconcilers (``bridgectl control pause
reconcilers``): refused at start without a lock or a run row, stopped at the next check when
paused mid-run with its progress saved (exit 5), resumed by the first run after the resume."""

from __future__ import annotations

import psycopg
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from cloud.db import InlineDatabase
from cloud.store import controls as controls_store
from reconcilers import runner
from servicekit.sleep import sleep
from tests.dbfixture import tx

NOW_S = 1_700_000_000.0


class Counting:
    """A reconciler that compares one item a second, saving its place after each."""

    kind = "notifications"

    def __init__(self, clock: Clock, items: int = 60) -> None:
        self.clock, self.items = clock, items

    async def run(self, ctx: runner.RunContext) -> None:
        while ctx.progress.get("next", 0) < self.items:
            if ctx.out_of_time():
                return
            await sleep(self.clock, 1.0)
            ctx.report.compared += 1
            ctx.progress["next"] = ctx.progress.get("next", 0) + 1
            await ctx.save()


@pytest.fixture
def lock_conn(db_dsn):
    with psycopg.connect(db_dsn, autocommit=True) as c:
        yield c


def start(conn, clock: Clock, lock_conn, rec: Counting) -> defer.Deferred:
    return defer.Deferred.fromCoroutine(runner.run_one(
        rec, clock=clock, db=InlineDatabase(conn), lock_conn=lock_conn, dry_run=False,
        max_seconds=None))


def runs(conn) -> list[tuple]:
    return conn.execute("SELECT state, progress->'next' FROM reconcile_runs ORDER BY run_id"
                        ).fetchall()


def test_a_paused_reconciler_refuses_to_start_and_takes_no_lock(conn, lock_conn, db_dsn):
    """Paused: exit 5 at once, the pause in the report, no run row, the kind's lock free."""
    clock = Clock()
    clock.advance(NOW_S)
    tx(conn, controls_store.pause, "reconcilers", reason="db upgrade", actor="ops-dana",
       now_ms=int(NOW_S * 1000))
    d = start(conn, clock, lock_conn, Counting(clock))
    report = d.result  # nothing to wait for
    assert report.paused and report.exit_code() == runner.EXIT_PAUSED == 5
    assert report.run_id is None and not report.completed and not report.clean
    assert report.detail["paused"]["reason"] == "db upgrade"
    assert runs(conn) == []
    with psycopg.connect(db_dsn, autocommit=True) as other:
        assert runner.try_lock(other, "notifications")  # nobody held it
        runner.unlock(other, "notifications")


def test_a_pause_mid_run_stops_it_at_its_next_check_and_the_next_run_resumes(conn,
                                                                            lock_conn):
    """Paused 20 s into a 60 s run: within PAUSE_CHECK_S (plus one item) it stops, the row
    is interrupted with its place saved, exit 5; after the resume the next run resumes from
    there and finishes."""
    clock = Clock()
    clock.advance(NOW_S)
    d = start(conn, clock, lock_conn, Counting(clock))
    clock.pump([1.0] * 20)
    tx(conn, controls_store.pause, "reconcilers", reason="", actor="ops-dana",
       now_ms=int(clock.seconds() * 1000))
    clock.pump([1.0] * int(runner.PAUSE_CHECK_S + 1))
    report = d.result
    assert report.paused and not report.completed
    assert report.exit_code() == runner.EXIT_PAUSED
    assert 20 <= report.compared <= 20 + runner.PAUSE_CHECK_S + 1
    assert runs(conn) == [("interrupted", report.compared)]
    assert clock.getDelayedCalls() == []  # the pause watch stopped with the run

    tx(conn, controls_store.resume, "reconcilers", actor="ops-dana",
       now_ms=int(clock.seconds() * 1000))
    d = start(conn, clock, lock_conn, Counting(clock))
    clock.pump([1.0] * 60)
    again = d.result
    assert again.resumed and again.completed and not again.paused
    assert again.compared == 60 - report.compared
    assert again.exit_code() == runner.EXIT_IN_SYNC
