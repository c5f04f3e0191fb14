"""``bridgectl chaos``: the chaos suite (``drills.chaos``), faults injected into real
processes."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from bridge import state
from bridgectl import options, runtime
from bridgectl.database import resolve_dsn
from bridgectl.errors import EXIT_FAILURE, EXIT_GATED, EXIT_OK, UsageError


def add_commands(sub: Any) -> None:
    from drills.chaos import SCENARIOS

    chaos = sub.add_parser(
        "chaos", help="the chaos suite: faults injected into real processes (make chaos)",
        description="Run each scenario (" + ", ".join(SCENARIOS) + ") once per seed: the "
                    "demo's processes on 127.0.0.1 with traffic both ways, the scenario's "
                    "fault, then heal, reconcile and check. A run passes only with zero "
                    "lost and zero duplicated messages. Exit codes: 0 all passed, 3 some "
                    "failed, 1 failure, 2 usage. Logs: $BRIDGE_HOME/chaos/.")
    chaos.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                       metavar="NAME", help="run only this scenario (repeatable; default all)")
    chaos.add_argument("--seeds", type=options.non_negative_int, default=3, metavar="N",
                       help="seeds per scenario (default 3)")
    chaos.add_argument("--first-seed", type=options.non_negative_int, default=1, metavar="N",
                       help="the first seed (default 1)")
    chaos.add_argument("--duration", type=options.number, default=45.0, metavar="S",
                       help="seconds of traffic per run (default 45)")
    chaos.add_argument("--supernodes", type=options.non_negative_int, default=6, metavar="N",
                       help="legacy supernodes (default 6)")
    chaos.add_argument("--legacy-users", type=options.non_negative_int, default=60,
                       metavar="N", help="simulated legacy users (default 60)")
    chaos.add_argument("--rate", type=options.number, default=15.0, metavar="MSGS_PER_S",
                       help="legacy messages per second (default 15)")
    options.add_dsn_option(chaos)
    chaos.add_argument("--json", action="store_true",
                       help="print the results as one JSON object on stdout")
    chaos.set_defaults(handler=cmd_chaos)


def cmd_chaos(args: argparse.Namespace) -> int:
    from drills import chaos
    from drills.config import DemoConfig

    names = args.scenario or list(chaos.SCENARIOS)
    if not 1 <= args.seeds <= 100:
        raise UsageError("--seeds must be between 1 and 100")
    if not 20 <= args.duration <= 3600:
        raise UsageError("--duration must be between 20 and 3600 seconds (the partition "
                         "and pause scenarios last 20 s)")
    sizes = {"supernodes": args.supernodes, "legacy_users": args.legacy_users,
             "rate": args.rate}
    try:
        DemoConfig(duration=args.duration, **sizes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    server_dsn, origin = resolve_dsn(args)
    embedded = not origin.startswith(("--dsn", "$BRIDGE_DSN"))
    skipped = [n for n in names if chaos.SCENARIOS[n].needs_embedded and not embedded]
    if skipped:
        print(f"chaos: skipping {', '.join(skipped)}: it restarts the embedded PostgreSQL "
              f"and this run uses {origin}", file=sys.stderr)
        names = [n for n in names if n not in skipped]
    home = state.state_home()
    state.secret(home, "peer")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))

    async def run_suite(reactor: Any, stop_signal: Any) -> list[Any]:
        stopping = [False]

        def on_stop_request() -> None:
            stopping[0] = True
            print("\nchaos: stopping after the current run", file=sys.stderr, flush=True)
        reactor.callLater(0, lambda: (runtime.on_signal(reactor, signal.SIGINT, on_stop_request),
                                      runtime.on_signal(reactor, signal.SIGTERM,
                                                        on_stop_request)))
        return await chaos.run_suite(
            reactor, names, seeds, server_dsn=server_dsn, home=home, duration=args.duration,
            out=sys.stdout, status_stream=sys.stderr, stop_requested=lambda: stopping[0],
            sizes=sizes)

    (home / "chaos").mkdir(parents=True, exist_ok=True)
    runtime.log_to_stream((home / "chaos" / "chaos.log").open("a", encoding="utf-8"),
                          stdlib_too=True)
    results = runtime.run_until_stopped(run_suite)
    if args.json:
        print(json.dumps({"passed": all(r.passed for r in results),
                          "skipped": skipped,
                          "runs": [r.to_json() for r in results]}, sort_keys=True))
    else:
        for r in results:
            print(chaos.render_line(r))
    if not results:
        return EXIT_FAILURE
    return EXIT_OK if all(r.passed for r in results) else EXIT_GATED
