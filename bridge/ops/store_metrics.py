"""Metrics a bridge worker reads from the store on each heartbeat: the migration as a whole.

The CLI commands that change phases or findings (``migrate``, ``cohort``, ``findings``,
``freeze``) exit once they are done, so a counter kept in their process would never be
scraped. What they change is in the store, and the long-running bridge worker reads it
back on its heartbeat (every ``heartbeat_s``), each read bounded:

- ``bridge_accounts_by_phase{phase}``: accounts per phase, every phase (0 included).
- ``bridge_findings_open{kind}``: open findings per kind, every known kind (0 included);
  the count uses the partial index on open findings.
- ``bridge_migration_frozen`` and ``bridge_migration_freeze_set_timestamp_seconds``: the
  freeze (``bridgectl freeze``) and when it was set.
- ``bridge_workers_live``: bridge workers whose heartbeat is recent, as the gates count them.
- ``bridge_control_paused{what}`` and ``bridge_injector_concurrency``: the operator's
  runtime controls (``bridgectl control``) as this worker read and applied them on its
  heartbeat (``publish_controls``, from the worker's own read of them): each pause that is
  on, and the injector's window in effect (the operator's value, else the configured one).

- ``bridge_reconcile_progress_ratio{kind}``: how much of its pass the newest full (cron)
  run of each kind has done, 0..1 (1 once finished; an interrupted run's pass as it stood,
  which the next run resumes); no series for a kind whose runs do not count their pass.
- ``bridge_reconcile_eta_seconds{kind}``: while that run is running, the seconds it still
  needs at the rate it has gone (its estimate at its last save, less the time since by the
  worker's clock); no series while no run of the kind is running, or before the run has an
  estimate. Targeted runs (``--account``/``--conversation``) are in ``bridgectl status``,
  not here.
- ``bridge_phase_changes_total{from,to}``: the ``phase_change`` rows of ``audit_log``,
  counted by this worker. It reads the rows after the last one it counted, at most
  ``PHASE_CHANGE_BATCH`` per heartbeat, so a worker starting on a long history catches up
  over several heartbeats; the series appear only once it has (until then a ``rate()``
  would see the whole history as one burst). Once caught up, the last ``LATE_WINDOW`` ids
  are read again, so a move whose transaction committed after later audit rows were written is still
  counted once. Every worker counts the same rows: take ``max``, not ``sum``. The count is
  the process's (one worker per process): a worker starting counts again from the start.
- ``bridge_cohort_last_action_timestamp_seconds{cohort,action}``: when each cohort was last
  created, advanced, reversed, completed or cancelled (its newest ``cohort_*`` audit row of
  that action), for the cohorts that are active or ended within ``COHORT_ENDED_SHOWN_MS``,
  at most ``COHORT_SERIES_MAX`` of them (the newest). The dashboard draws each value as an
  annotation at that moment (Grafana's "series value as timestamp"), so a move shows where
  it happened even when the series appeared later (a worker started after it). Read again in
  full each time: a cohort has a handful of such rows, found by ``audit_log_by_subject``.

Nothing here reads the wall clock: the live-worker cut-off uses the worker's injected
clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import attrs
import psycopg
from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bridge.ops import metrics as m
from cloud import admin
from cloud.model import PHASES
from cloud.store import accounts as accounts_store
from cloud.store import controls
from cloud.store.findings import FINDING_KINDS

#: Most ``phase_change`` audit rows one heartbeat reads.
PHASE_CHANGE_BATCH = 50_000
#: Audit ids below the highest counted one that are read again (late commits).
LATE_WINDOW = 1_000
#: How long an ended cohort keeps its series (so its completion or cancellation is scraped).
COHORT_ENDED_SHOWN_MS = 24 * 3600 * 1000
#: Most cohorts with series (the newest): bounds the gauge's cardinality.
COHORT_SERIES_MAX = 200
#: The cohort audit actions shown, by label value (``cohort_<action>`` in ``audit_log``).
COHORT_ACTIONS = ("created", "advanced", "reversed", "completed", "cancelled")

FINDINGS_OPEN = Gauge(
    "bridge_findings_open",
    "Findings in state open, per kind (the whole store, refreshed with each heartbeat).",
    ["kind"])
MIGRATION_FROZEN = Gauge(
    "bridge_migration_frozen",
    "1 while the migration freeze (bridgectl freeze on) holds every promotion, else 0.")
FREEZE_SET = Gauge(
    "bridge_migration_freeze_set_timestamp_seconds",
    "When the migration freeze that is on was set (0: no freeze).")
WORKERS_LIVE = Gauge(
    "bridge_workers_live",
    "Bridge workers with a heartbeat within the liveness window, as the store has them.")
CONTROL_PAUSED = Gauge(
    "bridge_control_paused",
    "1 while an operator has paused it (bridgectl control pause), else 0.", ["what"])
INJECTOR_CONCURRENCY = Gauge(
    "bridge_injector_concurrency",
    "Most outbox injections this worker keeps in flight now (bridgectl control set "
    "injector-concurrency, else its configured window).")

RECONCILE_PROGRESS = Gauge(
    "bridge_reconcile_progress_ratio",
    "How much of its pass the newest full reconcile run of each kind has done (0..1; 1 once "
    "finished), from reconcile_runs, refreshed with each heartbeat.",
    ["kind"])
RECONCILE_ETA = Gauge(
    "bridge_reconcile_eta_seconds",
    "Seconds the running full reconcile run of each kind still needs at the rate it has "
    "gone (no series while none runs).",
    ["kind"])

COHORT_LAST_ACTION = Gauge(
    "bridge_cohort_last_action_timestamp_seconds",
    "When a cohort was last created, advanced, reversed, completed or cancelled (its newest "
    "audit row of that action); active cohorts and those ended within a day.",
    ["cohort", "action"])
for _kind in FINDING_KINDS:
    FINDINGS_OPEN.labels(kind=_kind)
for _what in controls.PAUSES:
    CONTROL_PAUSED.labels(what=_what)


class PhaseChanges(Collector):
    """``bridge_phase_changes_total{from,to}``: ``phase_change`` audit rows, counted once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything counted (a new worker, or a test's fresh store)."""
        with self._lock:
            self.counts: dict[tuple[str, str], int] = {}
            self.high = 0  # the highest audit id counted
            self.recent: set[int] = set()  # counted ids within LATE_WINDOW of high
            self.caught_up = False

    def low_id(self) -> int:
        """Read audit ids above this one next: the last counted one while catching up (a
        transaction still open holds an id near the end of the log, not in the middle), and
        ``LATE_WINDOW`` ids before it once caught up."""
        with self._lock:
            return max(0, self.high - LATE_WINDOW) if self.caught_up else self.high

    def add(self, rows: Sequence[tuple[int, str, str]], *, complete: bool) -> None:
        """Count *rows* (audit id, from, to) not counted yet; *complete*: the read reached the
        end of the log (fewer rows than its limit), so the totals are whole."""
        with self._lock:
            for audit_id, from_phase, to_phase in rows:
                if audit_id in self.recent or audit_id <= self.high - LATE_WINDOW:
                    continue
                key = (from_phase, to_phase)
                self.counts[key] = self.counts.get(key, 0) + 1
                self.recent.add(audit_id)
                self.high = max(self.high, audit_id)
            floor = self.high - LATE_WINDOW
            self.recent = {i for i in self.recent if i > floor}
            self.caught_up = self.caught_up or complete

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "bridge_phase_changes", "Account phase changes applied (migrate, cohort), from "
            "the audit log's phase_change rows; every worker counts them all.",
            labels=["from", "to"])
        with self._lock:
            if self.caught_up:
                pairs = {(a, b): 0 for a in PHASES for b in PHASES if a != b}
                pairs.update(self.counts)
                for (a, b), n in sorted(pairs.items()):
                    family.add_metric([a, b], n)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("bridge_phase_changes", "", labels=["from", "to"])


