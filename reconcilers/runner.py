"""One reconcile run, the way cron runs it: lock, resume, bound, report, exit code.

    the reconcilers paused by an operator (bridgectl control pause reconcilers)?
      -> yes: exit EXIT_PAUSED at once (no lock taken, no run row written)
    acquire the kind's advisory lock (held on its own connection for the whole run)
      -> taken by another run: exit EXIT_LOCKED at once
    open a reconcile_runs row (state running), resuming the progress of the newest
      interrupted run of the same kind, mode and scope (a targeted run, ``scope`` set,
      never resumes nor supersedes the full pass's progress, nor the reverse)
    reconciler.run(ctx): compares and repairs, saving ctx.progress as it goes
      -> deadline (--max-seconds) reached: the reconciler stops at its next check; a wait
         still in flight at the deadline is cancelled (the run is cut off there, never
         later); the row ends 'interrupted' with the progress as it stood, exit 3, and
         the next run resumes
      -> paused meanwhile (read every PAUSE_CHECK_S): the reconciler stops at its next
         check as at the deadline; the row ends 'interrupted', exit EXIT_PAUSED, and the
         first run after the resume resumes
      -> an exception: the row ends 'failed', exit EXIT_ERROR
    the row ends 'finished' with the report; the report's ``clean`` is what the migration
      gate ``recent_clean_reconcile`` looks for (a full pass's only)

Progress and ETA: a reconciler that knows how much its pass has to do says so with
``ctx.count(done, total)`` (units of its choice: conversations for gaps and notifications).
Each save stamps the progress with ``updated_ms`` and ``eta_s``, the seconds still to go at
the rate this run has gone (its done units over its elapsed time, both by the injected
clock), so ``bridgectl status`` and the worker's metrics read them from the run's row.

Exit codes (documented in the README and docs/reconcilers.md):
  0  in sync, or every difference found was repaired
  1  error, including a run that compared nothing (nothing compared is never "in sync")
  2  bad arguments
  3  partial, or differences remain: a dry run that found some, repairs that failed,
     conversations not covered (a supernode unreachable or lost mid-pass), or a run the
     deadline stopped before its pass was done
  4  another run of the same kind holds the lock
  5  the reconcilers are paused by an operator (``bridgectl control pause reconcilers``):
     refused at start, or stopped at its next check (its progress saved)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import psycopg
from psycopg.types.json import Jsonb
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cloud.db import TransactionRunner
from cloud.store import audit as audit_store
from cloud.store import controls as controls_store

EXIT_IN_SYNC = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIFFERENCES = 3
EXIT_LOCKED = 4
EXIT_PAUSED = 5

KINDS = ("gaps", "notifications", "presence")

#: A cron run's deadline when --max-seconds is not given: a run never holds its lock (and
#: the ``recent_clean_reconcile`` gate) for longer than this.
DEFAULT_MAX_SECONDS = 600.0
#: How often a run reads whether an operator paused the reconcilers meanwhile.
PAUSE_CHECK_S = 5.0

log = Logger()

#: Advisory lock keys, one per kind (a gaps run and a notifications run may overlap).
LOCK_KEYS = {kind: 0x72636E00 + i for i, kind in enumerate(KINDS)}


@attrs.define
class Report:
    """What one run of one kind did; ``--json`` prints it, the run row stores it."""

    kind: str
    dry_run: bool = False
    compared: int = 0
    suspects: int = 0
    confirmed: int = 0
    repaired: int = 0
    failed: int = 0
    #: conversations this run could not compare (their supernode unreachable, or lost
    #: mid-pass); named in ``detail.uncovered``; the run is partial (exit 3)
    uncovered: int = 0
    bytes_from_legacy: int = 0
    duration_s: float = 0.0
    run_id: int | None = None
    resumed: bool = False
    completed: bool = False       # False when --max-seconds stopped it first
    locked: bool = False          # another run of this kind held the lock: nothing done
    #: an operator paused the reconcilers: refused at start (``run_id`` None, nothing
    #: done), or stopped at its next check; ``detail.paused`` says who, when and why
    paused: bool = False
    error: str | None = None
    #: what a targeted run was limited to ('account:HANDLE', 'conversation:UUID'); None: a
    #: full pass
    scope: str | None = None
    detail: dict[str, Any] = attrs.Factory(dict)

    @property
    def clean(self) -> bool:
        """Compared something, completed, covered everything, and nothing is left
        different."""
        return (self.error is None and self.completed and self.compared > 0
                and self.confirmed == self.repaired and self.failed == 0
                and self.uncovered == 0)

    def exit_code(self) -> int:
        if self.locked:
            return EXIT_LOCKED
        if self.error is not None or (self.completed and self.compared == 0):
            return EXIT_ERROR
        if self.paused and not self.completed:
            return EXIT_PAUSED
        if (not self.completed or self.uncovered or self.confirmed > self.repaired
                or self.failed):
            return EXIT_DIFFERENCES  # partial, or differences remain
        return EXIT_IN_SYNC

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["clean"] = self.clean
        out["duration_s"] = round(self.duration_s, 3)
        return out


@attrs.define
class RunContext:
    """What a reconciler gets: time, the store, its resumable progress, its report."""

    clock: IReactorTime
    db: TransactionRunner
    report: Report
    progress: dict[str, Any]
    deadline: float | None          # clock.seconds() at which to stop (None: no bound)
    save: Callable[[], Any]         # persist progress (returns a Deferred)
    on_progress: Callable[[str], None] = lambda _text: None
    #: set by a reconciler that stopped early because it ran out of time
    interrupted: bool = False
    #: asked by out_of_time() too: an operator's Ctrl-C / SIGTERM ends the run like a deadline
    stop_requested: Callable[[], bool] = lambda: False

    @property
    def dry_run(self) -> bool:
        return self.report.dry_run

    def count(self, done: int, total: int) -> None:
        """How far the pass is: *done* of *total* units (saved with the next ``save``)."""
        self.progress["done"], self.progress["total"] = done, max(total, done)

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def time_left(self) -> float | None:
        """Seconds until the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - self.clock.seconds()

    def out_of_time(self) -> bool:
        """True once the deadline passed; the reconciler saves progress and returns."""
        if (self.deadline is not None and self.clock.seconds() >= self.deadline) \
                or self.stop_requested():
            self.interrupted = True
        return self.interrupted


