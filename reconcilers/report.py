"""What a reconcile run shows: a human summary, a progress line, and metrics for Prometheus.

Metrics, one series per reconciler ``kind``, written for node_exporter's textfile collector
(``write_textfile``) or pushed to a Pushgateway (``push``, job ``bridge_reconcile``)::

    bridge_reconcile_last_success_timestamp_seconds  end of the last run that completed
                                                     with exit code 0 (in sync or all
                                                     repaired); a failed run keeps it
    bridge_reconcile_duration_seconds                the last run's duration
    bridge_reconcile_compared                        ... items it compared
    bridge_reconcile_found                           ... differences it confirmed
    bridge_reconcile_repaired                        ... differences it repaired
    bridge_reconcile_failed                          ... repairs that failed
    bridge_reconcile_exit_code                       ... exit code (runner.EXIT_*)

Alert on ``time() - bridge_reconcile_last_success_timestamp_seconds`` growing: it catches
failing runs, runs that stopped running, and runs that never finish alike.

Each registry is fresh (never the process-wide default), so only these series are written.
A run that found its kind's lock taken did nothing and writes nothing: the run holding the
lock reports for the kind; nor does a run refused because an operator paused the
reconcilers (``bridge_control_paused{what="reconcilers"}`` on the bridge workers shows it).
The textfile keeps the series of kinds this run did not cover and, for a kind whose run
failed, the previous success time, both read back from the file it replaces (under a lock
file, so every cron job can write the same file).
"""

from __future__ import annotations

import fcntl
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from reconcilers.runner import EXIT_IN_SYNC, Report

JOB = "bridge_reconcile"
LAST_SUCCESS = "bridge_reconcile_last_success_timestamp_seconds"
#: name -> (help, how to read it off a report)
PER_RUN: dict[str, tuple[str, Callable[[Report], float]]] = {
    "bridge_reconcile_duration_seconds": (
        "Duration of the last reconcile run.", lambda r: r.duration_s),
    "bridge_reconcile_compared": (
        "Items the last reconcile run compared.", lambda r: r.compared),
    "bridge_reconcile_found": (
        "Differences the last reconcile run confirmed (on a second look).",
        lambda r: r.confirmed),
    "bridge_reconcile_repaired": (
        "Differences the last reconcile run repaired.", lambda r: r.repaired),
    "bridge_reconcile_failed": (
        "Repairs that failed in the last reconcile run.", lambda r: r.failed),
    "bridge_reconcile_exit_code": (
        "Exit code of the last reconcile run (0 in sync, 1 error, 3 partial or differences "
        "remain, 4 locked, 5 paused by an operator).", lambda r: r.exit_code()),
}
METRIC_NAMES = (LAST_SUCCESS, *PER_RUN)


class MetricsError(Exception):
    """The metrics could not be written or pushed; the message says where and why."""


def did_nothing(report: Report) -> bool:
    """A run that never started: the lock was taken, or the reconcilers were paused."""
    return report.locked or (report.paused and report.run_id is None)


def succeeded(report: Report) -> bool:
    """A run that counts as a success: it completed and exits 0 (in sync or all repaired)."""
    return report.completed and report.exit_code() == EXIT_IN_SYNC


