"""Bridge benchmark (not a test): prints one JSON document.

Real processes on loopback: a legacy network (``bench/legacy_feed_server.py``, TCP), one
``bridgectl bridge run`` worker, and PostgreSQL (embedded unless --dsn / $BRIDGE_DSN).

- ``to_cloud_msgs_per_s``: legacy -> cloud drain speed: the feeds hold a backlog of N
  messages when the bridge starts; time from the bridge's start to the N-th row (polled
  every 20 ms through the conversations' sequence counters, see ``STORED``).
- ``copy_rows_per_s``: raw binary COPY of the same number of message rows into the same
  server in the same run, without the maintained digests' triggers, in transactions as large
  as the drain's largest (``FollowerConfig.max_batch`` rows: like for like; the ceiling,
  ``bench_cloud.raw_copy``: the median of three passes, after a VACUUM ANALYZE of the
  drained rows), and the ratio of the two. ``copy_500_rows_per_s`` (and its ratio): the same
  in 500-row transactions, the ceiling recorded before the drain's batches grew from 500
  frames to 2,000 (raw COPY gains about 10% from the larger transactions too).
- ``steady_msgs_per_s`` and ``steady_ratio_to_copy``: the drain once streaming, from the
  first mirrored rows (``first_rows_s`` after the start, polled every 5 ms) to the N-th: raw
  COPY writes into accounts and conversations that exist, while the drain's start connects,
  takes its leases, reads the four feeds' first windows and creates 2,000 accounts and 1,000
  conversations. The whole run's rate (``msgs_per_s``, ``ratio_to_copy``) stays beside it.
- ``lag_ms``: p50 and p99 mirror lag (event time at the supernode to commit, as the bridge
  measures it) with the legacy network producing half the measured drain speed: read from
  the workers' ``bridge_mirror_lag_seconds`` histograms over the whole load (the difference
  of two scrapes), as Prometheus' ``histogram_quantile`` would.
- ``to_legacy_msgs_per_s``: cloud -> legacy: N cloud messages committed at once; time
  until the outbox is drained (each one injected into its home supernode and acknowledged).
  Then the lag at half that speed, posted through the store's own path, with
  ``half_load_cycle``: where a conversation's turn went meanwhile (claims per second, rows
  per pass, the mean claim, pass and recording times; ``pass_breakdown``). ``lag_curve``:
  the lag at 1/8, 1/4 and 1/2 (the half load) of the drain's speed, each with ``busy``, the
  share of the machine's cores busy meanwhile, and ``store_cpu_us_per_post``, PostgreSQL's
  CPU per post while it ran (the posts' and the drain's). ``raw_posts``: the half load
  again, each post writing only its rows (``RAW_POSTS``): the lag's floor in the same run,
  for as long as the posting shares the machine with the drain.
- ``peak_rss_mb``: the bridge process's peak resident memory (VmHWM) over the drain run.

With ``--workers 1 2 4`` the drain and the lag runs are repeated with that many bridge
workers sharing the 4 feeds through their leases (``scaling``; half load is half of that
worker count's drain speed, peak RSS is per worker). Workers of a run are registered as
live before they start, so each takes its share of the feeds at once, as workers that were
already running when the backlog built up would have.

Each figure is the median of --runs runs (default 3), with min and max.

Usage: python bench/bench_bridge.py [--dsn DSN] [--quick] [--runs N] [--workers K ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import conninfo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_cloud import raw_copy, scratch_database, setup  # noqa: E402
from bench_stats import (  # noqa: E402
    busy_fraction,
    machine_busy_ticks,
    proc_stat,
    processes,
    summarize,
)

from bridge.follower import FollowerConfig  # noqa: E402
from cloud import embedded  # noqa: E402
from cloud.model import LEGACY_GUID_SQL, MirroredMessage  # noqa: E402
from cloud.store import coordination as coordination_store  # noqa: E402
from cloud.store import messages as messages_store  # noqa: E402
from cloud.store.notifications import NOTIFICATION_ID_SQL  # noqa: E402
from cloud.store.outbox import OUTBOX_CHANNEL  # noqa: E402

BASE_PORT = 47900
SUPERNODES = 4


class Run:
    """A fresh database, a legacy feed server and bridge workers, torn down at the end."""

    def __init__(self, server: str, mode: str, amount: float, workers: int = 1, *,
                 template: str | None = None) -> None:
        self.server, self.mode, self.amount, self.workers = server, mode, amount, workers
        self.home = tempfile.mkdtemp(prefix="bench-bridge-")
        self.env = {**os.environ, "BRIDGE_HOME": self.home}
        self.procs: list[subprocess.Popen] = []
        self.bridges: list[subprocess.Popen] = []
        self.metrics_urls: list[str] = []
        self._errors = None  # the legacy feed server's stderr (a file: shown if it fails)
        self._database = scratch_database(server, "bridge_benchb", template)

    def __enter__(self) -> Run:
        self.dsn = self._database.__enter__()  # a fresh database with the current schema
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)  # its database and whatever process did start
            raise

    def _start(self) -> Run:
        errors = self._errors = open(os.path.join(self.home, "legacy_feed_server.err"), "w+")
        legacy = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "legacy_feed_server.py"), str(BASE_PORT),
             str(SUPERNODES), self.mode, str(self.amount)],
            stdout=subprocess.PIPE, stderr=errors, text=True, env=self.env)
        self.procs.append(legacy)
        ready = legacy.stdout.readline().split()
        if not ready or ready[0] != "ready":
            legacy.wait(timeout=30)
            errors.seek(0)
            raise RuntimeError("the legacy feed server did not start: "
                               + (errors.read().strip()[-2000:] or f"exit {legacy.returncode}"))
        self.feed_messages = int(ready[1])  # messages in the feeds before any load
        return self

    def worker_ids(self) -> list[str]:
        return ["bench"] if self.workers == 1 else [f"bench-{i}" for i in range(self.workers)]

    def start_bridge(self) -> float:
        """Start the workers; returns when the first one is up (its monotonic time)."""
        ids = self.worker_ids()
        if len(ids) > 1:
            # every worker sees all of them live from its first lease pass: shares at once
            now_ms = int(time.time() * 1000)
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for wid in ids:
                    coordination_store.heartbeat_worker(conn, wid, "ready", now_ms, now_ms,
                                                        lag_to_cloud_ms=None, lag_to_legacy_ms=None,
                                                        mirrored_to_cloud=0, mirrored_to_legacy=0,
                                                        feeds=0, detail={})
        for wid in ids:
            bridge = subprocess.Popen(
                [sys.executable, "-m", "bridgectl.main", "bridge", "run", "--dsn", self.dsn,
                 "--legacy", f"127.0.0.1:{BASE_PORT + SUPERNODES}", "--metrics-port", "0",
                 "--worker-id", wid],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env,
                cwd=os.path.join(HERE, ".."))
            self.procs.append(bridge)
            self.bridges.append(bridge)
        self.bridge = self.bridges[0]
        ready = [self._wait_ready(b) for b in self.bridges]
        return min(ready)

    def _wait_ready(self, bridge: subprocess.Popen) -> float:
        while True:
            line = bridge.stderr.readline()
            if not line:
                raise RuntimeError("the bridge did not start")
            found = re.search(r"metrics on (http://[^\s;]+)", line)
            if found:
                at = time.monotonic()
                self.metrics_urls.append(found.group(1))
                # keep reading its log, so a chatty worker never blocks on a full pipe
                threading.Thread(target=lambda: bridge.stderr.read(), daemon=True).start()
                return at

    def peak_rss_mb(self) -> float:
        """The highest peak RSS (VmHWM) of the workers."""
        return max(self.rss_per_worker_mb())

    def rss_per_worker_mb(self) -> list[float]:
        out = []
        for bridge in self.bridges:
            with open(f"/proc/{bridge.pid}/status") as f:
                out.append(next((int(line.split()[1]) / 1024 for line in f
                                 if line.startswith("VmHWM:")), float("nan")))
        return out

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        self._database.__exit__(None, None, None)
        if self._errors is not None:
            self._errors.close()


def lag_buckets(urls: list[str], direction: str = "to_cloud") -> dict[float, float]:
    """Cumulative counts of the workers' lag histogram in *direction*, summed, by bound."""
    pattern = re.compile(r'^bridge_mirror_lag_seconds_bucket\{direction="' + direction
                         + r'",le="([^"]+)"\} (\S+)$', re.M)
    return {float(le): total for le, total in _summed(urls, pattern).items()}


