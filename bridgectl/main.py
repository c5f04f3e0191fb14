"""``bridgectl``: the composition root, and the only module that touches the global reactor.

Exit codes: 0 success, 1 runtime failure (e.g. a port in use), 2 bad arguments,
3 (migrate) some accounts held back by the migration gates; (demo) did not converge.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from bridge import state

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATED = 3


class UsageError(Exception):
    """A user mistake in the arguments; reported as one line, exit code 2."""


class RuntimeFailure(Exception):
    """The command could not do its work (database unreachable, ...); one line, exit 1."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return v


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bridgectl",
        description="Dual-stack migration bridge: legacy supernode network <-> cloud service.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    legacy = sub.add_parser("legacy", help="the simulated legacy supernode network",
                            description="Run or simulate the legacy supernode network.")
    lsub = legacy.add_subparsers(dest="legacy_command", metavar="SUBCOMMAND")
    lsub.required = True

    def workload(sp: argparse.ArgumentParser, *, duration_required: bool) -> None:
        sp.add_argument("--supernodes", type=_positive_int, default=8, metavar="N",
                        help="number of supernodes (default 8)")
        sp.add_argument("--users", type=_positive_int, default=200, metavar="N",
                        help="simulated users (default 200)")
        sp.add_argument("--rate", type=_number, default=20.0, metavar="MSGS_PER_S",
                        help="messages per second over the whole network (default 20)")
        sp.add_argument("--faults", choices=("none", "light", "heavy"), default="none",
                        help="fault preset (default none)")
        sp.add_argument("--seed", type=_positive_int, default=1, metavar="N",
                        help="seed for every random choice (default 1)")
        sp.add_argument("--duration", type=_number, required=duration_required, metavar="S",
                        help="seconds to run; the last 30%% (at most 30 s) heal and drain")
        sp.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    run = lsub.add_parser("run", help="run the network over loopback TCP",
                          description="Run supernodes and a login server on 127.0.0.1 with "
                                      "simulated clients. Supernode i listens on BASE+i. "
                                      "Without --duration it runs until Ctrl-C; SIGUSR1 "
                                      "heals early (traffic and faults stop) and keeps "
                                      "serving.")
    workload(run, duration_required=False)
    run.add_argument("--port", type=_positive_int, default=47100, metavar="BASE",
                     help="port of the first supernode (default 47100)")
    run.add_argument("--login-port", type=_positive_int, default=0, metavar="P",
                     help="login server port (default BASE + number of supernodes)")
    run.add_argument("--peer-secret-file", type=Path, metavar="FILE",
                     help="shared secret for privileged peers (default: from $BRIDGE_HOME)")
    run.add_argument("--fault-window", type=_number, metavar="S",
                     help="spread the preset's scheduled faults over the first S seconds "
                          "(default: until the heal, or 600 s without --duration)")
    run.add_argument("--control-dir", type=Path, metavar="DIR",
                     help="run fault commands dropped into DIR as *.json files (the chaos "
                          "suite: crash a fraction of supernodes, cut the bridge off some)")
    run.add_argument("--record", type=Path, metavar="FILE",
                     help="at the end, write the clients' record (acknowledged messages, "
                          "supernode crashes) to FILE as JSON, for an outside check")
    run.add_argument("--metrics-port", type=_positive_int, metavar="P",
                     help="serve the network's /metrics, /healthz and /readyz on "
                          "127.0.0.1:P (0: any free port; default: not served)")

    sim = lsub.add_parser("simulate", help="run the network in memory, deterministically",
                          description="Run the same workload on the deterministic in-memory "
                                      "network: one seed, one trace hash.")
    workload(sim, duration_required=True)

    db = sub.add_parser("db", help="the cloud store's database",
                        description="Manage the cloud store's PostgreSQL database. Without "
                                    "--dsn or $BRIDGE_DSN, commands use the embedded server "
                                    "under $BRIDGE_HOME (default ./.bridge), starting it "
                                    "when needed.")
    dsub = db.add_subparsers(dest="db_command", metavar="SUBCOMMAND")
    dsub.required = True
    for name, text in (("upgrade", "apply pending schema migrations (safe to run twice)"),
                       ("status", "show applied and pending schema versions"),
                       ("dsn", "print the DSN in use, so other tools can connect"),
                       ("stop", "stop the embedded server (if it runs)")):
        sp = dsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name != "stop":
            _dsn_option(sp)
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print one JSON object")

    cloud = sub.add_parser("cloud", help="the cloud service",
                           description="Run the cloud API and its notification dispatcher, "
                                       "or simulated cloud clients against it.")
    csub = cloud.add_subparsers(dest="cloud_command", metavar="SUBCOMMAND")
    csub.required = True
    crun = csub.add_parser("run", help="serve the cloud API and dispatch notifications",
                           description="Serve the cloud API (JSON over HTTP, /metrics beside "
                                       "it) on 127.0.0.1 and run the notification dispatcher "
                                       "with a simulated push gateway. Runs until Ctrl-C "
                                       "unless --duration is given.")
    _dsn_option(crun)
    crun.add_argument("--port", type=_positive_int, default=48080, metavar="P",
                      help="port to listen on (default 48080; 0 picks a free one)")
    crun.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                      help="address to listen on (default 127.0.0.1)")
    crun.add_argument("--push-loss", type=_fraction, default=0.0, metavar="F",
                      help="fraction of pushes the gateway accepts but never delivers")
    crun.add_argument("--push-errors", type=_fraction, default=0.0, metavar="F",
                      help="fraction of pushes the gateway refuses (retried with backoff)")
    crun.add_argument("--push-latency", type=_number, default=0.05, metavar="S",
                      help="seconds from push to delivery (default 0.05)")
    crun.add_argument("--resend-after", type=_number, default=10.0, metavar="S",
                      help="re-push a notification not acknowledged after S seconds "
                           "(default 10)")
    crun.add_argument("--max-attempts", type=_positive_int, default=5, metavar="N",
                      help="pushes before a notification is marked failed (default 5)")
    crun.add_argument("--seed", type=_positive_int, default=1, metavar="N",
                      help="seed of the simulated gateway's choices (default 1)")
    crun.add_argument("--duration", type=_number, metavar="S",
                      help="stop after S seconds (default: run until Ctrl-C)")

    clients = csub.add_parser("clients", help="simulated cloud devices against a running API",
                              description="Create (idempotently) simulated cloud accounts "
                                          "and conversations in the store, then run one "
                                          "device per account against the API: log in, "
                                          "post at --rate, long-poll, sync, acknowledge, "
                                          "keep presence. Prints what the API acknowledged.")
    _dsn_option(clients)
    clients.add_argument("--api", default="http://127.0.0.1:48080", metavar="URL",
                         help="base URL of the cloud API (default http://127.0.0.1:48080)")
    clients.add_argument("--users", type=_positive_int, default=20, metavar="N",
                         help="simulated cloud users, one device each (default 20)")
    clients.add_argument("--conversations", type=_positive_int, default=10, metavar="N",
                         help="conversations among them (default 10)")
    clients.add_argument("--rate", type=_number, default=5.0, metavar="MSGS_PER_S",
                         help="messages per second over all devices (default 5)")
    clients.add_argument("--seed", type=_positive_int, default=1, metavar="N")
    clients.add_argument("--duration", type=_number, required=True, metavar="S",
                         help="seconds of traffic")
    clients.add_argument("--settle", type=_number, default=5.0, metavar="S",
                         help="seconds after the traffic to collect notifications (default 5)")
    clients.add_argument("--json", action="store_true", help="print one JSON object")
    _add_bridge_commands(sub)
    _add_operator_commands(sub)
    _add_reconcile_command(sub)
    _add_demo_command(sub)
    _add_chaos_command(sub)
    return p