class Reconciler(Protocol):
    kind: str

    async def run(self, ctx: RunContext) -> None:
        """Compare and repair, updating ``ctx.report``; return early when out of time."""


# ---------------------------------------------------------------- the store side of runs

def start_run(conn: psycopg.Connection, kind: str, now_ms: int,
              dry_run: bool = False, scope: str | None = None,
              actor: str | None = None) -> tuple[int, dict, bool]:
    """Open a run row; resume the progress of the newest interrupted run of this kind, mode
    and scope (a dry run's progress never makes a real run skip what it did not repair; a
    targeted run's never moves the full pass's cursor, nor the reverse). With *actor* (an
    operator's targeted run that repairs), an ``audit_log`` row ``reconcile_started`` names
    who started it, in the same transaction."""
    row = conn.execute(
        "SELECT run_id, progress FROM reconcile_runs WHERE kind = %s AND state = 'interrupted' "
        "AND coalesce(scope, '') = %s "
        "AND coalesce((progress->>'dry_run')::boolean, false) = %s "
        "ORDER BY run_id DESC LIMIT 1", (kind, scope or "", dry_run)).fetchone()
    progress, resumed = (dict(row[1]), True) if row is not None else ({}, False)
    if row is not None:
        conn.execute("UPDATE reconcile_runs SET state = 'failed', "
                     "report = coalesce(report, '{}'::jsonb) || '{\"superseded\": true}' "
                     "WHERE run_id = %s", (row[0],))
    progress["dry_run"] = dry_run
    run_id = conn.execute(
        "INSERT INTO reconcile_runs (kind, state, started_ms, progress, scope) "
        "VALUES (%s, 'running', %s, %s, %s) RETURNING run_id",
        (kind, now_ms, Jsonb(progress), scope)).fetchone()[0]
    if actor is not None:
        audit_store.record(conn, "reconcile_started", scope or kind, actor=actor, now_ms=now_ms,
                           detail={"kind": kind, "run_id": run_id, "scope": scope,
                                   "resumed": resumed})
    return run_id, progress, resumed


def save_progress(conn: psycopg.Connection, run_id: int, progress: dict) -> None:
    conn.execute("UPDATE reconcile_runs SET progress = %s WHERE run_id = %s",
                 (Jsonb(progress), run_id))