def _summed(urls: list[str], pattern: re.Pattern) -> dict[str, float]:
    """The values of the series *pattern* matches (group 1: the key, group 2: the value) in
    the workers' metrics at *urls*, summed over the workers by key."""
    out: dict[str, float] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for key, value in pattern.findall(text):
            out[key] = out.get(key, 0.0) + float(value)
    return out


#: the worker series a half-load run's cycle is read from (``pass_breakdown``)
_CYCLE_SERIES = re.compile(
    r'^(cloud_db_transaction_seconds_(?:sum|count)\{desc="(?:claim_outbox|'
    r'complete_outbox_batch)"\}|bridge_batch_(?:size_messages|duration_seconds)_(?:sum|count)'
    r'\{direction="to_legacy"\}) (\S+)$', re.M)


def cycle_totals(urls: list[str]) -> dict[str, float]:
    """The workers' running totals of the cloud -> legacy cycle's series, summed."""
    return _summed(urls, _CYCLE_SERIES)


def pass_breakdown(before: dict[str, float], after: dict[str, float],
                   seconds: float) -> dict:
    """Where a conversation's turn went between two scrapes (``cycle_totals``): a row
    posted while a pass holds its conversation waits for that pass to end, then for a
    claim, then for its own pass (inject, then the recording transaction). Claims per
    second, rows per pass, and the mean claim, pass and recording times in ms."""
    def delta(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    def mean_ms(total: str, count: str) -> float | None:
        n = delta(count)
        return round(delta(total) / n * 1000, 1) if n else None

    tx = 'cloud_db_transaction_seconds_{}{{desc="{}"}}'
    batch = 'bridge_batch_{}_{}{{direction="to_legacy"}}'
    passes = delta(batch.format("size_messages", "count"))
    recording = "complete_outbox_batch"  # bridge.outbox.record_pass runs under this name
    return {"claims_per_s": round(delta(tx.format("count", "claim_outbox")) / seconds, 1),
            "rows_per_pass": (round(delta(batch.format("size_messages", "sum")) / passes, 1)
                              if passes else None),
            "claim_ms": mean_ms(tx.format("sum", "claim_outbox"),
                                tx.format("count", "claim_outbox")),
            "pass_ms": mean_ms(batch.format("duration_seconds", "sum"),
                               batch.format("duration_seconds", "count")),
            "record_ms": mean_ms(tx.format("sum", recording), tx.format("count", recording))}


def histogram_quantile(q: float, before: dict[float, float],
                       after: dict[float, float]) -> float:
    """The *q* quantile, in ms, of what was observed between two scrapes of a histogram:
    linear within the bucket it falls in, like Prometheus' ``histogram_quantile``."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        raise RuntimeError("no lag observed between the two scrapes")
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower * 1000  # beyond the last finite bound: report that bound
            return (lower + (bound - lower) * (rank - below) / (count - below)) * 1000
        lower, below = bound, count
    raise AssertionError("unreachable: the +Inf bucket holds every observation")


def poll_until(conn: psycopg.Connection, sql: str, target: int, timeout: float,
               every: float = 0.05) -> tuple[float, int]:
    """Run *sql* (one number) every *every* s until it reaches *target*: when it did
    (monotonic time) and the value it had then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (value,) = conn.execute(sql).fetchone()
        if value >= target:
            return time.monotonic(), int(value)
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {sql!r} to reach {target}")


def wait_until(conn: psycopg.Connection, sql: str, target: int, timeout: float,
               every: float = 0.05) -> float:
    """When *sql* reached *target* (``poll_until``'s time)."""
    return poll_until(conn, sql, target, timeout, every)[0]


#: Messages the store holds, while only the bridge writes: each mirrored batch advances its
#: conversations' next_seq by the rows it inserted, in the same transaction. A sum over the
#: 1,000 conversations costs 0.3 ms where count(*) over 50,000 messages cost 5 ms; polled
#: every 20 ms, the probe takes about 1% of one core from the run it times instead of 10%,
#: and sees the end within 20 ms instead of 50. The drain checks count(*) once at the end.
STORED = "SELECT coalesce(sum(next_seq - 1), 0) FROM conversations"

#: 1 once no outbox row is pending: the first entry of the pending rows' partial index, whose
#: entries for rows done are marked dead by the first scan that meets them. The count of rows
#: done that this replaces read the whole outbox, 5 ms a probe: polled every 20 ms it took
#: 2.0 s of the server's 4.7 s of CPU in a 50,000-row drain, from the run it timed. The runs
#: count the rows done once at the end.
DRAINED = ("SELECT (NOT EXISTS (SELECT 1 FROM outbox_to_legacy "
           "WHERE state = 'pending'))::int")


def drain_run(server: str, n: int, workers: int = 1) -> dict:
    with Run(server, "backlog", n, workers) as run:
        t0 = run.start_bridge()
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            # the first mirrored rows (polled every 5 ms): the start of the steady part
            t_first, at_first = poll_until(conn, STORED, 1, timeout=60, every=0.005)
            t1 = wait_until(conn, STORED, n, timeout=600, every=0.02)
            (stored,) = conn.execute("SELECT count(*) FROM messages").fetchone()
            if stored != n:
                raise RuntimeError(f"the store holds {stored} messages, not {n}")
        rss = run.rss_per_worker_mb()
        # the ceiling: raw COPY of as many rows into the same server, same run. The drain's
        # rows are vacuumed and analysed first, so autovacuum does not pick this moment to do
        # it; the median of three passes (one pass varied from 54,000 to 80,000 rows/s).
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE messages")
            rows = conn.execute(
                "SELECT conversation_id, sender_account_id, sender_handle FROM messages "
                "LIMIT 200").fetchall()
            passes: dict[int, list[float]] = {DRAIN_BATCH: [], 500: []}
            for k in range(COPY_PASSES):  # the two sizes alternate: the same conditions
                for j, size in enumerate(passes):
                    msgs = [MirroredMessage(rows[i % len(rows)][0], uuid.uuid4(),
                                            f"copy-{k}-{size}-{i}", rows[i % len(rows)][1],
                                            rows[i % len(rows)][2], 1_700_000_000_000 + i,
                                            "x" * 80) for i in range(n)]
                    passes[size].append(raw_copy(conn, msgs, size,
                                                 seq_base=(2 * k + j + 5) * 10_000_000))
        return {"msgs_per_s": n / (t1 - t0),
                "first_rows_s": t_first - t0,
                "steady_msgs_per_s": (n - at_first) / (t1 - t_first),
                "copy_rows_per_s": statistics.median(passes[DRAIN_BATCH]),
                "copy_passes_rows_per_s": passes[DRAIN_BATCH],
                "copy_500_rows_per_s": statistics.median(passes[500]),
                "copy_500_passes_rows_per_s": passes[500], "rss_mb": max(rss),
                "rss_per_worker_mb": rss, "rss_total_mb": sum(rss)}


#: raw COPY passes per drain run for the ceiling (their median)
COPY_PASSES = 3
#: rows per raw COPY transaction of the ceiling: the drain's largest transaction
DRAIN_BATCH = FollowerConfig().max_batch

#: lag samples of the first seconds (connecting, catching up) are left out of the DB figure
WARMUP_S = 5.0
#: after the load stops, time for its last messages to commit before the final scrape
SETTLE_S = 3.0


def lag_run(server: str, rate: float, seconds: float, workers: int = 1) -> dict:
    """Lag with the legacy network producing *rate* messages/s for *seconds*.

    ``produced_per_s``: the messages sent during those seconds that the store holds, per
    second: the load the bridge really carried (it should be *rate*).

    ``p99_ms``/``p50_ms``: from the workers' lag histograms (event time to commit, the
    bridge's own measurement), every message of the load: scraped when the bridge has stored
    the warm-up, and again once the load has stopped and its last messages had
    ``SETTLE_S`` to commit (so the slowest are not left out).

    ``recent_p99_ms``: what the workers' last heartbeat says (their recent samples only; the
    worst worker). ``db_p99_ms``/``db_p50_ms``: from the rows, every message after the
    warm-up seconds: the supernode's event time to ``created_at`` (the start of the
    inserting transaction, so without the commit itself).
    """
    with Run(server, "live", rate, workers) as run:
        run.start_bridge()
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            # every feed followed and the warm-up stored before the load starts: creating
            # the chats and a start-up catch-up are not lag under load
            wait_until(conn, "SELECT coalesce(sum(feeds), 0) FROM bridge_workers "
                             "WHERE state = 'ready'", SUPERNODES, timeout=60)
            wait_until(conn, "SELECT count(*) FROM messages", run.feed_messages, timeout=60)
        before = lag_buckets(run.metrics_urls)
        started_ms = time.time() * 1000
        run.procs[0].send_signal(signal.SIGUSR1)  # the legacy network starts producing
        time.sleep(seconds)
        run.procs[0].send_signal(signal.SIGUSR2)  # ... and stops
        # every message of the load committed (the slowest last) before the second scrape
        time.sleep(SETTLE_S)
        after = lag_buckets(run.metrics_urls)
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT lag_to_cloud_ms, mirrored_to_cloud FROM bridge_workers "
                                "WHERE lag_to_cloud_ms IS NOT NULL").fetchall()
            (produced,) = conn.execute(
                "SELECT count(*) FROM messages WHERE sent_ms >= %s AND sent_ms < %s",
                (started_ms, started_ms + seconds * 1000)).fetchone()
            db_p50, db_p99, db_n = conn.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), "
                "       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), count(*) "
                "FROM (SELECT extract(epoch FROM created_at) * 1000 - sent_ms AS lag "
                "      FROM messages WHERE sent_ms >= %s) l",
                (started_ms + WARMUP_S * 1000,)).fetchone()
        if len(rows) != workers:
            raise RuntimeError(f"{len(rows)} of {workers} workers reported a lag")
        return {"p99_ms": round(histogram_quantile(0.99, before, after), 1),
                "p50_ms": round(histogram_quantile(0.50, before, after), 1),
                "recent_p99_ms": max(r[0] for r in rows),
                "mirrored": sum(r[1] for r in rows), "db_p50_ms": float(db_p50),
                "db_p99_ms": float(db_p99), "db_samples": db_n,
                "produced_per_s": produced / seconds}