def _add_chaos_command(sub: Any) -> None:
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
    chaos.add_argument("--seeds", type=_positive_int, default=3, metavar="N",
                       help="seeds per scenario (default 3)")
    chaos.add_argument("--first-seed", type=_positive_int, default=1, metavar="N",
                       help="the first seed (default 1)")
    chaos.add_argument("--duration", type=_number, default=45.0, metavar="S",
                       help="seconds of traffic per run (default 45)")
    chaos.add_argument("--supernodes", type=_positive_int, default=6, metavar="N",
                       help="legacy supernodes (default 6)")
    chaos.add_argument("--legacy-users", type=_positive_int, default=60, metavar="N",
                       help="simulated legacy users (default 60)")
    chaos.add_argument("--rate", type=_number, default=15.0, metavar="MSGS_PER_S",
                       help="legacy messages per second (default 15)")
    _dsn_option(chaos)
    chaos.add_argument("--json", action="store_true",
                       help="print the results as one JSON object on stdout")


def _add_demo_command(sub: Any) -> None:
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
    demo.add_argument("--duration", type=_number, default=60.0, metavar="S",
                      help="seconds of traffic (default 60; 0: until Ctrl-C)")
    demo.add_argument("--supernodes", type=_positive_int, default=6, metavar="N",
                      help="legacy supernodes (default 6)")
    demo.add_argument("--legacy-users", type=_positive_int, default=120, metavar="N",
                      help="simulated legacy users (default 120)")
    demo.add_argument("--cloud-users", type=_positive_int, default=20, metavar="N",
                      help="simulated cloud-native users (default 20)")
    demo.add_argument("--rate", type=_number, default=20.0, metavar="MSGS_PER_S",
                      help="legacy messages per second; cloud devices post at half of it "
                           "(default 20)")
    demo.add_argument("--faults", choices=("none", "light", "heavy"), default="light",
                      help="none; light: supernode crashes, 5%% push loss, one bridge "
                           "SIGKILL; heavy: more crashes, a partition, a correlated crash "
                           "with a re-login storm, 20%% push loss, three bridge SIGKILLs "
                           "(default light)")
    demo.add_argument("--seed", type=_positive_int, default=1, metavar="N",
                      help="seed of every random choice (default 1)")
    demo.add_argument("--workers", type=_positive_int, default=2, metavar="N",
                      help="bridge workers sharing the feeds (default 2)")
    demo.add_argument("--reconcile-every", type=_number, metavar="S",
                      help="seconds between reconcile runs (default: a quarter of the "
                           "duration, 10-60 s)")
    _dsn_option(demo)
    demo.add_argument("--database", default="bridge_demo", metavar="NAME",
                      help="the demo's own database on that server, dropped and created "
                           "afresh (must start with bridge_demo; default bridge_demo)")
    demo.add_argument("--json", action="store_true",
                      help="print the summary as one JSON object on stdout")


def _add_reconcile_command(sub: Any) -> None:
    rec = sub.add_parser(
        "reconcile", help="find and repair divergence between the stacks (a cron job)",
        description="One reconcile run per invocation. Exit codes: 0 in sync (or all "
                    "repaired), 1 error (also: compared nothing), 2 bad arguments, "
                    "3 differences remain (dry run or failed repairs), 4 another run of "
                    "the same kind holds the lock.")
    rec.add_argument("kind", choices=("gaps", "notifications", "presence", "all"),
                     help="what to reconcile")
    _dsn_option(rec)
    rec.add_argument("--legacy", metavar="HOST:PORT", type=_host_port,
                     help="the legacy login server (needed by gaps, presence and all)")
    rec.add_argument("--since", type=_duration, metavar="DURATION",
                     help="how far back to look, e.g. 90m, 12h, 30d (default: 30d for gaps, "
                          "24h for notifications)")
    rec.add_argument("--margin", type=_number, default=10.0, metavar="S",
                     help="gaps: compare only what is older than now minus the bridge's "
                          "measured lag minus S seconds (default 10)")
    rec.add_argument("--lag-ms", type=_positive_int, metavar="MS",
                     help="gaps: assume this bridge lag instead of the one live workers "
                          "report (e.g. 0 once traffic is stopped and the bridge drained, "
                          "to compare everything up to now minus --margin)")
    rec.add_argument("--dry-run", action="store_true", help="find and report, repair nothing")
    rec.add_argument("--max-seconds", type=_number, metavar="S",
                     help="stop after S seconds; the next run resumes where this one stopped")
    rec.add_argument("--json", action="store_true", help="print one JSON report object")
    rec.add_argument("--textfile", type=Path, metavar="PATH",
                     help="write metrics for node_exporter's textfile collector to PATH")
    rec.add_argument("--pushgateway", metavar="URL", help="push metrics to a Pushgateway")
    rec.add_argument("--peer-secret-file", type=Path, metavar="FILE",
                     help="shared secret for privileged peers (default: from $BRIDGE_HOME)")