def finish_run(conn: psycopg.Connection, run_id: int, state: str, report: dict,
               progress: dict, now_ms: int, actor: str | None = None) -> None:
    """Close the run row; with *actor* (as for ``start_run``), an ``audit_log`` row
    ``reconcile_ended`` with the run's state and what it repaired."""
    conn.execute("UPDATE reconcile_runs SET state = %s, finished_ms = %s, report = %s, "
                 "progress = %s WHERE run_id = %s",
                 (state, now_ms, Jsonb(report), Jsonb(progress), run_id))
    if actor is not None:
        audit_store.record(conn, "reconcile_ended", report.get("scope") or report["kind"],
                           actor=actor, now_ms=now_ms,
                           detail={"kind": report["kind"], "run_id": run_id, "state": state,
                                   **{k: report[k] for k in ("compared", "confirmed",
                                                             "repaired", "failed", "uncovered",
                                                             "completed", "error")
                                      if k in report}})


def eta_seconds(done: int, total: int, done_at_start: int, elapsed_s: float) -> float | None:
    """Seconds until *total* at the rate this run has gone: its units done (*done* less
    *done_at_start*, what earlier runs of the pass did) over *elapsed_s*. 0 once done; None
    while this run has done nothing yet (no rate to go by)."""
    if done >= total:
        return 0.0
    if done < done_at_start:  # the pass started over within this run
        done_at_start = 0
    ran = done - done_at_start
    if ran <= 0 or elapsed_s <= 0:
        return None
    return (total - done) * elapsed_s / ran


def try_lock(conn: psycopg.Connection, kind: str) -> bool:
    """Take the kind's session-level advisory lock on *conn* (autocommit), without waiting."""
    return conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEYS[kind],)).fetchone()[0]


def unlock(conn: psycopg.Connection, kind: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEYS[kind],))


def refused_by_pause(kind: str, dry_run: bool, pause: controls_store.Pause) -> Report:
    """The report of a run of *kind* refused at start because of *pause* (exit 5)."""
    return Report(kind=kind, dry_run=dry_run, paused=True, detail={"paused": pause.to_json()})


async def run_one(reconciler: Reconciler, *, clock: IReactorTime, db: TransactionRunner,
                  lock_conn: psycopg.Connection, dry_run: bool, max_seconds: float | None,
                  on_progress: Callable[[str], None] = lambda _t: None,
                  stop_requested: Callable[[], bool] = lambda: False,
                  scope: str | None = None, actor: str | None = None) -> Report:
    """One run of one kind under its lock; the report says what happened (never raises for
    a failure of the run itself: that is ``report.error``). *scope* names a targeted run
    (the reconciler limits itself; the run row and the resume keep it apart); a targeted
    run takes the kind's lock like a full one: two runs never repair at once. Refused at
    once while an operator has paused the reconcilers; stopped at the next check once one
    does. *actor*: who started a run that is an operator's action (a targeted run): its start
    and end are written to the audit log (a dry run writes none)."""
    kind = reconciler.kind
    actor = None if dry_run else actor
    report = Report(kind=kind, dry_run=dry_run, scope=scope)
    try:
        pause = (await db.run("read_runtime_controls", controls_store.read_runtime_controls)
                 ).paused("reconcilers")
    except Exception as e:
        report.error = f"{type(e).__name__}: {e}"
        return report
    if pause is not None:
        refused = refused_by_pause(kind, dry_run, pause)
        refused.scope = scope
        return refused
    if not try_lock(lock_conn, kind):
        report.locked = True
        return report
    started = time.monotonic()
    try:
        run_id, progress, resumed = await db.run("start_run", start_run, kind,
                                                 int(clock.seconds() * 1000), dry_run, scope,
                                                 actor)
        report.run_id, report.resumed = run_id, resumed
        began = clock.seconds()
        deadline = None if max_seconds is None else began + max_seconds
        cut_off: list[bool] = []
        done_at_start = int(progress.get("done", 0))

        def save() -> defer.Deferred:
            if cut_off:  # the run has ended; a straggler saves nothing
                return defer.succeed(None)
            _stamp(progress, clock, began, done_at_start)
            return db.run("save_progress", save_progress, run_id, progress)

        watch = _PauseWatch(clock, db)
        ctx = RunContext(clock, _UntilCutOff(db, cut_off), report, progress, deadline, save,
                         on_progress,
                         stop_requested=lambda: stop_requested() or watch.pause is not None)
        state = "failed"
        try:
            try:
                await _within_deadline(reconciler.run(ctx), ctx, cut_off)
            finally:
                watch.stop()
            report.completed = not ctx.interrupted
            if ctx.interrupted and watch.pause is not None:
                report.paused = True
                report.detail["paused"] = watch.pause.to_json()
            state = "finished" if report.completed else "interrupted"
            if report.completed:
                progress.clear()  # the next run starts a fresh pass
                progress["dry_run"] = dry_run
        except Exception as e:
            report.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            report.duration_s = time.monotonic() - started
            await db.run("finish_run", finish_run, run_id, state, report.to_json(),
                         dict(progress), int(clock.seconds() * 1000), actor)
    except Exception as e:
        report.error = report.error or f"{type(e).__name__}: {e}"
    finally:
        unlock(lock_conn, kind)
    return report


