"""``bridgectl cloud run|clients``: the cloud API with its notification dispatcher, and
simulated cloud devices against it."""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

from bridge import state
from bridgectl import options, runtime
from bridgectl.cloud_workers import (
    LISTEN_FD,
    WorkerRole,
    WorkerSupervisor,
    bind_shared_socket,
    processes_count,
    worker_command,
)
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_OK, RuntimeFailure, UsageError
from bridgectl.output import print_summary

#: A dispatcher tick running longer than this hangs (its pushes time out after 5 s): the
#: systemd watchdog is no longer pinged.
DISPATCHER_STALLED_S = 60.0


def _token_ttl(text: str) -> int:
    seconds = options.non_negative_int(text)
    if not 5 <= seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is not within 5..86400 seconds")
    return seconds


def add_commands(sub: Any) -> None:
    csub = options.add_group(
        sub, "cloud", help="the cloud service",
        description="Run the cloud API and its notification dispatcher, or simulated cloud "
                    "clients against it.")
    crun = csub.add_parser("run", help="serve the cloud API and dispatch notifications",
                           description="Serve the cloud API (JSON over HTTP, /metrics beside "
                                       "it) on 127.0.0.1 and run the notification dispatcher "
                                       "with a simulated push gateway. Runs until Ctrl-C "
                                       "unless --duration is given.")
    options.add_dsn_option(crun)
    crun.add_argument("--port", type=options.port, default=48080, metavar="P",
                      help="port to listen on (default 48080; 0 picks a free one)")
    crun.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                      help="address to listen on (default 127.0.0.1)")
    crun.add_argument("--push-loss", type=options.fraction, default=0.0, metavar="F",
                      help="fraction of pushes the gateway accepts but never delivers")
    crun.add_argument("--push-errors", type=options.fraction, default=0.0, metavar="F",
                      help="fraction of pushes the gateway refuses (retried with backoff)")
    crun.add_argument("--push-latency", type=options.number, default=0.05, metavar="S",
                      help="seconds from push to delivery (default 0.05)")
    crun.add_argument("--resend-after", type=options.number, default=10.0, metavar="S",
                      help="re-push a notification not acknowledged after S seconds "
                           "(default 10)")
    crun.add_argument("--max-attempts", type=options.non_negative_int, default=5,
                      metavar="N",
                      help="pushes before a notification is marked failed (default 5)")
    crun.add_argument("--seed", type=options.non_negative_int, default=1, metavar="N",
                      help="seed of the simulated gateway's choices (default 1)")
    crun.add_argument("--token-ttl", type=_token_ttl, default=3600, metavar="S",
                      help="seconds a login's token lasts, 5..86400 (default 3600); a "
                           "client renews it before then (POST /v1/token)")
    crun.add_argument("--duration", type=options.number, metavar="S",
                      help="stop after S seconds (default: run until Ctrl-C)")
    crun.add_argument("--processes", type=processes_count, default=1, metavar="N",
                      help="API processes sharing the port, 1..64 (default 1); with more, "
                           "this process supervises them and worker 0 runs the dispatcher")
    options.add_log_format_option(crun)
    crun.set_defaults(handler=cmd_cloud_run)

    clients = csub.add_parser("clients", help="simulated cloud devices against a running API",
                              description="Create (idempotently) simulated cloud accounts "
                                          "and conversations in the store, then run one "
                                          "device per account against the API: log in, "
                                          "post at --rate, long-poll, sync, acknowledge, "
                                          "keep presence. Prints what the API acknowledged.")
    options.add_dsn_option(clients)
    clients.add_argument("--api", default="http://127.0.0.1:48080", metavar="URL",
                         help="base URL of the cloud API (default http://127.0.0.1:48080)")
    clients.add_argument("--users", type=options.non_negative_int, default=20, metavar="N",
                         help="simulated cloud users, one device each (default 20)")
    clients.add_argument("--conversations", type=options.non_negative_int, default=10,
                         metavar="N", help="conversations among them (default 10)")
    clients.add_argument("--rate", type=options.number, default=5.0, metavar="MSGS_PER_S",
                         help="messages per second over all devices (default 5)")
    clients.add_argument("--seed", type=options.non_negative_int, default=1, metavar="N")
    clients.add_argument("--duration", type=options.number, required=True, metavar="S",
                         help="seconds of traffic")
    clients.add_argument("--settle", type=options.number, default=5.0, metavar="S",
                         help="seconds after the traffic to collect notifications (default 5)")
    clients.add_argument("--json", action="store_true", help="print one JSON object")
    clients.set_defaults(handler=cmd_cloud_clients)


