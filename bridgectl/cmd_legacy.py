"""``bridgectl legacy run|simulate``: the simulated legacy supernode network."""

from __future__ import annotations

import argparse
import json
import secrets
import signal
from pathlib import Path
from typing import Any

from bridge import state
from bridgectl import cmd_legacy_versions, options, runtime
from bridgectl.errors import EXIT_OK, UsageError
from bridgectl.output import print_summary


def add_commands(sub: Any) -> None:
    lsub = options.add_group(
        sub, "legacy", help="the simulated legacy supernode network",
        description="Run or simulate the legacy supernode network.")

    run = lsub.add_parser("run", help="run the network over loopback TCP",
                          description="Run supernodes and a login server on 127.0.0.1 with "
                                      "simulated clients. Supernode i listens on BASE+i. "
                                      "Without --duration it runs until Ctrl-C; SIGUSR1 "
                                      "heals early (traffic and faults stop) and keeps "
                                      "serving.")
    _add_workload_options(run, duration_required=False)
    run.add_argument("--port", type=options.port, default=47100, metavar="BASE",
                     help="port of the first supernode (default 47100)")
    run.add_argument("--login-port", type=options.port, default=0, metavar="P",
                     help="login server port (default BASE + number of supernodes)")
    options.add_peer_secret_option(run)
    run.add_argument("--fault-window", type=options.number, metavar="S",
                     help="spread the preset's scheduled faults over the first S seconds "
                          "(default: until the heal, or 600 s without --duration)")
    run.add_argument("--control-dir", type=Path, metavar="DIR",
                     help="run fault commands dropped into DIR as *.json files (the chaos "
                          "suite: crash a fraction of supernodes, cut the bridge off some)")
    run.add_argument("--record", type=Path, metavar="FILE",
                     help="at the end, write the clients' record (acknowledged messages, "
                          "supernode crashes, each supernode's epochs) to FILE as JSON, for "
                          "an outside check")
    run.add_argument("--metrics-port", type=options.port, metavar="P",
                     help="serve the network's /metrics, /healthz and /readyz on "
                          "127.0.0.1:P (0: any free port; default: not served)")
    options.add_log_format_option(run)
    run.set_defaults(handler=cmd_legacy_run)

    sim = lsub.add_parser("simulate", help="run the network in memory, deterministically",
                          description="Run the same workload on the deterministic in-memory "
                                      "network: one seed, one trace hash.")
    _add_workload_options(sim, duration_required=True)
    sim.add_argument("--min-version", metavar="VERSION",
                     help="the login server refuses clients older than VERSION from the "
                          "start (default: none)")
    sim.set_defaults(handler=cmd_legacy_simulate)
    cmd_legacy_versions.add_commands(lsub)


def _add_workload_options(sp: argparse.ArgumentParser, *, duration_required: bool) -> None:
    sp.add_argument("--supernodes", type=options.non_negative_int, default=8, metavar="N",
                    help="number of supernodes (default 8)")
    sp.add_argument("--users", type=options.non_negative_int, default=200, metavar="N",
                    help="simulated users (default 200)")
    sp.add_argument("--rate", type=options.number, default=20.0, metavar="MSGS_PER_S",
                    help="messages per second over the whole network (default 20)")
    sp.add_argument("--faults", choices=("none", "light", "heavy"), default="none",
                    help="fault preset (default none)")
    sp.add_argument("--seed", type=options.non_negative_int, default=1, metavar="N",
                    help="seed for every random choice (default 1)")
    sp.add_argument("--duration", type=options.number, required=duration_required,
                    metavar="S",
                    help="seconds to run; the last 30%% (at most 30 s) heal and drain")
    sp.add_argument("--client-versions", metavar="SPREAD",
                    help="client versions the devices report at login, weighted, e.g. "
                         "7.1:0.2,7.4:0.5,8.0:0.3 (drawn from the seed; default: none "
                         "reported, as old clients)")
    sp.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _run_config(args: argparse.Namespace, **extra: Any) -> Any:
    from legacy.sim import RunConfig
    try:
        return RunConfig(supernodes=args.supernodes, users=args.users, rate=args.rate,
                         faults=args.faults, seed=args.seed, duration=args.duration,
                         client_versions=args.client_versions or "", **extra)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_legacy_simulate(args: argparse.Namespace) -> int:
    from legacy.sim import simulate
    config = _run_config(args, min_version=args.min_version or "")
    print_summary(simulate(config), args.json)
    return EXIT_OK