PHASE_CHANGES = PhaseChanges()
REGISTRY.register(PHASE_CHANGES)


@attrs.frozen
class StoreReading:
    """One heartbeat's read of the store (one transaction)."""

    accounts_by_phase: dict[str, int]
    findings_open: dict[str, int]
    freeze: controls.Freeze | None
    workers_live: int
    phase_changes: list[tuple[int, str, str]]
    phase_changes_complete: bool
    #: kind -> (progress ratio, ETA seconds) of its newest full run (None: not known)
    reconcile: dict[str, tuple[float | None, float | None]] = attrs.field(factory=dict)
    #: (cohort, action) -> seconds since the epoch of its newest audit row
    cohort_actions: dict[tuple[str, str], float] = attrs.field(factory=dict)


def read_store(conn: psycopg.Connection, now_ms: int, after_id: int,
               limit: int = PHASE_CHANGE_BATCH) -> StoreReading:
    """Everything the gauges show, and the ``phase_change`` audit rows above *after_id*
    (at most *limit*, in id order; *limit* must exceed ``LATE_WINDOW``, or re-reading the
    window could fill every read and the count would never move on)."""
    if limit <= LATE_WINDOW:
        raise ValueError(f"limit must exceed LATE_WINDOW ({LATE_WINDOW})")
    findings = dict.fromkeys(FINDING_KINDS, 0)
    for kind, n in conn.execute("SELECT kind, count(*) FROM reconcile_findings "
                                "WHERE state = 'open' GROUP BY 1"):
        findings[kind] = n
    rows = conn.execute(
        "SELECT audit_id, detail->>'from', detail->>'to' FROM audit_log "
        "WHERE audit_id > %s AND action = 'phase_change' ORDER BY audit_id LIMIT %s",
        (after_id, limit)).fetchall()
    reconcile = {kind: (run.progress_ratio(), run.eta_seconds(now_ms))
                 for kind, run in admin.last_reconcile_runs(conn).items()}
    return StoreReading(
        accounts_store.accounts_by_phase(conn), findings, controls.read_freeze(conn),
        len(admin.live_workers(conn, now_ms)),
        [(i, a or "unknown", b or "unknown") for i, a, b in rows], len(rows) < limit,
        reconcile, read_cohort_actions(conn, now_ms))


