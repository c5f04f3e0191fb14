"""``bridgectl demo``: the whole migration on this machine (``drills.demo``), end to end."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from typing import Any

from bridge import state
from bridgectl import options, runtime
from bridgectl.database import redact_dsn, resolve_dsn
from bridgectl.errors import EXIT_FAILURE, EXIT_GATED, EXIT_OK, RuntimeFailure, UsageError


def add_commands(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="the whole migration on this machine, end to end (what `make demo` runs)",
        description="Start the legacy network, the cloud API and bridge workers as separate "
                    "processes on 127.0.0.1, run legacy and cloud traffic, move cohorts of "
                    "accounts through the phases, inject faults, reconcile like cron, then "
                    "heal, reconcile once more and check that nothing was lost or "
                    "duplicated. Ctrl-C ends the traffic early and goes on to the check; a "
                    "second Ctrl-C (or SIGTERM) stops everything at once. Exit codes: 0 "
                    "converged, 3 ran to the end but did not converge, 1 failure, 2 usage. "
                    "Logs: $BRIDGE_HOME/demo/.")
    demo.add_argument("--duration", type=options.number, default=60.0, metavar="S",
                      help="seconds of traffic (default 60; 0: until Ctrl-C)")
    demo.add_argument("--supernodes", type=options.non_negative_int, default=6, metavar="N",
                      help="legacy supernodes (default 6)")
    demo.add_argument("--legacy-users", type=options.non_negative_int, default=120,
                      metavar="N", help="simulated legacy users (default 120)")
    demo.add_argument("--cloud-users", type=options.non_negative_int, default=20, metavar="N",
                      help="simulated cloud-native users (default 20)")
    demo.add_argument("--rate", type=options.number, default=20.0, metavar="MSGS_PER_S",
                      help="legacy messages per second; cloud devices post at half of it "
                           "(default 20)")
    demo.add_argument("--faults", choices=("none", "light", "heavy"), default="light",
                      help="none; light: supernode crashes, 5%% push loss, one bridge "
                           "SIGKILL; heavy: more crashes, a partition, a correlated crash "
                           "with a re-login storm, 20%% push loss, three bridge SIGKILLs "
                           "(default light)")
    demo.add_argument("--seed", type=options.non_negative_int, default=1, metavar="N",
                      help="seed of every random choice (default 1)")
    demo.add_argument("--workers", type=options.non_negative_int, default=2, metavar="N",
                      help="bridge workers sharing the feeds (default 2)")
    demo.add_argument("--client-versions", default=None, metavar="SPREAD",
                      help="client versions the legacy devices report at login, weighted "
                           "(default 7.1:0.1,7.4:0.3,8.0:0.6)")
    demo.add_argument("--reconcile-every", type=options.number, metavar="S",
                      help="seconds between reconcile runs (default: a quarter of the "
                           "duration, 10-60 s)")
    options.add_dsn_option(demo)
    demo.add_argument("--database", default="bridge_demo", metavar="NAME",
                      help="the demo's own database on that server, dropped and created "
                           "afresh (must start with bridge_demo; default bridge_demo)")
    demo.add_argument("--json", action="store_true",
                      help="print the summary as one JSON object on stdout")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from drills.config import DemoConfig
    from drills.databases import fresh_database
    from drills.demo import Demo, render_summary
    from drills.processes import DemoError

    try:
        config = DemoConfig(
            duration=args.duration, supernodes=args.supernodes,
            legacy_users=args.legacy_users, cloud_users=args.cloud_users, rate=args.rate,
            faults=args.faults, seed=args.seed, workers=args.workers,
            reconcile_every=args.reconcile_every,
            **({} if args.client_versions is None
               else {"client_versions": args.client_versions}))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.reconcile_every is not None and not 5 <= args.reconcile_every <= 3600:
        raise UsageError("--reconcile-every must be between 5 and 3600 seconds")
    if not re.fullmatch(r"bridge_demo[a-z0-9_]{0,50}", args.database):
        raise UsageError("--database must start with bridge_demo and hold only a-z, 0-9 "
                         "and _ (it is dropped and created afresh)")
    server_dsn, origin = resolve_dsn(args)
    try:
        dsn = fresh_database(server_dsn, args.database)
    except DemoError as e:
        raise RuntimeFailure(f"{e} ({origin}: {redact_dsn(server_dsn)})") from None
    home = state.state_home()
    state.secret(home, "peer")  # created once here, not raced by the processes
    workdir = home / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"demo: database {args.database} on {origin}; logs in {workdir}",
          file=sys.stderr, flush=True)

    async def run_demo(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        demo = Demo(reactor, config, dsn=dsn, home=home, workdir=workdir, out=sys.stdout,
                    dsn_display=redact_dsn(dsn))
        stop_signal.addCallback(lambda _: demo.request_abort())
        interrupts = [0]

        def on_interrupt(_signum: int, _frame: Any) -> None:
            interrupts[0] += 1
            if interrupts[0] == 1:
                print("\ndemo: stopping the traffic; healing, reconciling and checking "
                      "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
                reactor.callFromThread(demo.request_stop)
            else:
                reactor.callFromThread(demo.request_abort)

        def install() -> None:  # after Twisted's own handlers, which it replaces
            signal.signal(signal.SIGINT, on_interrupt)
            runtime.on_signal(reactor, signal.SIGTERM, demo.request_abort)
        reactor.callLater(0, install)
        try:
            return await demo.run()
        except DemoError as e:
            raise RuntimeFailure(str(e)) from None

    runtime.log_to_stream((workdir / "demo.log").open("a", encoding="utf-8"), stdlib_too=True)
    summary = runtime.run_until_stopped(run_demo)
    print(json.dumps(summary, sort_keys=True) if args.json else render_summary(summary),
          flush=True)
    if summary.get("aborted"):
        return EXIT_FAILURE
    return EXIT_OK if summary["converged"] else EXIT_GATED
