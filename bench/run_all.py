"""Every benchmark of the project, each run several times: what ``make bench`` runs.

    legacy     in-memory simulation (frames, events, simulated s per wall s); one
               supernode decoding frames over TCP next to a bare Twisted receiver (ceiling)
    cloud      raw COPY (ceiling) and the mirror write path on the same server; API posts/s
    bridge     legacy -> cloud drain at 1, 2 and 4 workers next to raw COPY of as many rows
               in the same run (ceiling); p99 lag at half of each drain speed; peak RSS per
               worker; cloud -> legacy
    reconcile  gaps reconcile of 10^4, 10^5, 10^6 messages with 100 differences: seconds,
               fraction of the history moved, memory; the in-sync pass (dirty set) at each
               size; pg_comparator on an equivalent pair of 10^6-row tables with 100
               differences, on the system PostgreSQL (where its pgcmp extension is), when
               installed (one line says so and the comparison is skipped when not)

Each figure is the median of --repeat runs (default 3) with min and max. Writes
``bench/results.json`` (required keys: ``bridge.msgs_per_s``, ``bridge.copy_rows_per_s``,
``bridge.ratio_to_copy``, ``bridge.p99_lag_ms``, ``bridge.peak_rss_mb``,
``reconcile.seconds_1m_100diff``, ``reconcile.fraction_moved``,
``reconcile.pg_comparator_seconds_1m_100diff``, ``reconcile.ratio_to_pg_comparator``,
``reconcile.in_sync_pass_seconds`` per size; the ``bridge.*`` headline
figures are the 1-worker ones), the targets and whether they are met, and how busy the
machine was (CPU seconds other processes used while this ran); prints the JSON document,
then a table; draws ``bench/scaling.png`` when matplotlib is installed.

Usage: python bench/run_all.py [--repeat N] [--quick] [--dsn DSN] [--only SECTION ...]
                               [--big-sim] [--out PATH] [--plot PATH] [--merge]
       python bench/run_all.py --report bench/results.json [--markdown]   (table only)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_stats import processes, summarize  # noqa: E402

SECTIONS = ("legacy", "cloud", "bridge", "reconcile")

#: (figure, path into results.json, comparison, target). The issue's targets, plus the
#: earlier cloud write-path goal that the README already tracks.
TARGETS = (
    # once streaming: raw COPY writes into accounts and conversations that exist; the
    # drain's start (discovery, leases, four feeds' first windows, 2,000 accounts and 1,000
    # conversations created) is measured apart (first_rows_s), its whole run beside it
    ("bridge legacy -> cloud once streaming / raw COPY", "bridge.steady_ratio_to_copy", ">=",
     0.6),
    ("bridge p99 mirror lag at half load, ms", "bridge.p99_lag_ms.median", "<=", 100),
    ("bridge peak RSS, MB (worst run)", "bridge.peak_rss_mb.max", "<=", 256),
    ("reconcile 10^6 messages, 100 differences, s", "reconcile.seconds_1m_100diff.median",
     "<=", 10),
    ("reconcile: fraction of the history moved (10^6)", "reconcile.fraction_moved.median",
     "<=", 0.01),
    ("reconcile 10^6, 100 differences / pg_comparator (same run)",
     "reconcile.ratio_to_pg_comparator", "<=", 0.5),
    ("reconcile in-sync pass at 10^6 messages, s", "reconcile.in_sync_pass_seconds.1000000",
     "<=", 0.2),
    ("reconcile in-sync pass: 10^6 over 10^4 (flat)", "reconcile.in_sync_growth_1e4_to_1e6",
     "<=", 2.0),
    ("cloud mirror write path / raw COPY", "cloud.write_path.mirror_ratio_to_copy", ">=",
     0.75),
    ("cloud API posts/s, 50 clients (4x the 535 of issue 16)", "cloud.api.posts_per_s.median",
     ">=", 2140),
    ("bridge cloud -> legacy / legacy -> cloud drain", "bridge.to_legacy_ratio_to_drain",
     ">=", 0.5),
    ("bridge cloud -> legacy p99 lag at half load, ms", "bridge.to_legacy_p99_lag_ms.median",
     "<=", 100),
    ("bridge cloud -> legacy peak RSS, MB (worst run)", "bridge.to_legacy_peak_rss_mb.max",
     "<=", 256),
    ("legacy sim 1,000 SNs / 100k users, steady state: simulated s per wall s",
     "legacy.sim_1000sn_100k_users.sim_seconds_per_wall_second.median", ">=", 1.0),
)


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- how busy the machine was -------------------------------------------------------------------

class MachineLoad:
    """CPU seconds used while the benchmarks ran, from /proc: by this benchmark's process
    tree, by PostgreSQL (ours and anyone else's: they can not be told apart), and by every
    other process on the machine (other people's work), plus the load average."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.me = os.getpid()
        self.tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            self.boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        self.used = {"bench": 0.0, "postgres": 0.0, "other": 0.0}
        self.other_by_name: Counter[str] = Counter()
        self.loads: list[float] = []
        self._last: dict[tuple[int, float], tuple[float, str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _scan(self) -> dict[int, tuple[int, float, str, float]]:
        procs = {}
        for pid, comm, fields in processes():
            cpu = (int(fields[11]) + int(fields[12])) / self.tick
            started = self.boot + int(fields[19]) / self.tick
            procs[pid] = (int(fields[1]), cpu, comm, started)
        return procs

    def _bucket(self, pid: int, procs: dict) -> str:
        seen = 0
        p = pid
        while p in procs and seen < 64:
            if p == self.me:
                return "bench"
            p = procs[p][0]
            seen += 1
        return "postgres" if procs[pid][2].startswith(("postgres", "postmaster")) else "other"

    def _sample(self, first: bool = False) -> None:
        procs = self._scan()
        for pid, (_, cpu, comm, started) in procs.items():
            key = (pid, started)  # a reused pid is another process
            last = self._last.get(key)
            if last is None:
                bucket = self._bucket(pid, procs)
                base = cpu if first or started < self.t0 else 0.0
                last = (base, bucket, comm)
            delta = cpu - last[0]
            if delta > 0:
                self.used[last[1]] += delta
                if last[1] == "other":
                    self.other_by_name[comm] += delta
            self._last[key] = (cpu, last[1], last[2])
        with open("/proc/loadavg") as f:
            self.loads.append(float(f.read().split()[0]))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception as e:  # a monitor must never end the benchmarks
                log(f"load sampling failed: {e}")

    def start(self) -> MachineLoad:
        self.t0 = time.time()
        with open("/proc/loadavg") as f:
            self.load_before = float(f.read().split()[0])
        self._sample(first=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.time() - self.t0
        cores = os.cpu_count() or 1
        share = self.used["other"] / (wall * cores)
        return {
            "wall_seconds": round(wall, 1), "cores": cores,
            "load_1m_before": self.load_before,
            "load_1m": summarize(self.loads, 2) if self.loads else None,
            "cpu_seconds": {k: round(v, 1) for k, v in self.used.items()},
            "other_share_of_machine": round(share, 3),
            "other_top": [[name, round(s, 1)] for name, s in self.other_by_name.most_common(5)],
            "busy": share > 0.05,
        }


# -- the sections -------------------------------------------------------------------------------

def legacy_section(repeat: int, big_sim: bool) -> dict:
    import bench_legacy

    from legacy.sim import RunConfig

    medium = RunConfig(supernodes=100, users=10_000, rate=200, duration=20, seed=1)
    runs = []
    for i in range(repeat):
        log(f"legacy: in-memory simulation, 100 SNs / 10,000 users, run {i + 1}/{repeat}")
        runs.append(bench_legacy.bench_sim(medium))
    out: dict = {"sim_medium": {
        "supernodes": 100, "users": 10_000, "rate": 200, "simulated_seconds": 20,
        **{k: summarize([r[k] for r in runs], digits) for k, digits in
           (("frames_per_s", 1), ("events_per_s", 1), ("sim_seconds_per_wall_second", 2))}}}
    if big_sim:
        log("legacy: in-memory simulation, 1,000 SNs / 100,000 users: setup, then steady state "
            "(one run, minutes)")
        out["sim_1000sn_100k_users"] = bench_legacy.big_result([bench_legacy.bench_phases(
            bench_legacy.BIG)])
    log(f"legacy: supernode vs bare Twisted frame decoding over TCP, {repeat} runs each")
    sn = bench_legacy.bench_tcp("sn", 47950, repeat)
    bare = bench_legacy.bench_tcp("bare", 47951, repeat)
    out["tcp_decode"] = {
        "supernode_frames_per_s": summarize(sn, 0),
        "bare_twisted_frames_per_s": summarize(bare, 0),
        "ratio_to_bare": round(statistics.median(sn) / statistics.median(bare), 3),
        "frames_per_run": bench_legacy.N_FRAMES,
    }
    return out


def cloud_section(server: str, repeat: int, quick: bool) -> dict:
    import bench_cloud

    return bench_cloud.measure(server, 20_000 if quick else 100_000, repeat, repeat, quick,
                               log)


def bridge_section(server: str, repeat: int, quick: bool,
                   workers: tuple[int, ...] = (1, 2, 4)) -> dict:
    import bench_bridge

    n = 10_000 if quick else 50_000
    lag_seconds = 10 if quick else 30
    points = []
    for k in workers:
        log(f"bridge: {k} worker(s): drain {n:,} + raw COPY, then lag at half load "
            f"({lag_seconds} s), {repeat} runs each")
        points.append(bench_bridge.scaling_point(server, n, repeat, k, lag_seconds))
    one = points[0]
    drains = one["per_run"]["drains"]
    out = {key: one[key] for key in (
        "workers", "backlog_messages", "supernodes", "msgs_per_s", "copy_rows_per_s",
        "ratio_to_copy", "first_rows_s", "steady_msgs_per_s", "steady_ratio_to_copy",
        "copy_transaction_rows", "copy_500_rows_per_s", "ratio_to_copy_500",
        "half_load_rate", "p50_lag_ms", "p99_lag_ms", "db_p50_lag_ms",
        "db_p99_lag_ms", "recent_p99_lag_ms", "peak_rss_mb")}
    out["ratio_to_copy_per_run"] = summarize(
        [d["msgs_per_s"] / d["copy_rows_per_s"] for d in drains], 3)
    log(f"bridge: cloud -> legacy: a {n:,}-row outbox drained by {workers} worker(s), then "
        f"the lag at half of that speed, {repeat} runs each")
    out.update(bench_bridge.to_legacy(server, repeat, n, list(workers), 5 if quick else 10,
                                      one["msgs_per_s"]["median"]))
    out["scaling"] = points
    return out


def reconcile_section(server: str, repeat: int, quick: bool,
                      pgc_server: str | None = None) -> dict:
    import bench_pg_comparator
    import bench_reconcile

    sizes = bench_reconcile.QUICK_SIZES if quick else bench_reconcile.SIZES
    pgc_server = pgc_server or bench_pg_comparator.SYSTEM_DSN
    why = bench_pg_comparator.unavailable(pgc_server)
    if why is None and server != pgc_server:
        # pg_comparator's pgcmp extension is on the system server: the reconcile runs
        # there too, so the two are compared on one server in one run
        log("reconcile: on the system PostgreSQL, where pg_comparator's extension is")
        server = pgc_server
    by_size = {}
    for n in sizes:
        log(f"reconcile: {n:,} messages, 100 differences, {repeat} passes "
            "(the scene is built once)")
        by_size.update(bench_reconcile.run_sizes(server, [n], repeat))
    big = by_size.get(str(1_000_000))
    in_sync = {k: v["in_sync_pass_seconds"] for k, v in by_size.items()}
    small = in_sync.get(str(10_000))
    growth = (round(in_sync[str(1_000_000)] / small, 2)
              if small and str(1_000_000) in in_sync else None)
    rows = 1_000_000 if not quick else 100_000
    if why is None:
        log(f"reconcile: pg_comparator, {rows:,} rows a table, 100 differences, {repeat} runs")
    pgc = bench_pg_comparator.run(pgc_server, rows, 100, repeat)
    pgc["same_server_as_reconcile"] = pgc_server == server
    ratio = None
    if not pgc["available"]:
        log(f"reconcile: pg_comparator skipped: {pgc['why']}")
    else:
        peer = by_size.get(str(rows))
        if peer:
            ratio = round(peer["seconds"]["median"] / pgc["seconds"]["median"], 3)
    return {
        "pg_comparator": pgc,
        "pg_comparator_seconds_1m_100diff": (pgc["seconds"] if pgc["available"]
                                             and rows == 1_000_000 else None),
        "ratio_to_pg_comparator": ratio if rows == 1_000_000 else None,
        "quick_ratio_to_pg_comparator": ratio if rows != 1_000_000 else None,
        "in_sync_pass_seconds": in_sync,
        "in_sync_growth_1e4_to_1e6": growth,
        "seconds_1m_100diff": big["seconds"] if big else None,
        "fraction_moved": big["fraction_moved"] if big else None,
        "fraction_moved_definition": "(GUIDs listed by both sides + messages fetched from "
                                     "legacy + messages injected into legacy) / messages",
        "by_size": by_size,
    }


# -- targets and the table ----------------------------------------------------------------------

def lookup(results: dict, path: str) -> Any:
    node: Any = results
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def judge(results: dict) -> list[dict]:
    out = []
    for name, path, op, target in TARGETS:
        value = lookup(results, path)
        if value is None:
            out.append({"figure": name, "path": path, "target": f"{op} {target}",
                        "value": None, "met": None})
            continue
        met = value >= target if op == ">=" else value <= target
        out.append({"figure": name, "path": path, "target": f"{op} {target}", "value": value,
                    "met": met, "value_over_target": round(value / target, 3)})
    return out


def _n(x: Any, digits: int = 0) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and digits:
        return f"{x:,.{digits}f}"
    return f"{round(x):,}"


def _mm(s: dict | None, digits: int = 0) -> tuple[str, str]:
    if not s:
        return "–", ""
    return _n(s["median"], digits), f"{_n(s['min'], digits)}–{_n(s['max'], digits)}"


def _target(results: dict, path: str) -> str:
    for t in results.get("targets", []):
        if t["path"] == path:
            verdict = "?" if t["met"] is None else ("met" if t["met"] else "NOT met")
            return f"{t['target']}: {verdict}"
    return ""


def table_rows(r: dict) -> list[tuple[str, ...]]:
    """(figure, median, min–max, ceiling, ratio, target) rows of whatever sections ran."""
    rows: list[tuple[str, ...]] = []

    def add(figure: str, s: dict | None, digits: int = 0, ceiling: str = "", ratio: str = "",
            target: str = "") -> None:
        med, rng = _mm(s, digits)
        rows.append((figure, med, rng, ceiling, ratio, target))

    legacy = r.get("legacy")
    if legacy:
        sim = legacy["sim_medium"]
        add("legacy sim 100 SNs/10k users: frames per wall s", sim["frames_per_s"])
        add("legacy sim: events per wall s", sim["events_per_s"])
        add("legacy sim: simulated s per wall s", sim["sim_seconds_per_wall_second"], 2)
        big = legacy.get("sim_1000sn_100k_users")
        if big and "steady_frames_per_s" in big:
            add("legacy sim 1,000 SNs/100k users, steady state: simulated s per wall s",
                big["sim_seconds_per_wall_second"], 2, target=_target(
                    r, "legacy.sim_1000sn_100k_users.sim_seconds_per_wall_second.median"))
            add("legacy sim 1,000 SNs/100k users, steady state: frames per wall s",
                big["steady_frames_per_s"])
            add("legacy sim 1,000 SNs/100k users: setup wall s (logins, links)",
                big["setup_wall_seconds"], 1)
        tcp = legacy["tcp_decode"]
        add("one supernode over TCP: frames decoded/s", tcp["supernode_frames_per_s"],
            ceiling=f"bare Twisted {_n(tcp['bare_twisted_frames_per_s']['median'])}",
            ratio=f"{tcp['ratio_to_bare']:.2f}")
    cloud = r.get("cloud")
    if cloud:
        w = cloud["write_path"]
        copy = f"raw COPY {_n(w['copy_rows_per_s']['median'])}"
        add("cloud raw COPY into messages, rows/s (ceiling)", w["copy_rows_per_s"])
        add("cloud mirror write path (phase legacy), rows/s", w["mirror_rows_per_s"],
            ceiling=copy, ratio=f"{w['mirror_ratio_to_copy']:.2f}",
            target=_target(r, "cloud.write_path.mirror_ratio_to_copy"))
        add("cloud mirror write path with notifications, rows/s",
            w["mirror_with_notifications_rows_per_s"], ceiling=copy,
            ratio=f"{w['mirror_with_notifications_ratio_to_copy']:.2f}")
        add("cloud replaying written batches, rows/s", w["replay_rows_per_s"])
        api = cloud["api"]
        ceiling = api.get("insert_ceiling_tx_per_s")
        add(f"cloud API posts/s, {api['clients']} clients ({api['errors']} errors)",
            api["posts_per_s"],
            ceiling=f"single-row inserts {_n(ceiling['median'])}" if ceiling else "",
            ratio=f"{api['ratio_to_ceiling']:.2f}" if ceiling else "",
            target=_target(r, "cloud.api.posts_per_s.median"))
        for procs, rate in api.get("posts_per_s_by_processes", {}).items():
            cpu = api.get("api_cpu_us_per_post_by_processes", {}).get(procs)
            add(f"  cloud run --processes {procs}: posts/s"
                + (f" (API CPU {_n(cpu['median'])} us/post)" if cpu else ""), rate)
        if ceiling:
            add(f"  ceiling: single-row insert transactions/s, {api['clients']} clients",
                ceiling)
    bridge = r.get("bridge")
    if bridge:
        for p in bridge.get("scaling", []):
            k = p["workers"]
            first = k == bridge["workers"]
            txn = p.get("copy_transaction_rows", 500)
            add(f"bridge legacy -> cloud, {k} worker(s), msgs/s", p["msgs_per_s"],
                ceiling=f"raw COPY {_n(p['copy_rows_per_s']['median'])} "
                        f"({_n(txn)}-row transactions)",
                ratio=f"{p['ratio_to_copy']:.2f}")
            if "steady_msgs_per_s" in p:
                add(f"  … once streaming (from its first rows, "
                    f"{p['first_rows_s']['median']:.2f} s after the start)",
                    p["steady_msgs_per_s"],
                    ceiling=f"raw COPY {_n(p['copy_rows_per_s']['median'])}",
                    ratio=f"{p['steady_ratio_to_copy']:.2f}",
                    target=_target(r, "bridge.steady_ratio_to_copy") if first else "")
            if "copy_500_rows_per_s" in p:
                add(f"  … against raw COPY in 500-row transactions (before {_n(txn)})",
                    p["msgs_per_s"], ceiling=f"raw COPY {_n(p['copy_500_rows_per_s']['median'])}",
                    ratio=f"{p['ratio_to_copy_500']:.2f}")
            produced = p.get("half_load_produced_per_s")
            load = (f"{_n(produced['median'])}/s produced of {_n(p['half_load_rate'])}/s"
                    if produced else f"{_n(p['half_load_rate'])}/s")
            add(f"bridge p99 lag at half load ({load}), {k} worker(s), ms", p["p99_lag_ms"],
                target=_target(r, "bridge.p99_lag_ms.median") if first else "")
            if "db_p99_lag_ms" in p:
                add(f"  same, p99 from the rows after warm-up (to the start of the "
                    f"inserting transaction), {k} worker(s), ms", p["db_p99_lag_ms"])
            if "recent_p99_lag_ms" in p:
                add(f"  same, p99 the workers' last heartbeat reported, {k} worker(s), ms",
                    p["recent_p99_lag_ms"])
            add(f"bridge peak RSS per worker, {k} worker(s), MB", p["peak_rss_mb"],
                target=_target(r, "bridge.peak_rss_mb.max") if first else "")
        for p in bridge.get("to_legacy_scaling", []):
            k, first = p["workers"], p["workers"] == bridge["to_legacy_scaling"][0]["workers"]
            add(f"bridge cloud -> legacy, {p['outbox_rows']:,}-row outbox, {k} worker(s), "
                f"msgs/s", p["msgs_per_s"],
                ratio=(f"{bridge['to_legacy_ratio_to_drain']:.3f}"
                       if first and bridge.get("to_legacy_ratio_to_drain") is not None
                       else ""),
                target=_target(r, "bridge.to_legacy_ratio_to_drain") if first else "")
            posted = p.get("half_load_posted_per_s")
            load = (f"{_n(posted['median'])}/s posted of {_n(p['half_load_rate'])}/s"
                    if posted else f"{_n(p['half_load_rate'])}/s")
            raw = p.get("raw_posts")
            add(f"bridge cloud -> legacy p99 lag at half load ({load}), "
                f"{k} worker(s), ms", p["p99_lag_ms"],
                ceiling=f"raw posts {_n(raw['p99_ms']['median'])}" if raw else "",
                target=_target(r, "bridge.to_legacy_p99_lag_ms.median") if first else "")
            curve = p.get("lag_curve", [])
            if curve:  # its last point is the half load above
                add(f"  … share of the machine's cores busy meanwhile, {k} worker(s)",
                    curve[-1]["busy"], 3)
                if "store_cpu_us_per_post" in curve[-1]:
                    add(f"  … PostgreSQL CPU per post meanwhile (the posts' and the "
                        f"drain's), {k} worker(s), us", curve[-1]["store_cpu_us_per_post"], 1)
            if raw:  # the same half load, each post writing only its rows: the floor
                add(f"  … p99 lag at half load of raw posts (only their rows; "
                    f"{_n(raw['posted_per_s']['median'])}/s posted, "
                    f"{raw['busy']['median']:.0%} of the cores busy), {k} worker(s), ms",
                    raw["p99_ms"])
                if "store_cpu_us_per_post" in raw:
                    add(f"  … PostgreSQL CPU per raw post meanwhile, {k} worker(s), us",
                        raw["store_cpu_us_per_post"], 1)
            for point in curve[:-1]:
                busy = point["busy"]["median"]
                add(f"  … p99 lag at {point['fraction']:g} of the drain "
                    f"({_n(point['posted_per_s']['median'])}/s posted, {busy:.0%} of the "
                    f"cores busy), {k} worker(s), ms", point["p99_ms"])
            add(f"bridge cloud -> legacy peak RSS, {k} worker(s), MB", p["peak_rss_mb"],
                target=_target(r, "bridge.to_legacy_peak_rss_mb.max") if first else "")
            for part, what in (("store", "PostgreSQL"), ("worker", "the workers"),
                               ("legacy", "the legacy feed server")):
                if part in p.get("cpu_us_per_msg", {}):
                    add(f"  … CPU per message drained, {what}, {k} worker(s), us",
                        p["cpu_us_per_msg"][part], 1)
        if "to_legacy_scaling" not in bridge and "to_legacy_msgs_per_s" in bridge:
            add("bridge cloud -> legacy (1 worker), msgs/s", bridge["to_legacy_msgs_per_s"])
    rec = r.get("reconcile")
    if rec:
        for key, s in sorted(rec["by_size"].items(), key=lambda kv: int(kv[0])):
            n = int(key)
            big = n == 1_000_000
            add(f"reconcile {n:,} msgs, 100 differences, s", s["seconds"], 2,
                target=_target(r, "reconcile.seconds_1m_100diff.median") if big else "")
            fm = s["fraction_moved"]
            rows.append((f"  fraction of the history moved ({n:,})",
                         f"{100 * fm['median']:.2f}%",
                         f"{100 * fm['min']:.2f}–{100 * fm['max']:.2f}%", "", "",
                         _target(r, "reconcile.fraction_moved.median") if big else ""))
            rows.append((f"  peak RSS ({n:,}; in-memory legacy network included), MB",
                         _n(s["peak_rss_mb"]), "", "", "", ""))
            if "in_sync_pass_seconds" in s:
                rows.append((f"  in-sync pass, dirty set ({n:,}), s",
                             f"{s['in_sync_pass_seconds']:.3f}", "", "", "",
                             _target(r, f"reconcile.in_sync_pass_seconds.{n}")
                             if big else ""))
        pgc = rec.get("pg_comparator") or {}
        if pgc.get("available"):
            big = rec.get("by_size", {}).get(str(pgc["rows"]), {}).get("seconds")
            add(f"pg_comparator {pgc['rows']:,} rows, 100 differences, s", pgc["seconds"], 2,
                ceiling=f"reconcile {_n(big['median'], 2)} s" if big else "",
                ratio=_n(rec.get("ratio_to_pg_comparator")
                         or rec.get("quick_ratio_to_pg_comparator"), 3),
                target=_target(r, "reconcile.ratio_to_pg_comparator"))
    return rows


def render(results: dict, markdown: bool = False) -> str:
    head = ("figure", "median", "min–max", "ceiling (same run)", "ratio", "target")
    rows = table_rows(results)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.strip() for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in rows]
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    if machine:
        lines.append("")
        lines.append(
            f"{meta.get('repeat')} run(s) per figure{' (--quick)' if meta.get('quick') else ''};"
            f" {machine['wall_seconds']:,.0f} s wall on {machine['cores']} cores; other "
            f"processes used {100 * machine['other_share_of_machine']:.0f}% of the machine "
            f"({'busy' if machine['busy'] else 'quiet'}), PostgreSQL "
            f"{machine['cpu_seconds']['postgres']:,.0f} CPU s, this benchmark "
            f"{machine['cpu_seconds']['bench']:,.0f} CPU s"
            f" (the run of {', '.join(meta.get('sections', []))})")
    for name, earlier in meta.get("merged", {}).items():
        lines.append(f"{name}: kept from the run of {earlier.get('started')} at commit "
                     f"{earlier.get('commit')}")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------

def git_commit() -> str | None:
    """HEAD, with ``+changes`` when the work tree differs from it (figures of a dirty tree)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return None
    return f"{head}+changes" if head and dirty else head or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="a fast smoke run: small sizes, 1 run per figure")
    p.add_argument("--dsn", default=os.environ.get("BRIDGE_DSN"),
                   help="PostgreSQL server for the scratch databases (default: embedded)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--big-sim", action="store_true",
                   help="also the 1,000-supernode / 100,000-user simulation (about 10 min)")
    p.add_argument("--out", default=os.path.join(HERE, "results.json"))
    p.add_argument("--plot", default=os.path.join(HERE, "scaling.png"))
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections of an existing --out file (re-run one "
                        "section without losing the rest)")
    p.add_argument("--report", metavar="RESULTS_JSON",
                   help="print the table of an earlier run and exit")
    p.add_argument("--markdown", action="store_true", help="the table as Markdown")
    args = p.parse_args()
    if args.report:
        with open(args.report) as f:
            print(render(json.load(f), args.markdown))
        return
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    repeat = 1 if args.quick else args.repeat
    from cloud import embedded

    server = args.dsn or embedded.ensure_running(os.environ.get("BRIDGE_HOME", ".bridge"))
    sections = args.only or list(SECTIONS)
    load = MachineLoad().start()
    results: dict = {"meta": {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(),
        "repeat": repeat, "quick": args.quick, "cores": os.cpu_count(),
        "database": "given DSN" if args.dsn else "embedded PostgreSQL (pgserver)",
        "sections": sections}}
    runners: dict[str, Callable[[], dict]] = {
        "legacy": lambda: legacy_section(repeat, args.big_sim),
        "cloud": lambda: cloud_section(server, repeat, args.quick),
        "bridge": lambda: bridge_section(server, repeat, args.quick),
        "reconcile": lambda: reconcile_section(server, repeat, args.quick),
    }
    timings = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.monotonic()
        results[name] = runners[name]()
        timings[name] = round(time.monotonic() - t0, 1)
        log(f"{name} done in {timings[name]:.0f} s")
    results["meta"]["section_seconds"] = timings
    results["meta"]["machine"] = load.stop()
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        kept = [name for name in SECTIONS if name in earlier and name not in sections]
        for name in kept:
            results[name] = earlier[name]
        # each section keeps the metadata of the run that measured it
        meta = earlier.get("meta", {})
        results["meta"]["merged"] = {
            name: meta.get("merged", {}).get(name)
            or {k: v for k, v in meta.items() if k != "merged"} for name in kept}
    results["targets"] = judge(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    try:
        from plot_scaling import plot

        if "bridge" in results or "reconcile" in results:
            results["meta"]["plot"] = plot(results, args.plot)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    print(json.dumps(results, indent=2))
    print()
    print(render(results))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