def _registry(reports: Sequence[Report], now: float,
              previous: dict[str, dict[str, float]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    gauges = {name: Gauge(name, help_, ["kind"], registry=registry)
              for name, (help_, _) in PER_RUN.items()}
    # a run that found the lock taken did nothing: the run holding it reports for the kind;
    # one refused by a pause did nothing either
    reports = [r for r in reports if not did_nothing(r)]
    covered = {r.kind for r in reports}
    for name, by_kind in previous.items():  # kinds this run did not cover keep their series
        if name in gauges:
            for kind, value in by_kind.items():
                if kind not in covered:
                    gauges[name].labels(kind=kind).set(value)
    for report in reports:
        for name, (_, read) in PER_RUN.items():
            gauges[name].labels(kind=report.kind).set(read(report))
    # a kind's success time: now after a success, else the one before (if any). A family
    # without samples is not even declared: pushed, it would wipe the gateway's old value.
    success = dict(previous.get(LAST_SUCCESS, {}))
    success.update({r.kind: now for r in reports if succeeded(r)})
    if success:
        last = Gauge(LAST_SUCCESS, "When the last successful reconcile run (exit code 0) "
                     "ended.", ["kind"], registry=registry)
        for kind, t in sorted(success.items()):
            last.labels(kind=kind).set(t)
    return registry


def read_textfile(path: str | Path) -> dict[str, dict[str, float]]:
    """Our series in an existing textfile: name -> kind -> value (empty when there is no
    readable file: a first run, or a file someone broke; it is rewritten either way)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError):
        return {}
    except OSError as e:
        raise MetricsError(f"cannot read the metrics file {path}: {e.strerror or e}") from None
    out: dict[str, dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                kind = sample.labels.get("kind")
                if sample.name in METRIC_NAMES and kind:
                    out.setdefault(sample.name, {})[kind] = sample.value
    except ValueError:
        return {}
    return out


def write_textfile(path: str | Path, reports: Sequence[Report], *,
                   now: float | None = None) -> None:
    """Replace *path* (it should end in ``.prom``) atomically with the reports' metrics.

    ``write_to_textfile`` writes a temporary file next to *path* and renames it over *path*,
    so the collector never reads a half-written file. Reading back the old file and writing
    the new one happen under an exclusive lock on ``<path>.lock``, so cron jobs of different
    kinds can share one file without losing each other's series.
    """
    try:
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            previous = read_textfile(path)
            registry = _registry(reports, time.time() if now is None else now, previous)
            write_to_textfile(str(path), registry)
    except OSError as e:
        raise MetricsError(f"cannot write the metrics file {path}: {e.strerror or e}") from None


def push(url: str, reports: Sequence[Report], *, now: float | None = None,
         timeout_s: float = 10.0) -> None:
    """Push the reports' metrics to the Pushgateway at *url*, one group per kind.

    ``pushadd`` (POST) replaces only the metrics pushed, so a failed run, which does not push
    a success time, leaves the group's previous one in place.
    """
    now = time.time() if now is None else now
    for report in reports:
        if did_nothing(report):
            continue  # the run holding the lock pushes for the kind; a paused one, nothing
        registry = _registry([report], now, {})
        try:
            pushadd_to_gateway(url, job=JOB, registry=registry,
                               grouping_key={"kind": report.kind}, timeout=timeout_s)
        except Exception as e:  # urllib raises URLError, HTTPError, OSError, ValueError ...
            reason = getattr(e, "reason", None) or e
            raise MetricsError(f"cannot push metrics to the Pushgateway at {url}: "
                               f"{reason}") from None


def render_text(report: Report) -> str:
    """The one-line human summary of a run (what ``bridgectl reconcile`` prints)."""
    kind = report.kind if report.scope is None else f"{report.kind} ({report.scope})"
    if report.locked:
        return (f"{kind}: another {report.kind} run holds the lock; nothing done"
                + ("" if report.scope is None else
                   " (a targeted run waits for no pass: run it again once that one ends)"))
    paused = ""
    if report.paused:
        pause = report.detail.get("paused") or {}
        why = f": {pause['reason']}" if pause.get("reason") else ""
        paused = (f"paused by {pause.get('set_by', 'an operator')}{why} (`bridgectl control "
                  "resume reconcilers` lets runs start again)")
        if report.run_id is None:
            return f"{kind}: the reconcilers are {paused}; nothing done"
    status = ("error: " + report.error if report.error else
              "compared nothing" if report.completed and report.compared == 0 else
              f"{paused}; the next run resumes" if report.paused and not report.completed else
              "interrupted (the next run resumes)" if not report.completed else
              f"partial: {report.uncovered} not covered" if report.uncovered else
              "differences remain" if report.exit_code() else
              "repaired" if report.confirmed else "in sync")
    return (f"{kind}: {status}; compared {report.compared}, suspects "
            f"{report.suspects}, confirmed {report.confirmed}, repaired {report.repaired}, "
            f"failed {report.failed}, {report.bytes_from_legacy} bytes from legacy, "
            f"{report.duration_s:.1f} s" + (" (resumed)" if report.resumed else "")
            + (" (dry run)" if report.dry_run else ""))


_FRACTION = re.compile(r"(\d+)/(\d+)")


class ProgressLine:
    """Progress for people and for cron: on a terminal one line redrawn in place (``\\r``)
    with a bar when the text contains ``done/total``; elsewhere a plain line at most every
    *interval_s*, so a cron mail stays short. Pass an instance as ``on_progress``."""

    def __init__(self, stream: TextIO = sys.stderr, *, interval_s: float = 10.0,
                 width: int = 24, columns: int = 100, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.width = width
        self.columns = columns
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self._last_print: float | None = None
        self._drawn = 0

    def __call__(self, text: str) -> None:
        if self.tty:
            line = f"{self.bar(text)} {text}"[:self.columns]
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
            self.stream.flush()
            return
        now = self.clock()
        if self._last_print is None or now - self._last_print >= self.interval_s:
            self._last_print = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def bar(self, text: str) -> str:
        match = _FRACTION.search(text)
        if match is None or int(match.group(2)) == 0:
            return "[" + " " * self.width + "]"
        share = min(1.0, int(match.group(1)) / int(match.group(2)))
        full = round(share * self.width)
        return f"[{'#' * full}{'.' * (self.width - full)}] {share:4.0%}"

    def done(self) -> None:
        """End the redrawn line (on a terminal) so what follows starts on its own line."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0