class _PauseWatch:
    """Reads every ``PAUSE_CHECK_S`` whether an operator paused the reconcilers; ``pause``
    is that pause once one was seen (a failed read is tried again at the next check)."""

    def __init__(self, clock: IReactorTime, db: TransactionRunner) -> None:
        self._clock, self._db = clock, db
        self.pause: controls_store.Pause | None = None
        self._call = clock.callLater(PAUSE_CHECK_S, self._check)

    def _check(self) -> None:
        d = self._db.run("read_runtime_controls", controls_store.read_runtime_controls)

        def seen(controls: controls_store.RuntimeControls) -> None:
            self.pause = controls.paused("reconcilers")

        d.addCallbacks(seen, lambda f: log.warn("reading the operator's controls failed: "
                                                "{e}", e=f.getErrorMessage()))
        if self.pause is None and self._call is not None:
            self._call = self._clock.callLater(PAUSE_CHECK_S, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _stamp(progress: dict, clock: IReactorTime, began: float, done_at_start: int) -> None:
    """Date the progress and, when the reconciler counted its pass, estimate the time left."""
    progress["updated_ms"] = int(clock.seconds() * 1000)
    if "total" in progress:
        eta = eta_seconds(int(progress.get("done", 0)), int(progress["total"]), done_at_start,
                          clock.seconds() - began)
        progress["eta_s"] = None if eta is None else round(eta, 3)


class RunCutOff(Exception):
    """A transaction asked for by a reconciler after its run was cut off at the deadline."""


class _UntilCutOff:
    """The run's transaction runner, closed once the run is cut off: a reconciler still
    unwinding from the cancelled wait writes nothing after its run row is final."""

    def __init__(self, db: TransactionRunner, cut_off: list[bool]) -> None:
        self._db, self._cut_off = db, cut_off

    def run(self, desc: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
            ) -> defer.Deferred:
        if self._cut_off:
            return defer.fail(RunCutOff(f"{desc}: the run ended at its deadline"))
        return self._db.run(desc, fn, *args, **kwargs)


def _within_deadline(work: Any, ctx: RunContext, cut_off: list[bool]) -> defer.Deferred:
    """Run the reconciler's coroutine *work*; at ``ctx.deadline`` cancel the wait it is in
    (a request to a silent supernode, the second look's sleep) and fire at once, so the
    run ends at its deadline whatever it waits for. The progress the run saved (and holds
    in ``ctx.progress``) is only ever advanced past finished work, so nothing is skipped."""
    running = defer.Deferred.fromCoroutine(work)
    if ctx.deadline is None:
        return running
    done: defer.Deferred = defer.Deferred()

    def cut() -> None:
        cut_off.append(True)
        ctx.interrupted = True
        done.callback(None)
        running.cancel()

    timer = ctx.clock.callLater(max(0.0, ctx.deadline - ctx.clock.seconds()), cut)

    def finished(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if done.called:  # cut off already: only a failure other than the cancel is news
            if isinstance(result, Failure) and not result.check(defer.CancelledError,
                                                                RunCutOff):
                log.failure("reconciler {kind} failed after its deadline", result,
                            kind=ctx.report.kind)
            return
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)

    running.addBoth(finished)
    return done