def cmd_cloud_run(args: argparse.Namespace) -> int:
    from twisted.internet import threads

    from cloud.api import CloudAPI
    from cloud.db import Database
    from cloud.dispatcher import DispatcherConfig, NotificationDispatcher
    from cloud.gateway import SimulatedPushGateway
    from cloud.passwords import hash_password, verify_password
    from cloud.push import NotificationChannel

    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.push_latency < 0 or args.resend_after <= 0 or args.max_attempts < 1:
        raise UsageError("--push-latency must be >= 0, --resend-after > 0, "
                         "--max-attempts >= 1")
    dsn, origin = current_database(args)
    if args.processes > 1:
        return _supervise_workers(args, dsn, origin)
    # a worker of a `cloud run --processes N` (the parent set this): see cloud_workers
    role = WorkerRole.from_environment(os.environ)
    secret = state.secret(state.state_home(), "cloud")

    async def serve_api(reactor: Any, stop_signal: Any) -> None:
        systemd = runtime.systemd_link(reactor)
        db = Database(reactor, dsn)
        metrics: Any = None
        relay: Any = None
        if role is None:
            channel = NotificationChannel(reactor)
        else:
            from prometheus_client import CollectorRegistry, multiprocess

            from cloud.channel_relay import ChannelRelayListener, RelayedChannel

            # /metrics answers for every worker: counters summed over the processes
            metrics = CollectorRegistry()
            multiprocess.MultiProcessCollector(metrics)
            channel = RelayedChannel(reactor, [role.channel_socket(i)
                                               for i in range(role.processes)
                                               if i != role.index])
            relay = ChannelRelayListener(reactor, channel, role.channel_socket(role.index))
        rng = random.Random(args.seed)
        gateway = SimulatedPushGateway(reactor, random.Random(rng.random()), channel,
                                       loss=args.push_loss, error_rate=args.push_errors,
                                       latency_s=args.push_latency)
        # one dispatcher per deployment: with several processes, worker 0's
        dispatcher = None if role is not None and not role.runs_dispatcher else \
            NotificationDispatcher(
                reactor, db, gateway, random.Random(rng.random()),
                DispatcherConfig(resend_after_s=args.resend_after,
                                 max_attempts=args.max_attempts))

        def check_password(password: str, encoded: str) -> Any:
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                             verify_password, password, encoded)

        def make_hash(password: str) -> Any:
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                             hash_password, password)

        api = CloudAPI(db, reactor, channel, secret, password_check=check_password,
                       password_hash=make_hash, token_ttl_s=args.token_ttl,
                       **({} if role is None else {"metrics": metrics, "worker": role.index}))
        http: Any
        if role is None:
            http = runtime.TCPListener(reactor, args.port, api.site(), interface=args.bind)
        else:
            http = runtime.AdoptedListener(reactor, LISTEN_FD, api.site())
        services = runtime.ServiceTree()
        # started in this order, stopped in reverse
        for service in (db, relay, dispatcher, http):
            if service is not None:
                service.setServiceParent(services)
        await services.start()
        host, port = http.address()
        if role is None:
            runtime.say(f"cloud API on http://{host}:{port}/v1 (metrics at /metrics); "
                        f"database: {origin}")
        else:
            runtime.say(f"cloud worker {role.index} (pid {os.getpid()}) serving "
                        f"{host}:{port}" + (" with the notification dispatcher"
                                            if dispatcher is not None else ""))

        def stalled() -> str | None:
            if dispatcher is None:
                return None
            running = dispatcher.tick_running_s()
            if running > DISPATCHER_STALLED_S:
                return f"a notification dispatcher tick has run for {running:.0f} s"
            return None

        # Type=notify: started once listening; the watchdog is pinged by the reactor's own
        # timer while the dispatcher is not stuck in a tick
        systemd.ready(f"cloud API on {host}:{port}", check=stalled)
        await stop_signal
        systemd.stopping()
        await services.stopService()

    runtime.log_to_stderr(args.log_format)
    runtime.run_until_stopped(serve_api, args.duration)
    return EXIT_OK


#: Seconds the workers of ``--processes N`` get to say they serve.
WORKERS_START_TIMEOUT_S = 60.0


def _supervise_workers(args: argparse.Namespace, dsn: str, origin: str) -> int:
    """``cloud run --processes N``: bind once, run and supervise N workers (cloud_workers)."""
    from twisted.internet import defer, error

    try:  # before the reactor runs: a port in use is one line, and no worker starts
        sock = bind_shared_socket(args.bind, args.port)
    except error.CannotListenError as e:
        raise RuntimeFailure(f"cannot listen on {e.interface}:{e.port}: {e.socketError}"
                             ) from None

    async def supervise(reactor: Any, stop_signal: Any) -> None:
        systemd = runtime.systemd_link(reactor)
        supervisor = WorkerSupervisor(reactor, worker_command(args),
                                      {**os.environ, "BRIDGE_DSN": dsn}, sock,
                                      args.processes, random.Random(args.seed))
        try:
            supervisor.startService()
            started: defer.Deferred = defer.Deferred()  # all ready, or told to stop

            def fire(result: Any) -> Any:
                if not started.called:
                    started.callback(None)
                return result

            supervisor.all_ready.addBoth(fire)
            stop_signal.addBoth(fire)
            started.addTimeout(WORKERS_START_TIMEOUT_S, reactor)
            try:
                await started
            except defer.TimeoutError:
                raise RuntimeFailure(f"the cloud workers did not all start within "
                                     f"{WORKERS_START_TIMEOUT_S:.0f} s (see their errors "
                                     f"above)") from None
            if not stop_signal.called:
                host, port = sock.getsockname()[:2]
                runtime.say(f"cloud API on http://{host}:{port}/v1 (metrics at /metrics); "
                            f"{args.processes} processes; database: {origin}")
                systemd.ready(f"cloud API on {host}:{port}, {args.processes} processes",
                              check=supervisor.down_too_long)
                await stop_signal
        finally:
            systemd.stopping()
            if supervisor.running:
                await supervisor.stopService()

    runtime.log_to_stderr(args.log_format)
    try:
        runtime.run_until_stopped(supervise, args.duration)
    finally:
        sock.close()
    return EXIT_OK


def cmd_cloud_clients(args: argparse.Namespace) -> int:
    from twisted.internet import task

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
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        population = provision(conn, users=args.users, conversations=args.conversations,
                               seed=args.seed)

    async def run_devices(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        http = AgentHTTP(reactor, args.api)
        workload = CloudWorkload(reactor, http, population, config, args.seed)
        workload.startService()
        await stop_signal
        workload.stop_posting()
        await task.deferLater(reactor, args.settle, lambda: None)  # let notifications arrive
        await workload.stopService()
        await http.close()
        return workload.stats.summary()

    runtime.log_to_stderr()
    print_summary(runtime.run_until_stopped(run_devices, args.duration), args.json)
    return EXIT_OK