def _duration(text: str) -> int:
    """'90s', '15m', '12h', '30d' (or plain seconds) -> milliseconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90m, 12h or 30d"
                                         ) from None
    if not 0 < value < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(value * units[unit] * 1000)


def _add_bridge_commands(sub: Any) -> None:
    bridge = sub.add_parser("bridge", help="the bridge between the stacks",
                            description="Mirror messages and presence between the legacy "
                                        "network and the cloud store.")
    bsub = bridge.add_subparsers(dest="bridge_command", metavar="SUBCOMMAND")
    bsub.required = True
    run = bsub.add_parser("run", help="run one bridge worker",
                          description="Follow every supernode's feed into the cloud store "
                                      "and inject cloud messages into the legacy network. "
                                      "SIGTERM/Ctrl-C drains in-flight batches and exits 0. "
                                      "Serves /metrics, /healthz, /readyz and the "
                                      "operator's status page at /status.")
    _dsn_option(run)
    run.add_argument("--legacy", required=True, metavar="HOST:PORT", type=_host_port,
                     help="the legacy login server (bootstrap for discovering supernodes)")
    run.add_argument("--metrics-port", type=_positive_int, default=48090, metavar="P",
                     help="port of /metrics, /healthz, /readyz (default 48090; 0: any free)")
    run.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                     help="address of the metrics endpoint (default 127.0.0.1)")
    run.add_argument("--status-interval", type=_number, default=5.0, metavar="S",
                     help="seconds between the status page's samples of the store "
                          "(default 5; the page keeps 15 minutes of them)")
    run.add_argument("--worker-id", metavar="ID",
                     help="this worker's name in checkpoints and status (default host-pid)")
    run.add_argument("--peer-secret-file", type=Path, metavar="FILE",
                     help="shared secret for privileged peers (default: from $BRIDGE_HOME)")
    run.add_argument("--duration", type=_number, metavar="S",
                     help="stop after S seconds (default: run until Ctrl-C / SIGTERM)")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _fraction(text: str) -> float:
    v = _number(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return v


def _dsn_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--dsn", metavar="DSN",
                    help="PostgreSQL connection string (default: $BRIDGE_DSN, else the "
                         "embedded server under $BRIDGE_HOME)")


def _resolve_dsn(args: argparse.Namespace) -> tuple[str, str]:
    """The DSN to use and where it came from: --dsn, $BRIDGE_DSN, or the embedded server."""
    import os

    from psycopg import conninfo

    for dsn, origin in ((getattr(args, "dsn", None), "--dsn"),
                        (os.environ.get("BRIDGE_DSN"), "$BRIDGE_DSN")):
        if dsn:
            try:
                conninfo.conninfo_to_dict(dsn)
            except Exception as e:  # psycopg.ProgrammingError: not a DSN at all
                raise UsageError(f"{origin} is not a valid PostgreSQL connection string: "
                                 f"{str(e).strip()}") from None
            return dsn, origin
    from cloud import embedded

    home = state.state_home()
    try:
        return embedded.ensure_running(home), f"embedded server in {embedded.data_dir(home)}"
    except embedded.EmbeddedServerError as e:
        raise RuntimeFailure(str(e)) from None


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and status output."""
    from psycopg import conninfo

    params = conninfo.conninfo_to_dict(dsn)
    if "password" in params:
        params["password"] = "***"
    return conninfo.make_conninfo(**params)


