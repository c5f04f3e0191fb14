"""A reconcile run's progress and ETA, by the injected clock, as status and the worker's
metrics show them, on a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer, task

from bridge.ops import status, store_metrics
from cloud.db import InlineDatabase, run_transaction
from reconcilers import runner
from tests.dbfixture import tx

sample = REGISTRY.get_sample_value


class CountingReconciler:
    """A pass of *units* units taking *step_s* clock seconds each, counted and saved after
    every one; stops (as a deadline would) once *stop_at* units are done."""

    kind = "gaps"

    def __init__(self, clock: task.Clock, units: int, step_s: float,
                 stop_at: int | None = None) -> None:
        self.clock, self.units, self.step_s, self.stop_at = clock, units, step_s, stop_at

    async def run(self, ctx: runner.RunContext) -> None:
        done = ctx.progress.get("done", 0)  # a resumed pass goes on from there
        ctx.count(done, self.units)
        for i in range(done, self.units):
            if i == self.stop_at:
                ctx.interrupted = True
                await ctx.save()
                return
            await task.deferLater(self.clock, self.step_s, lambda: None)
            ctx.report.compared += 1
            ctx.count(i + 1, self.units)
            await ctx.save()


@pytest.fixture
def lock_conn(db_dsn):
    with psycopg.connect(db_dsn, autocommit=True) as c:
        yield c


def start(conn, lock_conn, rec, clock) -> defer.Deferred:
    return defer.Deferred.fromCoroutine(runner.run_one(
        rec, clock=clock, db=InlineDatabase(conn), lock_conn=lock_conn, dry_run=False,
        max_seconds=None))


def advance(clock: task.Clock, seconds: float, step: float) -> None:
    """Move *clock* on by *seconds* in steps (each step's timers fire at their time)."""
    clock.pump([step] * round(seconds / step))


def gather(conn, clock, later_s: float = 0.0) -> dict:
    return run_transaction(conn, "status_gather", status.gather,
                           int((clock.seconds() + later_s) * 1000))


def publish(conn, clock, later_s: float = 0.0) -> None:
    store_metrics.publish(tx(conn, store_metrics.read_store,
                             int((clock.seconds() + later_s) * 1000), 0))


def test_eta_is_the_work_left_at_this_runs_rate():
    """Units left times this run's seconds per unit; 0 when done, None before any."""
    assert runner.eta_seconds(4, 10, 0, 8.0) == 12.0
    assert runner.eta_seconds(7, 10, 4, 3.0) == 3.0   # earlier runs' units are not its own
    assert runner.eta_seconds(10, 10, 0, 5.0) == 0.0
    assert runner.eta_seconds(4, 10, 4, 5.0) is None  # nothing done yet by this run
    assert runner.eta_seconds(2, 10, 6, 4.0) == 16.0  # the pass started over in this run


def test_a_running_pass_shows_its_progress_and_eta_in_status_and_metrics(conn, lock_conn):
    """4 of 10 units done in 8 clock seconds: 40 %, 12 s left at its save, 11 s a second
    later; in status JSON and text, and in the worker's gauges; finished: 100 %, no ETA."""
    clock = task.Clock()
    clock.advance(1000.0)
    running = start(conn, lock_conn, CountingReconciler(clock, 10, 2.0), clock)
    advance(clock, 8.0, 2.0)
    got = gather(conn, clock, later_s=1.0)["reconcile"]["gaps"]
    assert got["state"] == "running" and (got["done"], got["total"]) == (4, 10)
    assert got["progress_ratio"] == 0.4 and got["eta_s"] == 11.0
    assert got["progress_age_ms"] == 1000 and got["scope"] is None
    text = status.render(gather(conn, clock, later_s=1.0))
    assert "run 1 running, 40% of its pass (4/10), ETA 11 s" in text
    publish(conn, clock, later_s=1.0)
    assert sample("bridge_reconcile_progress_ratio", {"kind": "gaps"}) == 0.4
    assert sample("bridge_reconcile_eta_seconds", {"kind": "gaps"}) == 11.0

    advance(clock, 12.0, 2.0)
    report = running.result
    assert report.completed and report.compared == 10
    got = gather(conn, clock)["reconcile"]["gaps"]
    assert got["state"] == "finished" and got["progress_ratio"] == 1.0 and got["eta_s"] is None
    publish(conn, clock)
    assert sample("bridge_reconcile_progress_ratio", {"kind": "gaps"}) == 1.0
    assert sample("bridge_reconcile_eta_seconds", {"kind": "gaps"}) is None


def test_a_resumed_pass_counts_the_whole_pass_and_estimates_from_its_own_rate(conn,
                                                                              lock_conn):
    """Interrupted at 4/10 (40 %, no ETA while not running); the next run resumes at 4 and,
    going at 1 s a unit, estimates 3 s after 3 more units, whatever the first run's pace."""
    clock = task.Clock()
    first = start(conn, lock_conn, CountingReconciler(clock, 10, 5.0, stop_at=4), clock)
    advance(clock, 20.0, 5.0)
    assert not first.result.completed
    got = gather(conn, clock)["reconcile"]["gaps"]
    assert got["state"] == "interrupted" and got["progress_ratio"] == 0.4
    assert got["eta_s"] is None
    publish(conn, clock)
    assert sample("bridge_reconcile_progress_ratio", {"kind": "gaps"}) == 0.4
    assert sample("bridge_reconcile_eta_seconds", {"kind": "gaps"}) is None

    second = start(conn, lock_conn, CountingReconciler(clock, 10, 1.0), clock)
    advance(clock, 3.0, 1.0)
    got = gather(conn, clock)["reconcile"]["gaps"]
    assert (got["done"], got["total"], got["eta_s"]) == (7, 10, 3.0)
    assert got["progress_ratio"] == 0.7
    advance(clock, 3.0, 1.0)
    assert second.result.resumed and second.result.compared == 6


def test_targeted_runs_are_listed_apart_with_their_progress(conn, lock_conn):
    """A targeted run is in ``reconcile_targeted`` (with its scope and progress), never in
    the per-kind ``reconcile`` view the metrics and the gate read."""
    clock = task.Clock()
    rec = CountingReconciler(clock, 4, 1.0)
    d = defer.Deferred.fromCoroutine(runner.run_one(
        rec, clock=clock, db=InlineDatabase(conn), lock_conn=lock_conn, dry_run=False,
        max_seconds=None, scope="account:alice"))
    advance(clock, 1.0, 1.0)
    got = gather(conn, clock)
    assert got["reconcile"] == {}
    [run] = got["reconcile_targeted"]
    assert run["scope"] == "account:alice" and run["state"] == "running"
    assert run["progress_ratio"] == 0.25 and run["eta_s"] == 3.0
    assert "gaps account:alice" in status.render(got)
    advance(clock, 3.0, 1.0)
    assert d.result.completed and d.result.scope == "account:alice"
