"""``bridgectl bridge run``: one bridge worker, with its operations surface."""

from __future__ import annotations

import argparse
import gc
import os
import random
import socket
from typing import Any

from bridgectl import options, runtime
from bridgectl.database import current_database
from bridgectl.errors import EXIT_OK, UsageError
from bridgectl.output import print_summary


def add_commands(sub: Any) -> None:
    bsub = options.add_group(
        sub, "bridge", help="the bridge between the stacks",
        description="Mirror messages and presence between the legacy network and the cloud "
                    "store.")
    run = bsub.add_parser("run", help="run one bridge worker",
                          description="Follow every supernode's feed into the cloud store "
                                      "and inject cloud messages into the legacy network. "
                                      "SIGTERM/Ctrl-C drains in-flight batches and exits 0. "
                                      "Serves /metrics, /healthz, /readyz and the "
                                      "operator's status page at /status.")
    options.add_dsn_option(run)
    run.add_argument("--legacy", required=True, metavar="HOST:PORT", type=options.host_port,
                     help="the legacy login server (bootstrap for discovering supernodes)")
    run.add_argument("--metrics-port", type=options.port, default=48090, metavar="P",
                     help="port of /metrics, /healthz, /readyz (default 48090; 0: any free)")
    run.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                     help="address of the metrics endpoint (default 127.0.0.1)")
    run.add_argument("--status-interval", type=options.number, default=5.0, metavar="S",
                     help="seconds between the status page's samples of the store "
                          "(default 5; the page keeps 15 minutes of them)")
    run.add_argument("--worker-id", metavar="ID",
                     help="this worker's name in checkpoints and status (default host-pid)")
    options.add_peer_secret_option(run)
    run.add_argument("--duration", type=options.number, metavar="S",
                     help="stop after S seconds (default: run until Ctrl-C / SIGTERM)")
    options.add_log_format_option(run)
    run.set_defaults(handler=cmd_bridge_run)


def cmd_bridge_run(args: argparse.Namespace) -> int:
    from bridge.ops.health import operations_site
    from bridge.ops.statuspage import StatusPage, StatusSampler
    from bridge.outbox import InjectorConfig, OutboxInjector
    from bridge.outbox_listener import OutboxListener
    from bridge.worker import BridgeWorker, WorkerConfig
    from cloud.db import Database
    from legacy.network import TCPNetwork

    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    if not 0.1 <= args.status_interval <= 3600:
        raise UsageError("--status-interval must be between 0.1 and 3600 seconds")
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    if not 0 < len(worker_id) <= 100 or any(ord(c) < 32 for c in worker_id):
        raise UsageError("--worker-id must be 1-100 printable characters")
    secret = options.peer_secret(args)
    dsn, origin = current_database(args)
    host, port = args.legacy

    async def serve_worker(reactor: Any, stop_signal: Any) -> dict[str, Any]:
        systemd = runtime.systemd_link(reactor)
        db = Database(reactor, dsn)
        config = WorkerConfig(worker_id=worker_id, bootstrap_host=host, bootstrap_port=port)

        def injector_for(worker: Any) -> OutboxInjector:
            # the cloud -> legacy side of the worker; its peers are the worker's links
            return OutboxInjector(reactor, db, worker, random.Random(), InjectorConfig())

        worker = BridgeWorker(reactor, TCPNetwork(reactor), db, secret,
                              random.Random(), config, injector_factory=injector_for)
        # NOTIFY wakes the injector as soon as a cloud message commits; polling is the fallback
        listener = OutboxListener(reactor, dsn, worker.injector.notified)

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
        operations = runtime.TCPListener(
            reactor, args.metrics_port, operations_site(readiness, reactor, StatusPage(sampler)),
            interface=args.bind)
        services = runtime.ServiceTree()
        # started in this order, stopped in reverse: the database last
        for service in (db, operations, sampler, worker, listener):
            service.setServiceParent(services)
        await services.start()
        # Everything allocated so far (modules, services) lives as long as the process: out
        # of the collector's reach, a full collection no longer walks it. Those walks paused
        # the worker 15-50 ms every few seconds, and the pauses were the p99 of the lag.
        # (Collected first: garbage frozen now would never be freed.)
        gc.collect()
        gc.freeze()
        where_host, where_port = operations.address()
        runtime.say(f"bridge worker {worker_id}: legacy via {host}:{port}, database: {origin}; "
                    f"metrics on http://{where_host}:{where_port}/metrics; "
                    f"status page on http://{where_host}:{where_port}/status")
        # Type=notify: started once serving; the watchdog is pinged while heartbeats finish
        # (a store outage fails them in time; only a hung worker stops them)
        systemd.ready(f"bridge worker {worker_id}: metrics on {where_host}:{where_port}",
                      check=worker.stalled)
        await stop_signal
        systemd.stopping("draining in-flight batches")
        runtime.say("bridge: draining in-flight batches")
        await services.stopService()
        return {
            "worker_id": worker_id,
            "mirrored_to_cloud": sum(f.mirrored for f in worker.followers.values()),
            "mirrored_to_legacy": getattr(worker.injector, "injected", 0),
            "feeds": len(worker.followers)}

    runtime.log_to_stderr(args.log_format)
    print_summary(runtime.run_until_stopped(serve_worker, args.duration), False)
    return EXIT_OK