def scaling_point(server: str, n: int, runs: int, workers: int, lag_seconds: float) -> dict:
    """Drain speed, its ceiling, lag at half of it and RSS, with *workers* workers."""
    drains = [drain_run(server, n, workers) for _ in range(runs)]
    rate = statistics.median(d["msgs_per_s"] for d in drains) / 2
    lags = [lag_run(server, rate, lag_seconds, workers) for _ in range(runs)]
    mirror = [d["msgs_per_s"] for d in drains]
    steady = [d["steady_msgs_per_s"] for d in drains]
    copy = [d["copy_rows_per_s"] for d in drains]
    copy_500 = [d["copy_500_rows_per_s"] for d in drains]
    return {
        "workers": workers, "backlog_messages": n, "supernodes": SUPERNODES,
        "msgs_per_s": summarize(mirror),
        "copy_rows_per_s": summarize(copy),
        "ratio_to_copy": round(statistics.median(mirror) / statistics.median(copy), 3),
        "first_rows_s": summarize([d["first_rows_s"] for d in drains], 3),
        "steady_msgs_per_s": summarize(steady),
        "steady_ratio_to_copy": round(statistics.median(steady) / statistics.median(copy), 3),
        "copy_transaction_rows": DRAIN_BATCH,
        "copy_500_rows_per_s": summarize(copy_500),
        "ratio_to_copy_500": round(statistics.median(mirror) / statistics.median(copy_500), 3),
        "half_load_rate": round(rate, 1),
        # what the legacy network produced (and the bridge stored) during the lag runs
        "half_load_produced_per_s": summarize([x["produced_per_s"] for x in lags]),
        "lag_seconds_per_run": lag_seconds,
        "p50_lag_ms": summarize([x["p50_ms"] for x in lags]),
        "p99_lag_ms": summarize([x["p99_ms"] for x in lags]),
        "recent_p99_lag_ms": summarize([x["recent_p99_ms"] for x in lags]),
        "db_p50_lag_ms": summarize([x["db_p50_ms"] for x in lags]),
        "db_p99_lag_ms": summarize([x["db_p99_ms"] for x in lags]),
        "peak_rss_mb": summarize([d["rss_mb"] for d in drains]),
        "peak_rss_total_mb": summarize([d["rss_total_mb"] for d in drains]),
        "per_run": {"drains": drains, "lags": lags},
    }


