"""Whole-migration simulation benchmark (not a test): prints one JSON document.

Runs ``drills.simulation.Simulation`` (what ``bridgectl simulate`` runs) for --days
simulated days of --users users, --repeat times with seeds 1.., each in a fresh database,
and reports per run the wall seconds, simulated days per wall minute, the messages carried and
whether it converged; then the medians, and the wall time a 45-day run of the same size
would take at that pace (``projected_45_days_wall_s``: a projection, labelled as one; the
issue's target is 5 minutes for 45 days of 2,000 users). Each run also says where its
database time went (``transactions``: transactions and their seconds per simulated day, and
the descriptions with the most time), and what the issue checks of a long run (``checks``:
lost, duplicates, notifications, the gaps runs after day 31), and the frames the legacy
network carried a simulated day (``frames_per_day``; like ``transactions``, the finish's
heal and last reconcile pass are in the total it divides). Each run is pinned with its
database backends to one CPU, as ``bridgectl simulate`` pins it (``pinned_cpu``;
``--no-pin`` leaves affinities alone). The cohort plan is the built-in one laid out over 45
days (not squeezed into --days), so the measured days move cohorts at a 45-day run's pace.
A progress line per simulated day goes to stderr.

Usage: python bench/bench_sim.py [--dsn DSN] [--days D] [--users N] [--supernodes N]
                                 [--repeat N] [--no-pin]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import psycopg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_cloud import scratch_database  # noqa: E402

from cloud import db as cloud_db  # noqa: E402
from cloud import embedded  # noqa: E402
from drills import colocate  # noqa: E402
from drills.simplan import SimConfig, default_plan  # noqa: E402
from drills.simulation import Simulation  # noqa: E402

#: transactions listed per run in ``transactions`` (the ones with the most time)
CENSUS_TOP = 12


def census(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
           days: float) -> dict:
    """Where the run's transaction time went: the total per simulated day, and the
    ``CENSUS_TOP`` descriptions with the most time (per simulated day, and mean ms)."""
    rows = []
    for desc, (n, s) in after.items():
        n0, s0 = before.get(desc, (0.0, 0.0))
        if n > n0:
            rows.append((s - s0, n - n0, desc))
    rows.sort(reverse=True)
    return {"transactions_per_day": round(sum(r[1] for r in rows) / days),
            "transaction_s_per_day": round(sum(r[0] for r in rows) / days, 2),
            "top": [{"desc": desc, "per_day": round(n / days), "s_per_day": round(s / days, 2),
                     "mean_ms": round(s / n * 1000, 2)} for s, n, desc in rows[:CENSUS_TOP]]}


def checks(report: dict) -> dict:
    """What the issue asks of a long run, from its report: nothing lost or duplicated,
    notifications all acknowledged, and every gaps run after day 31 that no fault window
    interrupted clean (``gaps_after_day_31``; null for a run of 31 days or less)."""
    late = [r for r in report["reconcile_runs"] if r["kind"] == "gaps" and r["day"] > 31]
    long_run = report["simulated_days"] > 31
    return {"lost": report["lost"], "duplicates": report["duplicates"],
            "notifications_owed": report["notifications_owed"],
            "notifications_acked": report["notifications_acked"],
            "notifications_failed": report["notifications_failed"],
            "gaps_after_day_31": {
                "runs": len(late), "clean": sum(1 for r in late if r["clean"]),
                "unclean_outside_faults": sum(1 for r in late
                                              if not r["clean"] and not r["during_faults"])}
            if long_run else None}


def one_run(server: str, config: SimConfig, pin: bool = True) -> dict:
    before = cloud_db.transaction_totals()

    def progress(line: str) -> None:
        print(f"bench-sim seed {config.seed}: {line}", file=sys.stderr, flush=True)
    with scratch_database(server, "bridge_benchsim") as dsn, \
            psycopg.connect(dsn, autocommit=True) as conn, \
            psycopg.connect(dsn, autocommit=True) as lock_conn, \
            colocate.pinned([conn, lock_conn], enabled=pin, say=progress) as (cpu, _why):
        report = Simulation(config, conn, lock_conn, progress=progress).run()
    m = report["messages"]
    wall = report["wall_seconds"]
    return {"seed": config.seed, "wall_seconds": wall,
            "sim_days_per_wall_minute": round(config.days / wall * 60, 3),
            "messages": m["legacy_sent"] + m["cloud_posted"],
            "converged": report["converged"], "outcome_hash": report["outcome_hash"],
            "pinned_cpu": cpu, "checks": checks(report),
            "frames_per_day": round(report["work"]["legacy_frames"] / config.days),
            "transactions": census(before, cloud_db.transaction_totals(), config.days)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", help="server DSN (default: the embedded PostgreSQL)")
    p.add_argument("--days", type=float, default=2.0)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--supernodes", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--no-pin", action="store_true",
                   help="leave CPU affinities alone (as bridgectl simulate --no-pin)")
    args = p.parse_args()
    server = args.dsn or embedded.ensure_running(os.environ.get("BRIDGE_HOME", ".bridge"))
    runs = [one_run(server, SimConfig(days=args.days, users=args.users,
                                      supernodes=args.supernodes, seed=seed,
                                      plan=default_plan(45)), pin=not args.no_pin)
            for seed in range(1, args.repeat + 1)]
    wall = statistics.median(r["wall_seconds"] for r in runs)
    print(json.dumps({"simulation": {
        "days": args.days, "users": args.users, "supernodes": args.supernodes,
        "runs": runs, "wall_seconds_median": wall,
        "sim_days_per_wall_minute_median": round(args.days / wall * 60, 3),
        "projected_45_days_wall_s": round(wall / args.days * 45),
        "target_45_days_2000_users_wall_s": 300,
        "all_converged": all(r["converged"] for r in runs)}}, indent=1))


if __name__ == "__main__":
    main()
