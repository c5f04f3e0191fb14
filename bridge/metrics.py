"""The bridge's Prometheus metrics, in one place so every component shares the same objects.

Names follow Prometheus conventions: ``bridge_`` prefix, base units, ``_total`` for counters.
``direction`` is ``to_cloud`` (legacy -> cloud) or ``to_legacy`` (cloud -> legacy).
"""

from __future__ import annotations

import gc

from prometheus_client import Counter, Gauge, Histogram

DIRECTIONS = ("to_cloud", "to_legacy")

MIRRORED = Counter(
    "bridge_mirrored_messages_total",
    "Messages the bridge wrote to the other stack (new ones, not replays).", ["direction"])
DUPLICATES = Counter(
    "bridge_duplicates_suppressed_total",
    "Messages the other stack already had (replays after reconnects or restarts).",
    ["direction"])
LOOPS = Counter(
    "bridge_loop_suppressed_total",
    "Feed entries not mirrored because they came from the other stack (no loops).",
    ["direction"])
LAG = Histogram(
    "bridge_mirror_lag_seconds",
    "Event time at the source stack to commit on the other stack.", ["direction"],
    # fine around the 100 ms objective, so a p99 read from the buckets is close to exact
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30,
             60, 300))
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
    "bridge_feed_gaps_total", "Feed gaps found (new epoch or offset out of the buffer).",
    ["kind"])
RETRIES = Counter(
    "bridge_retries_total", "Operations retried after a failure, by what failed.", ["what"])
FEEDS_CONNECTED = Gauge(
    "bridge_feeds_connected", "Supernode feeds this worker is subscribed to.")
LEASES_HELD = Gauge("bridge_leases_held", "Feed leases this worker holds.")
ACCOUNTS_BY_PHASE = Gauge(
    "bridge_accounts", "Cloud accounts per migration phase (refreshed with each heartbeat).",
    ["phase"])
GC_FROZEN = Gauge(
    "bridge_gc_frozen_objects",
    "Objects moved out of the garbage collector's reach once the worker started (gc.freeze).")
GC_FROZEN.set_function(gc.get_freeze_count)
ACCOUNTS_CREATED = Counter(
    "bridge_accounts_created_total", "Cloud accounts created for legacy handles on first sight.")

for _phase in ("legacy", "dual", "cloud", "cloud-only"):
    ACCOUNTS_BY_PHASE.labels(phase=_phase)
for _d in DIRECTIONS:
    for _m in (MIRRORED, DUPLICATES, LOOPS, LAG, BATCH_SIZE, BATCH_SECONDS, BACKLOG, PRESENCE):
        _m.labels(direction=_d)