#: cloud conversations of the cloud -> legacy runs (two dual members each), spread over the
#: supernodes by their chat ids
TO_LEGACY_CONVERSATIONS = 200

#: The lag load (post_load): what is due is posted in batches of at most LOAD_BATCH posts
#: (consecutive conversations, round robin), by LOAD_CONNECTIONS connections taking turns;
#: one with nothing due looks again after LOAD_TICK_S.
LOAD_TICK_S = 0.002
LOAD_BATCH = 100
LOAD_CONNECTIONS = 3


@contextlib.contextmanager
def loaded_outbox(server: str, n: int) -> Iterator[tuple[str, list[tuple]]]:
    """A database holding *n* cloud messages in ``TO_LEGACY_CONVERSATIONS`` conversations,
    every one posted through the store's own path (``post_messages``, the batched
    ``post_message``: the message, its notification rows and its outbox row), all pending;
    yields its name (each run copies it as a template) and the conversations."""
    with scratch_database(server, "bridge_benchtl") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            convs = setup(conn, TO_LEGACY_CONVERSATIONS, "dual")
            now_ms = int(time.time() * 1000)
            # post_messages: what the API's batcher uses, 1,000 posts a transaction (a long
            # run of post_message calls in one transaction puts each in a savepoint, and the
            # share locks on the members' accounts then pile up as ever larger multixacts)
            for first in range(0, n, 1000):
                posts = [messages_store.Post(*convs[i % len(convs)][:2], f"bench-{i}", "y" * 80,
                                             now_ms) for i in range(first, min(n, first + 1000))]
                with conn.transaction():
                    refused = [r for r in messages_store.post_messages(conn, posts)
                               if not isinstance(r, tuple)]
                if refused:
                    raise RuntimeError(f"posting the outbox failed: {refused[0]!r}")
            conn.execute("VACUUM ANALYZE")
        yield conninfo.conninfo_to_dict(dsn)["dbname"], convs