def cmd_legacy_run(args: argparse.Namespace) -> int:
    from twisted.internet import defer, task

    from bridge.ops.health import operations_site
    from legacy.sim import run_tcp

    config = _run_config(args, base_port=args.port, login_port=args.login_port,
                         fault_window=args.fault_window)
    peer_secret = options.peer_secret(args)
    login_secret = state.secret(state.state_home(), "login")

    def write_record(dep: Any) -> None:
        if args.record is not None:
            _write_json_atomically(args.record, dep.record())

    async def serve_network(reactor: Any, stop_signal: defer.Deferred) -> Any:
        systemd = runtime.systemd_link(reactor)
        stop_signal.addCallback(lambda result: (systemd.stopping(), result)[1])
        heal_signal: defer.Deferred = defer.Deferred()
        runtime.on_signal(reactor, signal.SIGUSR1,
                          lambda: heal_signal.called or heal_signal.callback(None))

        def listening(dep: Any) -> None:
            last = config.base_port + config.supernodes - 1
            runtime.say(f"legacy network up: login server 127.0.0.1:{dep.login.port}, "
                        f"{config.supernodes} supernodes on 127.0.0.1:{config.base_port}-{last}")
            # Type=notify: serving now; the watchdog is pinged while the reactor turns
            systemd.ready(f"legacy network up: login server 127.0.0.1:{dep.login.port}")

            def progress() -> None:
                s = dep.stats
                runtime.say(f"  t={reactor.seconds() - dep.started_at:6.0f}s sent={len(s.sent)} "
                            f"acked={len(s.acked)} delivered={len(s.delivered)}")
            loop = task.LoopingCall(progress)
            loop.clock = reactor
            loop.start(10.0, now=False)
            if args.control_dir is not None:
                control = task.LoopingCall(run_control_commands, args.control_dir, dep)
                control.clock = reactor
                control.start(0.25, now=False)

        metrics = None
        if args.metrics_port is not None:
            # the legacy_* counters and gauges of every supernode and the login server here
            metrics = runtime.TCPListener(reactor, args.metrics_port,
                                          operations_site(lambda: [], reactor))
            metrics.startService()  # a port in use: CannotListenError, one line, exit 1
            runtime.say(
                f"legacy network metrics on http://127.0.0.1:{metrics.address()[1]}/metrics")
        try:
            # a fresh run id: epochs never repeat those of an earlier run with this seed
            return await run_tcp(reactor, config, peer_secret=peer_secret,
                                 login_secret=login_secret, run_id=secrets.randbits(64),
                                 on_listening=listening,
                                 stop_signal=stop_signal, heal_signal=heal_signal,
                                 on_done=write_record)
        finally:
            systemd.stopping()  # also when the run ended by itself (--duration)
            if metrics is not None:
                await metrics.stopService()

    runtime.log_to_stderr(args.log_format)
    # With a duration of its own the run heals and ends by itself; Ctrl-C then stops the
    # reactor without waiting for it, as before.
    summary = runtime.run_until_stopped(serve_network,
                                        drain_on_shutdown=config.duration is None)
    if summary is not None:  # None: stopped before the run ended
        print_summary(summary, args.json)
    return EXIT_OK


def run_control_commands(directory: Path, dep: Any) -> None:
    """Run (then delete) each ``*.json`` command file in *directory*, oldest name first."""
    for path in sorted(directory.glob("*.json")):
        try:
            cmd = json.loads(path.read_text(encoding="utf-8"))
            done = dep.command(cmd)
        except (OSError, ValueError, TypeError, KeyError) as e:
            done = f"refused {path.name}: {e}"
        path.unlink(missing_ok=True)
        runtime.say(f"control: {done}")


def _write_json_atomically(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    tmp.replace(path)
