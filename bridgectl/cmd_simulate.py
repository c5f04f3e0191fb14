"""``bridgectl simulate``: a months-long migration rehearsed in minutes on one simulated
clock (``drills.simulation``); ``--seeds A..B`` runs a swarm of seeds."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from bridgectl import options
from bridgectl.database import redact_dsn, resolve_dsn
from bridgectl.errors import EXIT_OK, RuntimeFailure, UsageError

#: Exit code of a run (or a swarm) that did not converge.
EXIT_NOT_CONVERGED = 3
_MAX_SWARM = 1000


def add_commands(sub: Any) -> None:
    sim = sub.add_parser(
        "simulate", help="rehearse a months-long migration in minutes (deterministic)",
        description="Run the whole migration on one simulated clock, in one process: the "
                    "in-memory legacy network and its users (sessions follow a working day), "
                    "the bridge workers, cloud devices posting through the store, the "
                    "notification dispatcher, the reconcilers on their cron schedule, cohort "
                    "moves from a plan, and faults. At the end it heals, reconciles and "
                    "checks the invariants from both stacks' own records. The same seed "
                    "gives the same outcome_hash. Exit codes: 0 converged, 3 not converged "
                    "(for a swarm: any seed), 1 failure, 2 usage.")
    sim.add_argument("--days", type=options.number, default=45.0, metavar="D",
                     help="simulated days (default 45)")
    sim.add_argument("--users", type=options.non_negative_int, default=2000, metavar="N",
                     help="legacy users, each linked to a cloud account (default 2000)")
    sim.add_argument("--supernodes", type=options.non_negative_int, metavar="N",
                     help="legacy supernodes (default: sized from --users, one per 800 "
                          "users and at least 16; with --dedicated-supernodes one per 4,100 "
                          "users and at least 2)")
    sim.add_argument("--rate", type=options.number, default=3.0, metavar="MSGS",
                     help="messages per user per simulated day, over a working-day cycle "
                          "(default 3)")
    sim.add_argument("--seed", type=options.non_negative_int, default=1, metavar="N",
                     help="seed of every random choice (default 1)")
    sim.add_argument("--seeds", metavar="A..B",
                     help="run seeds A to B (a swarm); prints each failing seed with the "
                          "command that replays it")
    sim.add_argument("--faults", choices=("none", "light", "heavy", "outage-2010"),
                     default="light",
                     help="none; light: a supernode crash every other day, link drops, "
                          "windows of hop loss, 2%% push loss, a bridge worker killed every "
                          "other day; heavy: all of it more often; "
                          "outage-2010: light plus the 2010 outage on the first working-day "
                          "afternoon from 60%% of the way in: 28%% of supernodes lost for an "
                          "hour, offline-message answers queued, clients crashing on late "
                          "answers (default light)")
    sim.add_argument("--plan", type=Path, metavar="FILE",
                     help="cohort plan: a JSON list of {\"day\": D, \"percent\": P, "
                          "\"phase\": \"dual\"} steps, each through its own named cohort, "
                          "and {\"day\": D, \"reverse\": true} rollbacks of the forward step "
                          "before them (default: the built-in plan over 45 days, with one "
                          "rollback, stretched to --days)")
    sim.add_argument("--dedicated-supernodes", action="store_true",
                     help="supernodes on fixed hosts that restart only by faults, about "
                          "4,100 users each unless --supernodes says otherwise (default: "
                          "client-hosted, 40%% short-lived, about 800 users each)")
    sim.add_argument("--reconcile-every", type=options.number, default=6.0, metavar="H",
                     help="simulated hours between reconcile runs (default 6)")
    sim.add_argument("--client-versions", metavar="SPREAD",
                     help="client versions the legacy devices report at login, weighted, "
                          "e.g. 7.1:0.2,7.4:0.5,8.0:0.3 (drawn from the seed; default: none "
                          "reported, as old clients)")
    sim.add_argument("--min-version", action="append", metavar="VERSION@DAY",
                     help="on simulated DAY the login server starts refusing clients older "
                          "than VERSION, set as `bridgectl legacy min-version` sets it (the "
                          "report counts the refused logins); may be given more than once")
    options.add_dsn_option(sim)
    sim.add_argument("--database", default="bridge_sim", metavar="NAME",
                     help="the run's own database on that server, dropped and created afresh "
                          "for each seed (must start with bridge_sim; default bridge_sim)")
    sim.add_argument("--no-pin", action="store_true",
                     help="leave the CPU affinities alone (default: the run and its database "
                          "backends share one CPU, when the server is local and its backends "
                          "can be pinned: each statement's round trip is then much shorter "
                          "on a virtual machine)")
    sim.add_argument("--json", action="store_true",
                     help="print the report as one JSON object on stdout (a swarm: one per "
                          "line)")
    sim.set_defaults(handler=cmd_simulate)


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is None:
        return [args.seed]
    m = re.fullmatch(r"(\d+)\.\.(\d+)", args.seeds.strip())
    if m is None:
        raise UsageError("--seeds must look like A..B (for example 1..20)")
    a, b = int(m[1]), int(m[2])
    if b < a:
        raise UsageError("--seeds A..B needs A <= B")
    if b - a + 1 > _MAX_SWARM:
        raise UsageError(f"--seeds runs at most {_MAX_SWARM} seeds at once")
    return list(range(a, b + 1))


def _config(args: argparse.Namespace, seed: int) -> Any:
    from drills.simplan import SimConfig, parse_plan
    from drills.simversions import parse_min_version

    plan = None
    if args.plan is not None:
        try:
            text = args.plan.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --plan {args.plan}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        try:
            plan = parse_plan(text)
        except ValueError as e:
            raise UsageError(f"--plan {args.plan}: {e}") from None
    try:
        min_versions = tuple(parse_min_version(text) for text in args.min_version or ())
        return SimConfig(days=args.days, users=args.users, supernodes=args.supernodes,
                         rate=args.rate, seed=seed, faults=args.faults, plan=plan,
                         dedicated_supernodes=args.dedicated_supernodes,
                         reconcile_every_h=args.reconcile_every,
                         client_versions=args.client_versions or "",
                         min_versions=min_versions)
    except ValueError as e:
        raise UsageError(str(e)) from None


def replay_command(args: argparse.Namespace, seed: int) -> str:
    """The command line that runs *seed* alone with the same settings."""
    parts = ["bridgectl", "simulate", "--seed", str(seed), "--days", f"{args.days:g}",
             "--users", str(args.users)]
    if args.supernodes is not None:  # else sized from the users again, alike
        parts += ["--supernodes", str(args.supernodes)]
    parts += ["--rate", f"{args.rate:g}", "--faults", args.faults,
              "--reconcile-every", f"{args.reconcile_every:g}"]
    if args.plan is not None:
        parts += ["--plan", str(args.plan)]
    if args.dedicated_supernodes:
        parts.append("--dedicated-supernodes")
    if args.client_versions:
        parts += ["--client-versions", args.client_versions]
    for text in args.min_version or ():
        parts += ["--min-version", text]
    return shlex.join(parts)


def cmd_simulate(args: argparse.Namespace) -> int:
    import psycopg

    from drills import colocate
    from drills.databases import fresh_database
    from drills.processes import DemoError
    from drills.simulation import Simulation

    seeds = _seeds(args)
    configs = [_config(args, seed) for seed in seeds]  # every usage error before any run
    if not re.fullmatch(r"bridge_sim[a-z0-9_]{0,50}", args.database):
        raise UsageError("--database must start with bridge_sim and hold only a-z, 0-9 "
                         "and _ (it is dropped and created afresh)")
    server_dsn, origin = resolve_dsn(args)
    failing = []
    for config in configs:
        try:
            dsn = fresh_database(server_dsn, args.database)
        except DemoError as e:
            raise RuntimeFailure(f"{e} ({origin}: {redact_dsn(server_dsn)})") from None
        print(f"simulate: seed {config.seed}, {config.days:g} days, {config.users} users, "
              f"{config.supernodes} supernodes, faults {config.faults}; database "
              f"{args.database} on {origin}", file=sys.stderr, flush=True)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn, \
                    psycopg.connect(dsn, autocommit=True) as lock_conn, \
                    colocate.pinned([conn, lock_conn], enabled=not args.no_pin,
                                    say=_progress) as (cpu, _why):
                report = Simulation(config, conn, lock_conn, progress=_progress).run()
            report["pinned_cpu"] = cpu
        except psycopg.OperationalError as e:
            raise RuntimeFailure(f"the database went away during the run: "
                                 f"{str(e).strip()}") from None
        report["replay"] = replay_command(args, config.seed)
        if not report["converged"]:
            failing.append(config.seed)
        if args.json:
            print(json.dumps(report, sort_keys=True), flush=True)
        else:
            print(render(report), flush=True)
    if len(configs) > 1:
        print(f"simulate: {len(configs) - len(failing)} of {len(configs)} seeds converged",
              file=sys.stderr)
        for seed in failing:
            print(f"  seed {seed} did not converge; replay: {replay_command(args, seed)}",
                  file=sys.stderr)
    return EXIT_NOT_CONVERGED if failing else EXIT_OK


def _progress(line: str) -> None:
    print(f"simulate: {line}", file=sys.stderr, flush=True)


def render(report: dict[str, Any]) -> str:
    """The report for a reader: the verdict first, then what happened."""
    m = report["messages"]
    verdict = "converged" if report["converged"] else "NOT CONVERGED"
    runs = report["reconcile_runs"]
    clean = sum(1 for r in runs if r["clean"])
    findings = ", ".join(f"{kind} {'/'.join(f'{s} {n}' for s, n in states.items())}"
                         for kind, states in report["findings"].items()) or "none"
    last = report["accounts_by_phase"][-1] if report["accounts_by_phase"] else {}
    phases = ", ".join(f"{p} {n}" for p, n in last.items() if p != "day")
    forward = [x for x in report["moves"] if x.get("action") != "reverse"]
    back = report.get("rollbacks", {})
    lines = [
        f"seed {report['seed']}: {verdict} after {report['simulated_days']:g} simulated days "
        f"({report['wall_seconds']} s wall"
        + (f", on CPU {report['pinned_cpu']} with its database backends"
           if report.get("pinned_cpu") is not None else "") + ")",
        f"  messages: {m['legacy_sent']:,} sent on legacy, {m['cloud_posted']:,} posted on "
        f"the cloud; lost {report['lost']}, duplicates {report['duplicates']}, lost by the "
        f"legacy network itself {report['lost_in_legacy']}",
        f"  notifications: {report['notifications_owed']:,} owed, "
        f"{report['notifications_acked']:,} acknowledged, "
        f"{report['notifications_failed']:,} failed",
        f"  reconcile runs: {len(runs)}, {clean} clean; findings: {findings}",
        f"  cohort moves: {sum(x['moved'] for x in forward):,} accounts moved, "
        f"{sum(x['held'] for x in forward):,} held by the gates, "
        f"{sum(x['failed'] for x in forward):,} failed, in {len(forward)} "
        f"steps; accounts at the end: {phases}",
        *([f"  rollbacks: {back['steps']} step{'s' * (back['steps'] != 1)} moved "
           f"{back['moved_back']:,} accounts back, "
           f"{back['backfilled']:,} messages back-filled to legacy, {back['failed']} failed"]
          if back.get("steps") else []),
        *_versions_lines(report.get("client_versions") or {}),
        "  faults: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                  for k, v in report["faults"].items() if v is not None),
        *([f"  work: {w['legacy_frames']:,} legacy frames, {w['transactions']:,} database "
           f"transactions in {w['transaction_seconds']:,} s"]
          if (w := report.get("work")) else []),
        f"  outcome_hash {report['outcome_hash']}",
    ]
    if not report["converged"]:
        lines.append(f"  replay: {report['replay']}")
    return "\n".join(lines)



def _versions_lines(v: dict[str, Any]) -> list[str]:
    """The client versions' line of the report: only when the run had any."""
    if not v.get("spread") and not v.get("min_versions"):
        return []
    devices = ", ".join(f"{ver} {n}" for ver, n in v["devices_by_version"].items())
    rules = "; ".join(f"minimum {r['version']} from day {r['day']:g}"
                      for r in v["min_versions"]) or "no minimum set"
    return [f"  client versions: devices {devices}; {rules}: {v['refused_logins']:,} logins "
            f"refused as too old ({v['devices_refused']:,} devices)"]