#: The rows a cloud post writes and nothing else, for the bench's conversations (two dual
#: members each): the floor of a post, as raw COPY is the mirror write's. Each
#: conversation's seqs under its lock (taken in id order, as every writer takes them), the
#: message with its legacy GUID, the other member's notification row, the outbox row with
#: the members' legacy-side handles, and the NOTIFY by the post's own rule (only for a row
#: that is its conversation's first waiting for a claim; the seqs and the NOTIFY are the
#: post's own SQL, ``SEQS_UNDER_LOCK_SQL`` and ``WOKEN_SQL``). Not done: the checks of the
#: sender, its phase, its membership and a replay; the share locks on the members'
#: accounts; working out who is owed a notification and whether legacy is owed the row.
#: It runs as the real post statement runs (binary arrays, one generic plan made without
#: sequential scans, ``_execute_prepared``), so the two differ only in what they do.
RAW_POSTS = (
    "WITH i AS MATERIALIZED (SELECT * FROM unnest(%(cids)b::uuid[], %(senders)b::uuid[], "
    "  %(handles)b::text[], %(others)b::uuid[], %(client_ids)b::text[], %(bodies)b::text[], "
    "  %(message_ids)b::uuid[], %(nows)b::bigint[], %(first_handles)b::text[], "
    "  %(second_handles)b::text[]) WITH ORDINALITY AS i(cid, sender, handle, other, "
    "  client_id, body, message_id, now_ms, h1, h2, ord)), "
    "counts AS MATERIALIZED (SELECT cid, count(*) AS n FROM i GROUP BY cid), "
    f"{messages_store.SEQS_UNDER_LOCK_SQL}"
    "numbered AS MATERIALIZED (SELECT i.*, b.first - 1 + row_number() OVER "
    "  (PARTITION BY i.cid ORDER BY i.ord) AS seq FROM i "
    "  JOIN bump b ON b.conversation_id = i.cid), "
    "posted AS (INSERT INTO messages (conversation_id, seq, message_id, sender_account_id, "
    "  sender_handle, sent_ms, body, origin, legacy_guid, client_message_id) "
    "  SELECT cid, seq, message_id, sender, handle, now_ms, body, 'cloud', "
    f"  {LEGACY_GUID_SQL.format('message_id')}, client_id FROM numbered), "
    "owed AS (INSERT INTO notifications (account_id, notification_id, conversation_id, "
    "  message_id, seq, next_attempt_ms, created_ms) "
    f"  SELECT other, {NOTIFICATION_ID_SQL.format(account='other', message='message_id')}, "
    "    cid, message_id, seq, now_ms, now_ms FROM numbered), "
    "queued AS (INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, created_ms, "
    "  member_handles) SELECT cid, seq, message_id, now_ms, ARRAY[h1, h2] FROM numbered "
    "  RETURNING conversation_id, seq, created_ms), "
    f"{messages_store.WOKEN_SQL}"
    "SELECT (SELECT count(*) FROM woken), count(*) FROM numbered")


