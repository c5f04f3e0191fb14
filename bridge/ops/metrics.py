"""The bridge's Prometheus metrics, in one place so every component shares the same objects.

Names follow Prometheus conventions: ``bridge_`` prefix, base units, ``_total`` for counters.
``direction`` is ``to_cloud`` (legacy -> cloud) or ``to_legacy`` (cloud -> legacy).
"""

from __future__ import annotations

import bisect
import gc
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bridge.ops import build

DIRECTIONS = ("to_cloud", "to_legacy")

MIRRORED = Counter(
    "bridge_mirrored_messages_total",
    "Messages the bridge wrote to the other stack (new ones, not replays).", ["direction"])
DUPLICATES = Counter(
    "bridge_duplicates_suppressed_total",
    "Messages the other stack already had (replays after reconnects or restarts).",
    ["direction"])
MEMBER_CHANGES = Counter(
    "bridge_member_changes_total",
    "Members the bridge added to or removed from a conversation on the other stack "
    "(membership is mirrored as changes).", ["direction", "change"])
CREDENTIALS = Counter(
    "bridge_credentials_total",
    "Passwords recovered on the cloud that the bridge handed to the legacy login server, by "
    "outcome (delivered, skipped: no such legacy account, failed: retried later).",
    ["outcome"])
for _outcome in ("delivered", "skipped", "failed"):
    CREDENTIALS.labels(outcome=_outcome)
MIN_VERSION_RULES_SENT = Counter(
    "bridge_min_version_rules_sent_total",
    "Stored minimum-version rules the bridge sent to a legacy login server that lacked them "
    "(after its restart), without the operator's --reapply.")
LOOPS = Counter(
    "bridge_loop_suppressed_total",
    "Feed entries not mirrored because they came from the other stack (no loops).",
    ["direction"])


class BulkHistogram(Collector):
    """A labelled Prometheus histogram that takes a whole batch of observations at once.

    prometheus_client's ``Histogram.observe`` takes two locks per value (a bucket and the
    sum); the feed followers observe one lag per mirrored message, tens of thousands a
    second. This keeps plain per-bucket counts and adds a batch under one lock, and its
    exposition is the one ``Histogram`` gives for the same values (``_bucket`` with ``le``,
    ``_count``, ``_sum``; tested), without ``_created``.
    """

    def __init__(self, name: str, documentation: str, labelname: str,
                 buckets: Iterable[float]) -> None:
        self.name, self.documentation, self.labelname = name, documentation, labelname
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._lock = threading.Lock()
        #: label value -> ([count per bucket, +Inf last], sum)
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def labels(self, **labels: str) -> BulkHistogram.Child:
        if set(labels) != {self.labelname}:
            raise ValueError(f"{self.name} takes exactly the label {self.labelname!r}")
        value = labels[self.labelname]
        with self._lock:
            self._series_of(value)
        return BulkHistogram.Child(self, value)

    def _series_of(self, value: str) -> tuple[list[int], list[float]]:
        """The counts and sum of one label value, made empty on first use (lock held)."""
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = ([0] * (len(self.bounds) + 1), [0.0])
        return series

    def observe_many(self, value: str, amounts: Iterable[float]) -> None:
        """Observe every one of *amounts* (as ``observe`` would, one by one)."""
        amounts = list(amounts)  # an iterator that fails part-way changes nothing
        bounds, find = self.bounds, bisect.bisect_left
        with self._lock:
            counts, sums = self._series_of(value)
            total = sums[0]
            for amount in amounts:
                counts[find(bounds, amount)] += 1  # le: the first bound >= the value
                total += amount  # one at a time, as Histogram sums (the same float)
            sums[0] = total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation,
                                       labels=[self.labelname])
        with self._lock:
            series = [(v, list(c), s[0]) for v, (c, s) in sorted(self._series.items())]
        for value, counts, total in series:
            cumulative, running = [], 0
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                running += n
                cumulative.append((floatToGoString(bound), running))
            family.add_metric([value], cumulative, total)
        yield family

    class Child:
        """One label value's series: ``observe`` and ``observe_many``."""

        def __init__(self, parent: BulkHistogram, value: str) -> None:
            self._parent, self._value = parent, value

        def observe(self, amount: float) -> None:
            self._parent.observe_many(self._value, (amount,))

        def observe_many(self, amounts: Iterable[float]) -> None:
            self._parent.observe_many(self._value, amounts)


LAG = BulkHistogram(
    "bridge_mirror_lag_seconds",
    "Event time at the source stack to commit on the other stack.", "direction",
    # fine around the 100 ms objective, so a p99 read from the buckets is close to exact
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30,
             60, 300))
REGISTRY.register(LAG)
BATCH_SIZE = Histogram(
    "bridge_batch_size_messages", "Messages per committed mirror batch.", ["direction"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500))
BATCH_SECONDS = Histogram(
    "bridge_batch_duration_seconds", "Time to commit one mirror batch.", ["direction"])
BACKLOG = Gauge(
    "bridge_backlog_messages",
    "Work waiting: uncommitted feed entries (to_cloud), pending outbox rows (to_legacy).",
    ["direction"])
PRESENCE = Counter(
    "bridge_presence_updates_total", "Presence updates mirrored.", ["direction"])
FEED_GAPS = Counter(
    "bridge_feed_gaps_total", "Feed gaps found (new epoch, offset out of the buffer, or "
    "a checkpoint ahead of the feed).",
    ["kind"])
OUTBOX_PENDING = Gauge(
    "bridge_outbox_pending",
    "Outbox rows waiting to be injected into the legacy network, as this worker last read "
    "them (every backlog_every_s).")
OUTBOX_OLDEST_AGE = Gauge(
    "bridge_outbox_oldest_age_seconds",
    "Age of the oldest outbox row waiting to be injected (0: none waiting), as this worker "
    "last read it.")
OUTBOX_GIVEN_UP = Counter(
    "bridge_outbox_given_up_total",
    "Outbox rows given up after InjectorConfig's max_attempts or max_age_s: state failed, "
    "with an inject_failed finding.")
RETRIES = Counter(
    "bridge_retries_total", "Operations retried after a failure, by what failed.", ["what"])
FEEDS_CONNECTED = Gauge(
    "bridge_feeds_connected", "Supernode feeds this worker is subscribed to.")
LEASES_HELD = Gauge("bridge_leases_held", "Feed leases this worker holds.")
ACCOUNTS_BY_PHASE = Gauge(
    "bridge_accounts_by_phase",
    "Cloud accounts per migration phase (refreshed with each heartbeat).",
    ["phase"])
GC_FROZEN = Gauge(
    "bridge_gc_frozen_objects",
    "Objects moved out of the garbage collector's reach once the worker started (gc.freeze).")
GC_FROZEN.set_function(gc.get_freeze_count)
BUILD_INFO = Gauge(
    "bridge_build_info",
    "Always 1; its label says which release this worker runs (the package version).",
    ["version"])
BUILD_INFO.labels(version=build.version()).set(1)
ACCOUNTS_CREATED = Counter(
    "bridge_accounts_created_total", "Cloud accounts created for legacy handles on first sight.")

for _phase in ("legacy", "dual", "cloud", "cloud-only"):
    ACCOUNTS_BY_PHASE.labels(phase=_phase)
for _d in DIRECTIONS:
    for _m in (MIRRORED, DUPLICATES, LOOPS, LAG, BATCH_SIZE, BATCH_SECONDS, BACKLOG, PRESENCE):
        _m.labels(direction=_d)
    for _change in ("added", "removed"):
        MEMBER_CHANGES.labels(direction=_d, change=_change)