def read_cohort_actions(conn: psycopg.Connection, now_ms: int) -> dict[tuple[str, str], float]:
    """(cohort, action) -> when its newest ``cohort_<action>`` audit row was written, for the
    newest ``COHORT_SERIES_MAX`` cohorts that are active or ended within
    ``COHORT_ENDED_SHOWN_MS`` of *now_ms*."""
    rows = conn.execute(
        "SELECT c.name, substr(a.action, 8), extract(epoch FROM max(a.at))::float8 "
        "FROM (SELECT name FROM cohorts WHERE state = 'active' OR ended_ms >= %s "
        "      ORDER BY created_ms DESC, cohort_id DESC LIMIT %s) c "
        "JOIN audit_log a ON a.subject = c.name AND a.action = ANY(%s) GROUP BY 1, 2",
        (now_ms - COHORT_ENDED_SHOWN_MS, COHORT_SERIES_MAX,
         [f"cohort_{action}" for action in COHORT_ACTIONS])).fetchall()
    return {(name, action): at for name, action, at in rows}


def publish(reading: StoreReading) -> None:
    """Set the gauges and count the new phase changes from *reading*."""
    for phase, n in reading.accounts_by_phase.items():
        m.ACCOUNTS_BY_PHASE.labels(phase=phase).set(n)
    for kind, n in reading.findings_open.items():
        FINDINGS_OPEN.labels(kind=kind).set(n)
    shown = {labels["kind"] for labels in _label_sets(FINDINGS_OPEN)}
    for kind in shown - set(reading.findings_open):  # a kind no longer open anywhere
        FINDINGS_OPEN.labels(kind=kind).set(0)
    MIGRATION_FROZEN.set(0 if reading.freeze is None else 1)
    FREEZE_SET.set(0 if reading.freeze is None else reading.freeze.set_ms / 1000)
    WORKERS_LIVE.set(reading.workers_live)
    PHASE_CHANGES.add(reading.phase_changes, complete=reading.phase_changes_complete)
    for gauge, index in ((RECONCILE_PROGRESS, 0), (RECONCILE_ETA, 1)):
        values = {kind: v[index] for kind, v in reading.reconcile.items()
                  if v[index] is not None}
        for kind, value in values.items():
            gauge.labels(kind=kind).set(value)
        for kind in {labels["kind"] for labels in _label_sets(gauge)} - set(values):
            gauge.remove(kind)  # not known now: no series rather than a stale value
    for (cohort, action), at in reading.cohort_actions.items():
        COHORT_LAST_ACTION.labels(cohort=cohort, action=action).set(at)
    for labels in _label_sets(COHORT_LAST_ACTION):  # a cohort no longer shown
        if (labels["cohort"], labels["action"]) not in reading.cohort_actions:
            COHORT_LAST_ACTION.remove(labels["cohort"], labels["action"])


def _label_sets(gauge: Gauge) -> list[dict[str, str]]:
    return [s.labels for family in gauge.collect() for s in family.samples]


def publish_controls(runtime: controls.RuntimeControls, window: int | None) -> None:
    """Set the runtime controls' gauges: each pause, and the injector's *window* in effect
    (None: this worker has no injector; the gauge is left alone)."""
    for what in controls.PAUSES:
        CONTROL_PAUSED.labels(what=what).set(0 if runtime.paused(what) is None else 1)
    if window is not None:
        INJECTOR_CONCURRENCY.set(window)