def conversation_members(dsn: str, convs: list[tuple]) -> dict[tuple, tuple]:
    """For ``raw_posts``, read once: per (conversation, sender), what a post of that sender
    writes besides its text: (sender's handle, the other member, the members' legacy-side
    handles in order). The bench's conversations have two members each."""
    members: dict[uuid.UUID, list[tuple]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for cid, account, handle, legacy_handle in conn.execute(
                "SELECT m.conversation_id, m.account_id, a.handle, "
                "  coalesce(a.legacy_handle, a.handle) FROM members m "
                "JOIN accounts a USING (account_id) WHERE m.conversation_id = ANY(%s)",
                [[c[0] for c in convs]]):
            members.setdefault(cid, []).append((account, handle, legacy_handle))
    out = {}
    for cid, (a, b) in members.items():
        first, second = sorted((a[2], b[2]))
        out[(cid, a[0])] = (a[1], b[0], first, second)
        out[(cid, b[0])] = (b[1], a[0], first, second)
    return out


def raw_posts(conn: psycopg.Connection, posts: list, members: dict) -> None:
    """Write *posts* (``messages_store.Post``, at least one) with ``RAW_POSTS``, one
    statement; *members* from ``conversation_members``."""
    rows = []
    for post in posts:
        handle, other, first, second = members[(post.conversation_id, post.sender_account_id)]
        rows.append((post.conversation_id, post.sender_account_id, handle, other,
                     post.client_message_id, post.body, uuid.uuid4(), post.now_ms, first,
                     second))
    keys = ("cids", "senders", "handles", "others", "client_ids", "bodies", "message_ids",
            "nows", "first_handles", "second_handles")
    params = {key: list(column)
              for key, column in zip(keys, zip(*rows, strict=True), strict=True)}
    (_, written), = messages_store._execute_prepared(  # as post_messages runs its statement
        conn, RAW_POSTS, {**params, "channel": OUTBOX_CHANNEL})
    if written != len(posts):
        raise RuntimeError(f"raw posts wrote {written} of {len(posts)} messages")


def post_load(dsn: str, convs: list[tuple], rate: float, seconds: float,
              tag: str = "load", raw: bool = False) -> int:
    """Post *rate* cloud messages per second for *seconds*, through the store's own path
    (``post_messages``, the API batcher's: one statement writes each message, its
    notification and outbox rows, and the NOTIFY), sent at the wall clock's ms so the
    workers' lag histograms measure post to Ack; returns how many were posted. Client
    message ids are *tag*-0, *tag*-1, ...: each load on one database needs its own *tag*.

    Small batches often, as the API's batcher posts them (a few ms apart), from
    ``LOAD_CONNECTIONS`` connections taking turns: one connection posting a tick's worth in
    one statement every 50 ms reached only 1,600-2,400 posts/s, under half of the rate
    asked, and each batch's messages waited for its statement before anyone could see them
    (its time counted as lag). With *raw*, each batch is written by ``raw_posts``: the
    same messages, only their rows."""
    members = conversation_members(dsn, convs) if raw else None
    lock = threading.Lock()
    state = {"posted": 0, "next": 0, "error": None}
    start = time.monotonic()

    def poster() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() - start < seconds and state["error"] is None:
                with lock:  # take what is due by now, at most LOAD_BATCH
                    k = min(int(rate * (time.monotonic() - start)) - state["posted"],
                            LOAD_BATCH)
                    first, nxt = state["posted"], state["next"]
                    if k > 0:
                        state["posted"] += k
                        state["next"] = (nxt + k) % len(convs)
                if k <= 0:
                    time.sleep(LOAD_TICK_S)
                    continue
                now_ms = int(time.time() * 1000)
                posts = [messages_store.Post(*convs[(nxt + j) % len(convs)][:2],
                                             f"{tag}-{first + j}", "y" * 80, now_ms)
                         for j in range(k)]
                try:
                    if members is not None:
                        raw_posts(conn, posts, members)
                        continue
                    refused = [r for r in messages_store.post_messages(conn, posts)
                               if not isinstance(r, tuple)]
                except Exception as e:  # noqa: BLE001 - reported below, in the caller
                    state["error"] = repr(e)
                    return
                if refused:
                    state["error"] = f"posting the lag load failed: {refused[0]!r}"

    threads = [threading.Thread(target=poster) for _ in range(LOAD_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["error"] is not None:
        raise RuntimeError(state["error"])
    return state["posted"]


def _proc_cpu_s(pid: int, reaped: bool = False) -> float:
    """CPU seconds process *pid* has used, all its threads; with *reaped*, also those of its
    children that ended and were waited for."""
    stat = proc_stat(pid)
    if stat is None:
        raise RuntimeError(f"process {pid} is gone")
    fields = stat[1]
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_pid(dsn: str) -> int | None:
    """The pid of the PostgreSQL server *dsn* names when it runs on this machine (the parent
    of one of its backends); None when it does not."""
    with psycopg.connect(dsn) as conn:
        (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        stat = proc_stat(backend)
    return None if stat is None else int(stat[1][1])


def server_cpu_s(postmaster: int) -> float:
    """CPU seconds the whole PostgreSQL server has used: the postmaster with the backends it
    reaped, plus every one alive now."""
    tick = os.sysconf("SC_CLK_TCK")
    return _proc_cpu_s(postmaster, reaped=True) + sum(
        (int(fields[11]) + int(fields[12])) / tick
        for _pid, _name, fields in processes() if int(fields[1]) == postmaster)


def to_legacy_run(server: str, template: str, convs: list[tuple], n: int, workers: int,
                  lag_seconds: float, postmaster: int | None = None,
                  raw_first: bool = False) -> dict:
    """Drain an outbox of *n* rows with *workers* workers (from their start to the last
    row done), then the lag at 1/8, 1/4 and half of that speed, and at half with raw posts
    (before the real half load with *raw_first*: the runs alternate, so neither always
    meets the larger table). The drain's CPU per message is split between the store (the
    whole server, when *postmaster* is its pid on this machine), the workers (from when
    they are up) and the legacy feed server."""
    with Run(server, "backlog", 0, workers, template=template) as run:
        legacy = run.procs[0].pid
        store0 = server_cpu_s(postmaster) if postmaster is not None else None
        legacy0 = _proc_cpu_s(legacy)
        t0 = run.start_bridge()
        workers0 = sum(_proc_cpu_s(b.pid) for b in run.bridges)
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            t1 = wait_until(conn, DRAINED, 1, timeout=900, every=0.02)
            cpu_us = {"worker": (sum(_proc_cpu_s(b.pid) for b in run.bridges) - workers0),
                      "legacy": _proc_cpu_s(legacy) - legacy0}
            if store0 is not None:
                cpu_us["store"] = server_cpu_s(postmaster) - store0
            cpu_us = {k: round(v / n * 1e6, 1) for k, v in cpu_us.items()}
            states = dict(conn.execute("SELECT state, count(*) FROM outbox_to_legacy "
                                       "GROUP BY 1").fetchall())
            if states != {"done": n}:
                raise RuntimeError(f"the outbox ended as {states}, not {n} rows done")
        rss = run.rss_per_worker_mb()
        rate = n / (t1 - t0)
        curve = [lag_point(run, convs, rate, fraction, lag_seconds, postmaster=postmaster)
                 for fraction in LAG_CURVE_FRACTIONS]
        halves = {is_raw: lag_point(run, convs, rate, 0.5, lag_seconds,
                                    postmaster=postmaster, raw=is_raw)
                  for is_raw in ((True, False) if raw_first else (False, True))}
        raw = halves[True]
        curve.append(halves[False])
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            (done,) = conn.execute("SELECT count(*) FROM outbox_to_legacy "
                                   "WHERE state = 'done'").fetchone()
            if done != n + sum(p["posted"] for p in (*curve, raw)):
                raise RuntimeError(f"{done} outbox rows done, not {n} and all posted")
        half = curve[-1]
        return {"msgs_per_s": rate, "rss_mb": max(rss), "rss_per_worker_mb": rss,
                "cpu_us_per_msg": cpu_us,
                "half_load_rate": rate / 2, "half_load_posted_per_s": half["posted_per_s"],
                "half_load_cycle": half["cycle"],
                "p50_ms": half["p50_ms"], "p99_ms": half["p99_ms"], "lag_curve": curve,
                "raw_posts": raw}


#: Fractions of the drain's speed at which the cloud -> legacy lag is measured before the
#: half load the target names: on 2 cores, posting at half the drain's speed through the
#: store's own path while the drain runs keeps every core busy, and the lag there is mostly
#: the queue a saturated machine builds; the lower loads show the lag of the cycle itself.
LAG_CURVE_FRACTIONS = (0.125, 0.25)


def lag_point(run: Run, convs: list[tuple], drain_rate: float, fraction: float,
              seconds: float, *, postmaster: int | None = None, raw: bool = False) -> dict:
    """Post at *fraction* of *drain_rate* for *seconds* (``post_load``; with *raw*, only the
    posts' rows, ``raw_posts``) and wait until it is drained: the p50 and p99 lag (post to
    Ack, from the workers' histograms), what was posted, the share of the machine's cores
    that were busy meanwhile (everyone's: the posters, PostgreSQL, the workers, the legacy
    server), PostgreSQL's CPU per post meanwhile (when *postmaster* is its pid on this
    machine: the posts' and the drain's) and where the cycle went."""
    before = lag_buckets(run.metrics_urls, "to_legacy")
    cycle_before = cycle_totals(run.metrics_urls)
    busy_before = machine_busy_ticks()
    store0 = server_cpu_s(postmaster) if postmaster is not None else None
    posted = post_load(run.dsn, convs, drain_rate * fraction, seconds,
                       f"{'raw' if raw else 'load'}{fraction}", raw=raw)
    store_us = (None if store0 is None or not posted
                else round((server_cpu_s(postmaster) - store0) / posted * 1e6, 1))
    busy = busy_fraction(busy_before, machine_busy_ticks())
    cycle = pass_breakdown(cycle_before, cycle_totals(run.metrics_urls), seconds)
    with psycopg.connect(run.dsn, autocommit=True) as conn:
        wait_until(conn, DRAINED, 1, timeout=120, every=0.02)
    after = lag_buckets(run.metrics_urls, "to_legacy")
    return {"fraction": fraction, "rate": drain_rate * fraction, "posted": posted,
            "posted_per_s": posted / seconds, "busy": round(busy, 3),
            "store_cpu_us_per_post": store_us, "cycle": cycle,
            "p50_ms": round(histogram_quantile(0.50, before, after), 1),
            "p99_ms": round(histogram_quantile(0.99, before, after), 1)}


def _point_summary(points: list[dict]) -> dict:
    """The runs' summaries (``summarize``) of one lag point's figures; PostgreSQL's CPU per
    post only when every run measured it."""
    keys = ["posted_per_s", "busy", "p50_ms", "p99_ms"]
    if all(p.get("store_cpu_us_per_post") is not None for p in points):
        keys.append("store_cpu_us_per_post")
    return {key: summarize([p[key] for p in points], 3 if key == "busy" else 1)
            for key in keys}


def _median_or_none(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 1) if known else None


def to_legacy(server: str, runs: int, n: int, worker_counts: list[int], lag_seconds: float,
              drain_msgs_per_s: float | None) -> dict:
    """The cloud -> legacy section: one outbox of *n* rows, loaded once, drained *runs*
    times by each worker count; the ratio is to the legacy -> cloud drain of this run."""
    points = []
    postmaster = postmaster_pid(server)
    with loaded_outbox(server, n) as (template, convs):
        for workers in worker_counts:
            got = [to_legacy_run(server, template, convs, n, workers, lag_seconds, postmaster,
                                 raw_first=i % 2 == 1) for i in range(runs)]
            points.append({
                "workers": workers, "outbox_rows": n,
                "msgs_per_s": summarize([g["msgs_per_s"] for g in got]),
                "half_load_rate": round(statistics.median(g["half_load_rate"] for g in got), 1),
                "half_load_posted_per_s": summarize([g["half_load_posted_per_s"] for g in got]),
                "p50_lag_ms": summarize([g["p50_ms"] for g in got]),
                "p99_lag_ms": summarize([g["p99_ms"] for g in got]),
                # medians over the runs of where a conversation's turn went (pass_breakdown)
                "half_load_cycle": {k: _median_or_none([g["half_load_cycle"][k] for g in got])
                                    for k in got[0]["half_load_cycle"]},
                "lag_curve": [
                    {"fraction": point["fraction"],
                     "rate": round(statistics.median(
                         g["lag_curve"][i]["rate"] for g in got), 1),
                     **_point_summary([g["lag_curve"][i] for g in got])}
                    for i, point in enumerate(got[0]["lag_curve"])],
                "raw_posts": _point_summary([g["raw_posts"] for g in got]),
                "peak_rss_mb": summarize([g["rss_mb"] for g in got]),
                "cpu_us_per_msg": {k: summarize([g["cpu_us_per_msg"][k] for g in got])
                                   for k in got[0]["cpu_us_per_msg"]},
                "per_run": got})
    first = points[0]
    return {"to_legacy_msgs_per_s": first["msgs_per_s"],
            "to_legacy_ratio_to_drain": (
                None if drain_msgs_per_s is None
                else round(first["msgs_per_s"]["median"] / drain_msgs_per_s, 3)),
            "to_legacy_p99_lag_ms": first["p99_lag_ms"],
            "to_legacy_raw_posts_p99_lag_ms": first["raw_posts"]["p99_ms"],
            "to_legacy_peak_rss_mb": first["peak_rss_mb"],
            "to_legacy_cpu_us_per_msg": first["cpu_us_per_msg"],
            "to_legacy_scaling": points}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=os.environ.get("BRIDGE_DSN"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1],
                   help="worker counts to measure (default: 1)")
    p.add_argument("--to-legacy-workers", type=int, nargs="+", default=[1, 2, 4],
                   help="worker counts draining the outbox (default: 1 2 4)")
    p.add_argument("--only", choices=("to_cloud", "to_legacy"),
                   help="measure one direction only (to_legacy then has no drain ratio)")
    args = p.parse_args()
    server = args.dsn or embedded.ensure_running(os.environ.get("BRIDGE_HOME", ".bridge"))
    n = 10_000 if args.quick else 50_000
    bridge: dict = {}
    drain = None
    if args.only != "to_legacy":
        points = [scaling_point(server, n, args.runs, k, 10 if args.quick else 30)
                  for k in args.workers]
        first = points[0]
        bridge = {key: first[key] for key in (
            "backlog_messages", "supernodes", "msgs_per_s", "copy_rows_per_s",
            "ratio_to_copy", "half_load_rate", "p50_lag_ms", "p99_lag_ms", "peak_rss_mb")}
        bridge["workers"] = first["workers"]
        if len(points) > 1:
            bridge["scaling"] = points
        drain = first["msgs_per_s"]["median"]
    if args.only != "to_cloud":
        bridge.update(to_legacy(server, args.runs, 5_000 if args.quick else 50_000,
                                args.to_legacy_workers, 5 if args.quick else 10, drain))
    print(json.dumps({"bridge": bridge}, indent=2))


if __name__ == "__main__":
    main()