def _connect(dsn: str, origin: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        first = (str(e).strip().splitlines() or ["connection failed"])[0]
        raise RuntimeFailure(f"cannot connect to the database ({origin}: "
                             f"{redact_dsn(dsn)}): {first}") from None


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from cloud import schema

    dsn, origin = _resolve_dsn(args)
    with _connect(dsn, origin) as conn:
        try:
            done = schema.upgrade(conn)
            current = schema.status(conn).current
        except schema.MigrationError as e:
            raise RuntimeFailure(str(e)) from None
    if done:
        print(f"applied {', '.join(f'{v:04d}' for v in done)}; schema at {current:04d}")
    else:
        print(f"schema at {current:04d}; nothing to apply")
    return EXIT_OK


def cmd_db_status(args: argparse.Namespace) -> int:
    from cloud import schema

    dsn, origin = _resolve_dsn(args)
    with _connect(dsn, origin) as conn:
        try:
            st = schema.status(conn)
        except schema.MigrationError as e:
            raise RuntimeFailure(str(e)) from None
    if args.json:
        print(json.dumps({
            "database": origin, "dsn": redact_dsn(dsn), "current": st.current,
            "applied": [{"version": v, "name": n} for v, n in st.applied],
            "pending": [{"version": v, "name": n} for v, n in st.pending]}, sort_keys=True))
        return EXIT_OK
    print(f"database: {origin}")
    print(f"schema:   {st.current:04d}" + (" (empty)" if not st.applied else ""))
    for v, n in st.applied:
        print(f"  applied  {v:04d}_{n}")
    for v, n in st.pending:
        print(f"  pending  {v:04d}_{n}")
    if st.pending:
        print("run `bridgectl db upgrade` to apply the pending versions")
    return EXIT_OK


def cmd_db_dsn(args: argparse.Namespace) -> int:
    dsn, _origin = _resolve_dsn(args)
    print(dsn)
    return EXIT_OK


def cmd_db_stop(args: argparse.Namespace) -> int:
    from cloud import embedded

    home = state.state_home()
    if embedded.stop(home):
        print(f"stopped the embedded server in {embedded.data_dir(home)}")
    else:
        print(f"no embedded server runs in {embedded.data_dir(home)}")
    return EXIT_OK


def _run_config(args: argparse.Namespace, **extra: Any) -> Any:
    from legacy.sim import RunConfig
    try:
        return RunConfig(supernodes=args.supernodes, users=args.users, rate=args.rate,
                         faults=args.faults, seed=args.seed, duration=args.duration, **extra)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")


def cmd_legacy_simulate(args: argparse.Namespace) -> int:
    from legacy.sim import simulate
    config = _run_config(args)
    _print_summary(simulate(config), args.json)
    return EXIT_OK


def cmd_legacy_run(args: argparse.Namespace) -> int:
    config = _run_config(args, base_port=args.port, login_port=args.login_port,
                         fault_window=args.fault_window)
    if args.metrics_port is not None and args.metrics_port > 65535:
        raise UsageError("--metrics-port must be at most 65535")
    home = state.state_home()
    if args.peer_secret_file is not None:
        peer_secret = state.read_secret_file(args.peer_secret_file)
    else:
        peer_secret = state.secret(home, "peer")
    login_secret = state.secret(home, "login")

    from twisted.internet import defer, error, reactor, task

    from bridge.ops.health import operations_site
    from legacy.sim import run_tcp

    _log_to_stderr()

    result: dict[str, Any] = {}
    stop_signal: defer.Deferred = defer.Deferred()
    heal_signal: defer.Deferred = defer.Deferred()
    _on_sigusr1(reactor, lambda: heal_signal.called or heal_signal.callback(None))

    def write_record(dep: Any) -> None:
        if args.record is not None:
            _write_json_atomically(args.record, dep.record())

    def listening(dep: Any) -> None:
        last = config.base_port + config.supernodes - 1
        print(f"legacy network up: login server 127.0.0.1:{dep.login.port}, "
              f"{config.supernodes} supernodes on 127.0.0.1:{config.base_port}-{last}",
              file=sys.stderr, flush=True)

        def progress() -> None:
            s = dep.stats
            print(f"  t={reactor.seconds() - dep.started_at:6.0f}s sent={len(s.sent)} "
                  f"acked={len(s.acked)} delivered={len(s.delivered)}",
                  file=sys.stderr, flush=True)
        loop = task.LoopingCall(progress)
        loop.start(10.0, now=False)
        if args.control_dir is not None:
            control = task.LoopingCall(_run_control_commands, args.control_dir, dep)
            control.start(0.25, now=False)

    async def main(_reactor: Any) -> None:
        _stop_with_parent(reactor)
        if args.metrics_port is not None:
            # the legacy_* counters and gauges of every supernode and the login server here
            try:
                metrics = reactor.listenTCP(args.metrics_port,
                                            operations_site(lambda: [], reactor),
                                            interface="127.0.0.1")
            except error.CannotListenError as e:
                result["error"] = f"cannot listen on 127.0.0.1:{e.port}: {e.socketError}"
                return
            print(f"legacy network metrics on "
                  f"http://127.0.0.1:{metrics.getHost().port}/metrics",
                  file=sys.stderr, flush=True)
        run = run_tcp(reactor, config, peer_secret=peer_secret, login_secret=login_secret,
                      on_listening=listening, stop_signal=stop_signal,
                      heal_signal=heal_signal, on_done=write_record)
        if config.duration is None:
            def on_shutdown() -> defer.Deferred:
                if not stop_signal.called:
                    stop_signal.callback(None)
                return run
            reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
        try:
            result["summary"] = await run
        except error.CannotListenError as e:
            result["error"] = f"cannot listen on {e.interface or '127.0.0.1'}:{e.port}: " \
                              f"{e.socketError}"
        except Exception as e:  # a failure of the run, not of the arguments
            result["error"] = f"{type(e).__name__}: {e}"

    try:
        task.react(lambda r: defer.Deferred.fromCoroutine(main(r)))
    except SystemExit:
        pass
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    if "summary" in result:
        _print_summary(result["summary"], args.json)
    return EXIT_OK


def _run_control_commands(directory: Path, dep: Any) -> None:
    """Run (then delete) each ``*.json`` command file in *directory*, oldest name first."""
    for path in sorted(directory.glob("*.json")):
        try:
            cmd = json.loads(path.read_text(encoding="utf-8"))
            done = dep.command(cmd)
        except (OSError, ValueError, TypeError, KeyError) as e:
            done = f"refused {path.name}: {e}"
        path.unlink(missing_ok=True)
        print(f"control: {done}", file=sys.stderr, flush=True)


def _stop_with_parent(reactor: Any) -> None:
    """With ``$BRIDGE_STOP_WITH_PARENT=<pid>`` (set by ``bridgectl demo`` for its children,
    which run in their own sessions), stop cleanly once that process is gone, so a demo
    killed with SIGKILL leaves nothing running."""
    import os

    from twisted.internet import task

    parent = os.environ.get("BRIDGE_STOP_WITH_PARENT", "")
    if not parent.isdigit():
        return

    def check() -> None:
        if os.getppid() != int(parent):
            import threading

            watch.stop()
            # stdout and stderr were pipes to the demo: nobody reads them now, and a write
            # would fail (EPIPE) halfway through the clean stop
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            backstop = threading.Timer(30.0, os._exit, (1,))  # if the clean stop hangs
            backstop.daemon = True
            backstop.start()
            reactor.stop()
    watch = task.LoopingCall(check)
    watch.clock = reactor
    watch.start(1.0, now=False)


def _on_sigusr1(reactor: Any, fn: Any) -> None:
    """Call *fn* in the reactor thread on SIGUSR1 (``legacy run``: heal now, keep serving)."""
    import signal

    signal.signal(signal.SIGUSR1, lambda _signum, _frame: reactor.callFromThread(fn))


def _write_json_atomically(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    tmp.replace(path)


def _require_current_schema(dsn: str, origin: str) -> None:
    from cloud import schema

    with _connect(dsn, origin) as conn:
        try:
            st = schema.status(conn)
        except schema.MigrationError as e:
            raise RuntimeFailure(str(e)) from None
    if st.pending:
        versions = ", ".join(f"{v:04d}" for v, _ in st.pending)
        raise RuntimeFailure(f"the database schema is not current (pending {versions}); "
                             "run `bridgectl db upgrade` first")


def _run_until_stopped(main: Any, duration: float | None) -> dict[str, Any]:
    """Run ``main(reactor, stop_signal)`` under task.react; Ctrl-C/SIGTERM or *duration*
    fire *stop_signal*. Returns main's result dict (``error`` key on failure)."""
    from twisted.internet import defer, error, reactor, task

    result: dict[str, Any] = {}
    stop_signal: defer.Deferred = defer.Deferred()

    def stop() -> None:
        if not stop_signal.called:
            stop_signal.callback(None)

    async def run(_reactor: Any) -> None:
        _stop_with_parent(reactor)
        finished = defer.Deferred.fromCoroutine(main(reactor, stop_signal))
        reactor.addSystemEventTrigger("before", "shutdown",
                                      lambda: (stop(), finished)[1])
        if duration is not None:
            reactor.callLater(duration, stop)
        try:
            result.update(await finished)
        except error.CannotListenError as e:
            result["error"] = f"cannot listen on {e.interface or '127.0.0.1'}:{e.port}: " \
                              f"{e.socketError}"
        except (RuntimeFailure, UsageError) as e:
            result["error"] = str(e)
        except Exception as e:  # a failure of the run, not of the arguments
            result["error"] = f"{type(e).__name__}: {e}"

    try:
        task.react(lambda r: defer.Deferred.fromCoroutine(run(r)))
    except SystemExit:
        pass
    return result


def cmd_cloud_run(args: argparse.Namespace) -> int:
    import random

    from cloud.api import CloudAPI
    from cloud.db import Database
    from cloud.dispatcher import DispatcherConfig, NotificationDispatcher
    from cloud.gateway import SimulatedPushGateway
    from cloud.passwords import verify_password
    from cloud.push import NotificationChannel

    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.push_latency < 0 or args.resend_after <= 0 or args.max_attempts < 1:
        raise UsageError("--push-latency must be >= 0, --resend-after > 0, "
                         "--max-attempts >= 1")
    if args.port > 65535:
        raise UsageError("--port must be at most 65535")
    dsn, origin = _resolve_dsn(args)
    _require_current_schema(dsn, origin)
    secret = state.secret(state.state_home(), "cloud")

    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        from twisted.internet import threads

        db = Database(reactor, dsn)
        channel = NotificationChannel(reactor)
        rng = random.Random(args.seed)
        gateway = SimulatedPushGateway(reactor, random.Random(rng.random()), channel,
                                       loss=args.push_loss, error_rate=args.push_errors,
                                       latency_s=args.push_latency)
        dispatcher = NotificationDispatcher(
            reactor, db, gateway, random.Random(rng.random()),
            DispatcherConfig(resend_after_s=args.resend_after, max_attempts=args.max_attempts))

        def check_password(password: str, encoded: str) -> Any:
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                             verify_password, password, encoded)

        api = CloudAPI(db, reactor, channel, secret, password_check=check_password)
        db.startService()
        dispatcher.startService()
        try:
            port = reactor.listenTCP(args.port, api.site(), interface=args.bind)
        except Exception:
            await dispatcher.stopService()
            await db.stopService()
            raise
        where = port.getHost()
        print(f"cloud API on http://{where.host}:{where.port}/v1 (metrics at /metrics); "
              f"database: {origin}", file=sys.stderr, flush=True)
        await stop_signal
        await port.stopListening()
        await dispatcher.stopService()
        await db.stopService()
        return {}

    _log_to_stderr()
    result = _run_until_stopped(main, args.duration)
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_cloud_clients(args: argparse.Namespace) -> int:
    from cloud.workload import AgentHTTP, CloudWorkload, WorkloadConfig, provision

    if args.duration <= 0 or args.settle < 0:
        raise UsageError("--duration must be positive and --settle not negative")
    if args.users < 2 or args.users > 100_000:
        raise UsageError("--users must be between 2 and 100000")
    if not args.api.startswith(("http://", "https://")):
        raise UsageError("--api must be an http:// URL")
    try:
        config = WorkloadConfig(rate=args.rate)
    except ValueError as e:
        raise UsageError(str(e)) from None
    dsn, origin = _resolve_dsn(args)
    _require_current_schema(dsn, origin)
    with _connect(dsn, origin) as conn:
        population = provision(conn, users=args.users, conversations=args.conversations,
                               seed=args.seed)

    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        from twisted.internet import task

        http = AgentHTTP(reactor, args.api)
        workload = CloudWorkload(reactor, http, population, config, args.seed)
        workload.startService()
        await stop_signal
        workload.stop_posting()
        await task.deferLater(reactor, args.settle, lambda: None)  # let notifications arrive
        await workload.stopService()
        await http.close()
        return {"summary": workload.stats.summary()}

    _log_to_stderr()
    result = _run_until_stopped(main, args.duration)
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    _print_summary(result["summary"], args.json)
    return EXIT_OK


def cmd_bridge_run(args: argparse.Namespace) -> int:
    import gc
    import os
    import random
    import socket

    from bridge.ops.health import operations_site
    from bridge.ops.statuspage import StatusPage, StatusSampler
    from bridge.outbox import OutboxListener
    from bridge.worker import BridgeWorker, WorkerConfig
    from cloud.db import Database
    from legacy.network import TCPNetwork

    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.metrics_port > 65535:
        raise UsageError("--metrics-port must be at most 65535")
    if not 0.1 <= args.status_interval <= 3600:
        raise UsageError("--status-interval must be between 0.1 and 3600 seconds")
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    if not 0 < len(worker_id) <= 100 or any(ord(c) < 32 for c in worker_id):
        raise UsageError("--worker-id must be 1-100 printable characters")
    home = state.state_home()
    if args.peer_secret_file is not None:
        secret = state.read_secret_file(args.peer_secret_file)
    else:
        secret = state.secret(home, "peer")
    dsn, origin = _resolve_dsn(args)
    _require_current_schema(dsn, origin)
    host, port = args.legacy

    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        db = Database(reactor, dsn)
        config = WorkerConfig(worker_id=worker_id, bootstrap_host=host, bootstrap_port=port)
        worker = BridgeWorker(reactor, TCPNetwork(reactor), db, secret,
                              random.Random(), config,
                              injector_factory=_injector_factory(reactor, db))
        # NOTIFY wakes the injector as soon as a cloud message commits; polling is the fallback
        listener = OutboxListener(reactor, dsn, worker.injector.wake)

        def readiness() -> list[str]:
            reasons = []
            if not worker.db_ok:
                reasons.append("the cloud store did not answer the last heartbeat")
            if not worker.followers:
                reasons.append("no supernodes discovered yet")
            elif not any(f.connected for f in worker.followers.values()):
                reasons.append("no supernode feed is streaming")
            return reasons

        # the operator's status page samples the store on the worker's own Database
        sampler = StatusSampler(reactor, db, interval_s=args.status_interval)
        page = StatusPage(sampler)
        db.startService()
        try:
            listening = reactor.listenTCP(args.metrics_port,
                                          operations_site(readiness, reactor, page),
                                          interface=args.bind)
        except Exception:
            await db.stopService()
            raise
        sampler.startService()
        worker.startService()
        listener.startService()
        # Everything allocated so far (modules, services) lives as long as the process: out
        # of the collector's reach, a full collection no longer walks it. Those walks paused
        # the worker 15-50 ms every few seconds, and the pauses were the p99 of the lag.
        # (Collected first: garbage frozen now would never be freed.)
        gc.collect()
        gc.freeze()
        where = listening.getHost()
        print(f"bridge worker {worker_id}: legacy via {host}:{port}, database: {origin}; "
              f"metrics on http://{where.host}:{where.port}/metrics; "
              f"status page on http://{where.host}:{where.port}/status",
              file=sys.stderr, flush=True)
        await stop_signal
        print("bridge: draining in-flight batches", file=sys.stderr, flush=True)
        await listener.stopService()
        await worker.stopService()
        await listening.stopListening()
        await sampler.stopService()
        await db.stopService()
        return {"summary": {
            "worker_id": worker_id,
            "mirrored_to_cloud": sum(f.mirrored for f in worker.followers.values()),
            "mirrored_to_legacy": getattr(worker.injector, "injected", 0),
            "feeds": len(worker.followers)}}

    _log_to_stderr()
    result = _run_until_stopped(main, args.duration)
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    _print_summary(result["summary"], False)
    return EXIT_OK


def _injector_factory(reactor: Any, db: Any) -> Any:
    """The cloud -> legacy side of a worker: the outbox injector (its peers: the worker)."""
    import random

    from bridge.outbox import InjectorConfig, OutboxInjector

    return lambda worker: OutboxInjector(reactor, db, worker, random.Random(),
                                         InjectorConfig())


def _log_to_stderr() -> None:
    """Log to stderr: ours at info (e.g. why a connection was closed), Twisted's at warn."""
    _log_to_stream(sys.stderr)


def _log_to_stream(stream: Any, *, stdlib_too: bool = False) -> None:
    """Log to *stream*: ours at info, Twisted's at warn (and, with *stdlib_too*, the
    standard library's warnings, e.g. psycopg_pool's reconnect messages)."""
    if stdlib_too:
        import logging

        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s#%(levelname)s] "
                                               "%(message)s"))
        logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    for ns in ("legacy", "cloud", "bridge", "reconcilers"):
        levels.setLogLevelForNamespace(ns, LogLevel.info)
    observer = FilteringLogObserver(textFileLogObserver(stream), [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _add_operator_commands(sub: Any) -> None:
    """migrate, status and accounts import: the operator's commands for the migration."""
    from cloud.model import PHASES

    mig = sub.add_parser(
        "migrate", help="move accounts between migration phases",
        description="Move the selected accounts to --to PHASE (legacy, dual, cloud, "
                    "cloud-only). Forward moves are gated (no open findings, mirror lag, a "
                    "recent clean reconcile); backward moves are not, but leaving cloud-only "
                    "needs --force. Every move is written to the audit log. Exit codes: 0 all "
                    "moved (or nothing to do), 3 some held back by gates, 1 failure, 2 usage.")
    _dsn_option(mig)
    mig.add_argument("--to", required=True, metavar="PHASE",
                     help=f"target phase: {', '.join(PHASES)}")
    mig.add_argument("--accounts", metavar="A,B,...",
                     help="comma-separated handles or account ids")
    mig.add_argument("--percent", metavar="N",
                     help="the stable N%% cohort of linked accounts (0-100); raising N only "
                          "adds accounts; a cohort is only promoted, never moved back")
    mig.add_argument("--file", type=Path, metavar="F",
                     help="handles or account ids, one per line (# starts a comment)")
    mig.add_argument("--dry-run", action="store_true",
                     help="show what would move and which gates fail; change nothing")
    mig.add_argument("--force", action="store_true",
                     help="move despite failed gates, and allow leaving cloud-only "
                          "(recorded in the audit log)")
    mig.add_argument("--legacy", metavar="HOST:PORT", type=_host_port,
                     help="the legacy login server; needed when an account enters or leaves "
                          "cloud-only")
    mig.add_argument("--actor", metavar="NAME",
                     help="who is moving the accounts, for the audit log (default: OS user)")
    mig.add_argument("--lag-bound-ms", type=_positive_int, default=5000, metavar="MS",
                     help="mirror lag gate: every live worker's lag under MS (default 5000)")
    mig.add_argument("--reconcile-window", type=_number, default=3600.0, metavar="S",
                     help="reconcile gate: a clean run finished within S seconds "
                          "(default 3600)")
    mig.add_argument("--json", action="store_true", help="print one JSON object")

    st = sub.add_parser("status", help="the migration at a glance",
                        description="Accounts per phase, mirror lag, outbox backlog, open "
                                    "findings, reconcile runs, bridge workers, leases and "
                                    "notifications, from the cloud store.")
    _dsn_option(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")

    acc = sub.add_parser("accounts", help="legacy accounts in the cloud store",
                         description="Manage the cloud accounts linked to legacy handles.")
    asub = acc.add_subparsers(dest="accounts_command", metavar="SUBCOMMAND")
    asub.required = True
    imp = asub.add_parser("import", help="link every legacy account (safe to run again)",
                          description="Page through the legacy login server's accounts and "
                                      "give each handle a linked cloud account in phase "
                                      "legacy, with its password hash; existing links get a "
                                      "changed hash, never a changed phase.")
    _dsn_option(imp)
    imp.add_argument("--legacy", required=True, metavar="HOST:PORT", type=_host_port,
                     help="the legacy login server")
    imp.add_argument("--json", action="store_true", help="print the counts as one JSON object")


def _migrate_selection(args: argparse.Namespace) -> Any:
    from bridge.phases import Selection

    given = [f for f, v in (("--accounts", args.accounts), ("--percent", args.percent),
                            ("--file", args.file)) if v is not None]
    if len(given) != 1:
        raise UsageError("choose the accounts with exactly one of --accounts, --percent, "
                         f"--file{' (got ' + ' and '.join(given) + ')' if given else ''}")
    if args.percent is not None:
        if not args.percent.isdigit() or int(args.percent) > 100:
            raise UsageError(f"--percent must be a whole number from 0 to 100, "
                             f"not {args.percent!r}")
        return Selection(percent=int(args.percent))
    if args.accounts is not None:
        refs = [r.strip() for r in args.accounts.split(",") if r.strip()]
        if not refs:
            raise UsageError("--accounts names no account")
        return Selection(refs=tuple(refs))
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --file {args.file}: {getattr(e, 'strerror', e)}") from None
    refs = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return Selection(refs=tuple(r for r in refs if r))


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name in this environment (KeyError, OSError)
        raise UsageError("cannot tell who you are for the audit log; pass --actor NAME") from None


def _connect_login_server(reactor: Any, address: tuple[str, int], secret: bytes) -> Any:
    """A privileged peer link to the legacy login server (a Deferred)."""
    from legacy.network import TCPNetwork
    from legacy.peer import PeerRefused, connect_peer

    host, port = address

    def failed(f: Any) -> None:
        why = (f"it refused bridgectl ({f.value.reason})" if f.check(PeerRefused)
               else str(f.value).strip() or type(f.value).__name__)
        raise RuntimeFailure(f"cannot connect to the legacy login server at {host}:{port}: "
                             f"{why}")

    return connect_peer(TCPNetwork(reactor), host, port, name="bridgectl",
                        secret=secret).addErrback(failed)


def cmd_migrate(args: argparse.Namespace) -> int:
    import time

    from twisted.internet import defer

    from bridge import phases
    from cloud.db import InlineDatabase, run_transaction
    from cloud.model import PHASES

    if args.to not in PHASES:
        raise UsageError(f"unknown phase {args.to!r}: use one of {', '.join(PHASES)}")
    selection = _migrate_selection(args)
    if args.lag_bound_ms <= 0 or args.reconcile_window <= 0:
        raise UsageError("--lag-bound-ms and --reconcile-window must be positive")
    config = phases.GateConfig(lag_bound_ms=args.lag_bound_ms,
                               reconcile_window_ms=int(args.reconcile_window * 1000))
    actor = args.actor if args.actor is not None else _os_user()
    if not 0 < len(actor) <= 200 or any(ord(c) < 32 for c in actor):
        raise UsageError("--actor must be 1-200 printable characters")
    dsn, origin = _resolve_dsn(args)
    _require_current_schema(dsn, origin)
    with _connect(dsn, origin) as conn:
        try:
            plan = run_transaction(conn, "load_plan", phases.load_plan, selection, args.to, config,
                                   int(time.time() * 1000), force=args.force)
        except phases.UnknownAccounts as e:
            raise UsageError(str(e)) from None
        gated = EXIT_GATED if plan.held else EXIT_OK
        if args.dry_run or not plan.to_move:
            report = phases.plan_to_json(plan, dry_run=args.dry_run)
            print(json.dumps(report, sort_keys=True) if args.json
                  else phases.render_plan(report))
            return gated
        if plan.needs_login_server and args.legacy is None:
            raise UsageError("some accounts enter or leave cloud-only, which the legacy login "
                             "server must know: pass --legacy HOST:PORT")
        # One short transaction per account on this command's own connection: running them
        # inline (no thread pool) is right for a one-shot command, and without a login
        # server to talk to it needs no reactor at all.
        db = InlineDatabase(conn)
        if plan.needs_login_server:
            outcome = _migrate_with_login_server(plan, db, actor, args.legacy)
        else:
            done: list[Any] = []
            defer.Deferred.fromCoroutine(phases.apply_plan(
                plan, db, None, actor=actor, now_ms=int(time.time() * 1000))).addBoth(
                    done.append)
            outcome = done[0]
            if not isinstance(outcome, phases.MigrationOutcome):
                outcome.raiseException()
    report = phases.plan_to_json(plan, outcome)
    print(json.dumps(report, sort_keys=True) if args.json else phases.render_plan(report))
    if outcome.failed:
        print(f"bridgectl: error: {len(outcome.failed)} account"
              f"{'s' * (len(outcome.failed) != 1)} could not be moved", file=sys.stderr)
        return EXIT_FAILURE
    return gated


def _migrate_with_login_server(plan: Any, db: Any, actor: str,
                               address: tuple[str, int]) -> Any:
    from bridge import phases

    secret = state.secret(state.state_home(), "peer")

    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        peer = await _connect_login_server(reactor, address, secret)
        try:
            outcome = await phases.apply_plan(
                plan, db, peer, actor=actor, now_ms=int(reactor.seconds() * 1000),
                clock=reactor, should_stop=lambda: stop_signal.called)
        finally:
            peer.disconnect()
        return {"outcome": outcome}

    _log_to_stderr()
    result = _run_until_stopped(main, None)
    if "error" in result:
        raise RuntimeFailure(result["error"])
    return result["outcome"]


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from bridge.ops import status
    from cloud.db import run_transaction

    dsn, origin = _resolve_dsn(args)
    _require_current_schema(dsn, origin)
    with _connect(dsn, origin) as conn:
        snapshot = run_transaction(conn, "status_gather", status.gather, int(time.time() * 1000))
    snapshot = {"database": origin, "dsn": redact_dsn(dsn), **snapshot}
    print(json.dumps(snapshot, sort_keys=True) if args.json else status.render(snapshot))
    return EXIT_OK


def cmd_accounts_import(args: argparse.Namespace) -> int:
    from bridge.accounts import import_accounts
    from cloud.db import Database

    dsn, origin = _resolve_dsn(args)
    _require_current_schema(dsn, origin)
    secret = state.secret(state.state_home(), "peer")

    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        db = Database(reactor, dsn, max_connections=2)
        db.startService()
        try:
            peer = await _connect_login_server(reactor, args.legacy, secret)
            pages = [0]

            def progress(counts: Any) -> None:
                pages[0] += 1
                if pages[0] % 10 == 0:
                    print(f"  {counts.seen} accounts seen, {counts.created} created",
                          file=sys.stderr, flush=True)
            try:
                counts = await import_accounts(peer, db, int(reactor.seconds() * 1000),
                                               progress=progress,
                                               should_stop=lambda: stop_signal.called)
            finally:
                peer.disconnect()
        finally:
            await db.stopService()
        return {"counts": counts, "interrupted": stop_signal.called}

    _log_to_stderr()
    result = _run_until_stopped(main, None)
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    counts = result["counts"].to_json()
    if args.json:
        print(json.dumps(counts, sort_keys=True))
    else:
        _print_summary({k: v for k, v in counts.items() if k != "conflict_handles"}, False)
        if counts["conflict_handles"]:
            print("conflicts (handle owned by a cloud-native account): "
                  + ", ".join(counts["conflict_handles"]))
    if result["interrupted"]:
        print("bridgectl: error: interrupted; run it again to finish", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    from reconcilers import runner
    from reconcilers.report import ProgressLine, render_text

    kinds = list(runner.KINDS) if args.kind == "all" else [args.kind]
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise UsageError("--max-seconds must be positive")
    if args.margin < 0:
        raise UsageError("--margin must not be negative")
    needs_legacy = {"gaps", "presence"} & set(kinds)
    if needs_legacy and args.legacy is None:
        raise UsageError("--legacy HOST:PORT is needed to reconcile "
                         + ", ".join(sorted(needs_legacy)))
    if args.pushgateway is not None and not args.pushgateway.startswith(("http://", "https://")):
        raise UsageError("--pushgateway must be an http:// URL")
    secret = None
    if needs_legacy:
        secret = (state.read_secret_file(args.peer_secret_file)
                  if args.peer_secret_file is not None
                  else state.secret(state.state_home(), "peer"))
    dsn, origin = _resolve_dsn(args)
    _require_current_schema(dsn, origin)
    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        # Ctrl-C / SIGTERM fire stop_signal: the reconciler stops at its next check, saves
        # its progress (the run ends 'interrupted'), and shutdown waits for that.
        from bridge.discovery import SupernodeLinks, discover
        from cloud.db import InlineDatabase
        from legacy.network import TCPNetwork

        links = None
        if needs_legacy:
            network = TCPNetwork(reactor)
            host, port = args.legacy
            try:
                directory = await discover(network, host, port, name="reconciler",
                                           secret=secret)
            except Exception as e:
                raise RuntimeFailure(f"cannot reach the legacy network via {host}:{port}: "
                                     f"{e}") from None
            links = SupernodeLinks(network, directory, name="reconciler", secret=secret)
        reports = []
        with _connect(dsn, origin) as conn, _connect(dsn, origin) as lock_conn:
            db = InlineDatabase(conn)
            progress = ProgressLine(sys.stderr)  # a bar on a terminal, a line per 10 s in cron
            for kind in kinds:
                reconciler = _reconciler(kind, args, links)
                report = await runner.run_one(
                    reconciler, clock=reactor, db=db, lock_conn=lock_conn,
                    dry_run=args.dry_run, max_seconds=args.max_seconds,
                    on_progress=progress, stop_requested=lambda: stop_signal.called)
                progress.done()
                reports.append(report)
        if links is not None:
            links.close()
        return {"reports": reports}

    result = _run_until_stopped(main, None)
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    reports = result["reports"]
    try:
        _emit_reconcile_metrics(args, reports)
    except Exception as e:  # reconcilers.report.MetricsError: the run itself stands
        print(f"bridgectl: warning: metrics not written: {e}", file=sys.stderr)
    codes = [r.exit_code() for r in reports]
    code = next((c for c in (runner.EXIT_ERROR, runner.EXIT_LOCKED, runner.EXIT_DIFFERENCES)
                 if c in codes), runner.EXIT_IN_SYNC)
    if args.json:
        body = reports[0].to_json() if len(reports) == 1 else {
            "kind": "all", "exit_code": code, "reports": [r.to_json() for r in reports]}
        print(json.dumps(body, sort_keys=True))
    else:
        for r in reports:
            print(render_text(r))
    return code


def _reconciler(kind: str, args: argparse.Namespace, links: Any) -> Any:
    if kind == "gaps":
        from reconcilers.gaps import GapsConfig, GapsReconciler
        config = GapsConfig(margin_ms=int(args.margin * 1000), lag_ms=args.lag_ms)
        if args.since is not None:
            config = attrs.evolve(config, since_ms=args.since)
        return GapsReconciler(links, config)
    if kind == "notifications":
        from reconcilers.notifications import NotificationsReconciler
        return NotificationsReconciler.for_cli(since_ms=args.since)
    from reconcilers.presence import PresenceReconciler
    return PresenceReconciler.for_cli(links)


def _emit_reconcile_metrics(args: argparse.Namespace, reports: list[Any]) -> None:
    if args.textfile is None and args.pushgateway is None:
        return
    from reconcilers import report as metrics_out
    if args.textfile is not None:
        metrics_out.write_textfile(args.textfile, reports)
    if args.pushgateway is not None:
        metrics_out.push(args.pushgateway, reports)


def cmd_demo(args: argparse.Namespace) -> int:
    import re
    import signal

    from drills.demo import Demo, DemoConfig, DemoError, fresh_database, render_summary

    try:
        config = DemoConfig(
            duration=args.duration, supernodes=args.supernodes,
            legacy_users=args.legacy_users, cloud_users=args.cloud_users, rate=args.rate,
            faults=args.faults, seed=args.seed, workers=args.workers,
            reconcile_every=args.reconcile_every)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.reconcile_every is not None and not 5 <= args.reconcile_every <= 3600:
        raise UsageError("--reconcile-every must be between 5 and 3600 seconds")
    if not re.fullmatch(r"bridge_demo[a-z0-9_]{0,50}", args.database):
        raise UsageError("--database must start with bridge_demo and hold only a-z, 0-9 "
                         "and _ (it is dropped and created afresh)")
    server_dsn, origin = _resolve_dsn(args)
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

    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
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
            signal.signal(signal.SIGTERM,
                          lambda *_: reactor.callFromThread(demo.request_abort))
        reactor.callLater(0, install)
        try:
            return {"summary": await demo.run()}
        except DemoError as e:
            raise RuntimeFailure(str(e)) from None

    _log_to_stream((workdir / "demo.log").open("a", encoding="utf-8"), stdlib_too=True)
    result = _run_until_stopped(main, None)
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    summary = result["summary"]
    print(json.dumps(summary, sort_keys=True) if args.json else render_summary(summary),
          flush=True)
    if summary.get("aborted"):
        return EXIT_FAILURE
    return EXIT_OK if summary["converged"] else EXIT_GATED


def cmd_chaos(args: argparse.Namespace) -> int:
    import signal

    from drills import chaos
    from drills.demo import DemoConfig

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
    server_dsn, origin = _resolve_dsn(args)
    embedded = not origin.startswith(("--dsn", "$BRIDGE_DSN"))
    skipped = [n for n in names if chaos.SCENARIOS[n].needs_embedded and not embedded]
    if skipped:
        print(f"chaos: skipping {', '.join(skipped)}: it restarts the embedded PostgreSQL "
              f"and this run uses {origin}", file=sys.stderr)
        names = [n for n in names if n not in skipped]
    home = state.state_home()
    state.secret(home, "peer")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))

    async def main(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        stopping = [False]

        def on_signal(*_: Any) -> None:
            stopping[0] = True
            print("\nchaos: stopping after the current run", file=sys.stderr, flush=True)
        reactor.callLater(0, lambda: (signal.signal(signal.SIGINT, on_signal),
                                      signal.signal(signal.SIGTERM, on_signal)))
        results = await chaos.run_suite(
            reactor, names, seeds, server_dsn=server_dsn, home=home, duration=args.duration,
            out=sys.stdout, status_stream=sys.stderr, stop_requested=lambda: stopping[0],
            sizes=sizes)
        return {"results": results}

    (home / "chaos").mkdir(parents=True, exist_ok=True)
    _log_to_stream((home / "chaos" / "chaos.log").open("a", encoding="utf-8"),
                   stdlib_too=True)
    result = _run_until_stopped(main, None)
    if "error" in result:
        print(f"bridgectl: error: {result['error']}", file=sys.stderr)
        return EXIT_FAILURE
    results = result["results"]
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


COMMANDS = {
    ("legacy", "run"): cmd_legacy_run,
    ("legacy", "simulate"): cmd_legacy_simulate,
    ("db", "upgrade"): cmd_db_upgrade,
    ("db", "status"): cmd_db_status,
    ("db", "dsn"): cmd_db_dsn,
    ("db", "stop"): cmd_db_stop,
    ("cloud", "run"): cmd_cloud_run,
    ("cloud", "clients"): cmd_cloud_clients,
    ("bridge", "run"): cmd_bridge_run,
    ("migrate", None): cmd_migrate,
    ("status", None): cmd_status,
    ("accounts", "import"): cmd_accounts_import,
    ("reconcile", None): cmd_reconcile,
    ("demo", None): cmd_demo,
    ("chaos", None): cmd_chaos,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bridgectl``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    key = (args.command, getattr(args, f"{args.command}_command", None))
    try:
        return COMMANDS[key](args)
    except (UsageError, RuntimeFailure, state.StateError) as e:
        print(f"bridgectl: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def console_main() -> None:
    """Console-script wrapper: exit with ``main``'s code."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
