"""``bridgectl reconcile gaps|notifications|presence|all``: one cron run of the reconcilers.

One deadline bounds the whole invocation (``--max-seconds``, else
``reconcilers.runner.DEFAULT_MAX_SECONDS``): discovery, every kind of ``all``, and every
database statement (``statement_timeout``) fit in it, so a cron run never outlives it.
``all`` runs notifications and presence first, each within a fair share of the time left,
then gaps with the rest (its reports still print in ``KINDS`` order).

``--since`` means one thing per kind (``SINCE_HELP``): the gaps window for ``gaps`` and
``all``, the owed-notifications window for ``notifications``; presence has none. Under
``all`` the notifications keep their own window (24 h) unless ``--notifications-since``
says otherwise, so a month-wide gaps pass never pushes month-old notifications.

A targeted gaps run (``--account REF`` or ``--conversation ID``, one of them, once;
``reconcilers.gaps_scope``) compares that scope only. Its scope is resolved before anything
runs (unknown: exit 2, nothing changed). It takes the gaps lock like a full pass (two runs
never repair at once: while the cron pass holds it the targeted run exits 4 and can be run
again when it ends), keeps its own resume cursor, and writes no textfile or Pushgateway
metrics (those are the full passes' own: a targeted run must not move
``bridge_reconcile_last_success_timestamp_seconds``).

``--max-rate N`` paces every request a run sends to the supernodes (digests, lists,
fetches, injections) to at most N a second on the reactor's clock
(``reconcilers.pacing``); it applies to the kinds that talk to the legacy network.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer

from bridgectl import options, runtime
from bridgectl.database import connect, current_database
from bridgectl.errors import RuntimeFailure, UsageError

#: What --since means for each kind (the --help text says the same).
SINCE_HELP = ("how far back to look, e.g. 90m, 12h, 30d; one meaning per kind: gaps and "
              "all: compare messages sent within it (default 30d); notifications: look for "
              "notifications owed for messages sent within it (default 24h, the "
              "notifications window); presence: has no window (it corrects presence as it "
              "is now) and refuses --since; under all, --since is the gaps window only and "
              "never widens the notifications window (see --notifications-since)")


#: Bound on one database statement of a run (lower when the deadline is shorter).
STATEMENT_TIMEOUT_S = 60.0


def add_commands(sub: Any) -> None:
    from reconcilers.runner import DEFAULT_MAX_SECONDS

    rec = sub.add_parser(
        "reconcile", help="find and repair divergence between the stacks (a cron job)",
        description="One reconcile run per invocation, ended by its deadline (--max-seconds, "
                    f"default {DEFAULT_MAX_SECONDS:g} s) at the latest. Exit codes: 0 in sync "
                    "(or all repaired), 1 error (also: compared nothing), 2 bad arguments, "
                    "3 partial or differences remain (dry run, failed repairs, a supernode "
                    "unreachable or lost mid-pass, or the deadline reached: the next run "
                    "resumes), 4 another run of the same kind holds the lock (0 with "
                    "--locked-ok), 5 the reconcilers are paused by an operator (bridgectl "
                    "control pause reconcilers: refused at start, or stopped at the next "
                    "check with its progress saved).")
    rec.add_argument("kind", choices=("gaps", "notifications", "presence", "all"),
                     help="what to reconcile")
    options.add_dsn_option(rec)
    rec.add_argument("--legacy", metavar="HOST:PORT", type=options.host_port,
                     help="the legacy login server (needed by gaps, presence and all)")
    rec.add_argument("--since", type=options.duration_ms, metavar="DURATION",
                     help=SINCE_HELP)
    rec.add_argument("--notifications-since", type=options.duration_ms, metavar="DURATION",
                     help="notifications and all: look for notifications owed for messages "
                          "sent within DURATION (default 24h, the notifications window); "
                          "the only way to widen it under all")
    rec.add_argument("--margin", type=options.number, default=10.0, metavar="S",
                     help="gaps: compare only what is older than now minus the bridge's "
                          "measured lag minus S seconds (default 10)")
    rec.add_argument("--lag-ms", type=options.non_negative_int, metavar="MS",
                     help="gaps: assume this bridge lag instead of the one live workers "
                          "report (e.g. 0 once traffic is stopped and the bridge drained, "
                          "to compare everything up to now minus --margin)")
    rec.add_argument("--legacy-retention", type=options.duration_ms, default="30d",
                     metavar="DURATION",
                     help="gaps: how long legacy supernodes keep history (their "
                          "retention_seconds; default 30d). Nothing older than the retention "
                          "less --retention-margin is compared or re-injected, whatever "
                          "--since says")
    rec.add_argument("--retention-margin", type=options.duration_ms, default="1h",
                     metavar="DURATION",
                     help="gaps: how far inside the legacy retention the window ends "
                          "(default 1h; longer than a run, so nothing ages out during it)")
    rec.add_argument("--full-sweep", action="store_true",
                     help="gaps: compare every conversation's root digests, not only those "
                          "changed since their last clean compare (the dirty set), those at "
                          "supernodes with open feed gaps or a new epoch and those never "
                          "compared: for audits (gaps and all; not with --account or "
                          "--conversation)")
    rec.add_argument("--account", metavar="REF", action="append",
                     help="gaps only: compare just this account's conversations (a handle or "
                          "an account id; those it is a member of on the cloud and those the "
                          "supernodes list it in); give it once. Keeps its own resume "
                          "cursor, never the full pass's, and never counts as the clean run "
                          "the migration gate asks for")
    rec.add_argument("--conversation", metavar="ID", action="append",
                     help="gaps only: compare just this conversation (a conversation id or "
                          "its legacy chat id); give it once; not with --account")
    rec.add_argument("--max-rate", type=options.number, metavar="N",
                     help="gaps, presence and all: send at most N requests a second to the "
                          "legacy supernodes (digests, lists, fetches, injections), evenly "
                          "spaced; N > 0, e.g. 50 or 0.5 (default: no cap)")
    rec.add_argument("--dry-run", action="store_true", help="find and report, repair nothing")
    rec.add_argument("--actor", metavar="NAME",
                     help="with --account or --conversation: who runs the targeted resync, "
                          "for the audit log, where its start and end are written (default: "
                          "OS user)")
    rec.add_argument("--max-seconds", type=options.number, metavar="S",
                     default=DEFAULT_MAX_SECONDS,
                     help="the run's deadline: at S seconds it saves its progress, releases "
                          "its lock and exits 3; the next run resumes where it stopped "
                          f"(default {DEFAULT_MAX_SECONDS:g}; all: S for the three kinds "
                          "together)")
    rec.add_argument("--locked-ok", action="store_true",
                     help="exit 0 instead of 4 when another run of the kind holds the lock "
                          "(the report still says locked): for schedulers that tell only 0 "
                          "from a failure, such as Kubernetes Jobs")
    rec.add_argument("--json", action="store_true", help="print one JSON report object")
    rec.add_argument("--textfile", type=Path, metavar="PATH",
                     help="write metrics for node_exporter's textfile collector to PATH")
    rec.add_argument("--pushgateway", metavar="URL", help="push metrics to a Pushgateway")
    options.add_peer_secret_option(rec)
    rec.set_defaults(handler=cmd_reconcile)


def cmd_reconcile(args: argparse.Namespace) -> int:
    from bridge.discovery import SupernodeLinks, discover
    from cloud.db import InlineDatabase
    from legacy.network import TCPNetwork
    from reconcilers import runner
    from reconcilers.report import ProgressLine, render_text

    kinds = list(runner.KINDS) if args.kind == "all" else [args.kind]
    if not (args.max_seconds > 0 and math.isfinite(args.max_seconds)):
        raise UsageError("--max-seconds must be a positive number of seconds")
    if args.margin < 0:
        raise UsageError("--margin must not be negative")
    if args.kind == "presence" and args.since is not None:
        raise UsageError("presence has no time window (it corrects presence as it is now); "
                         "--since applies to gaps and notifications")
    if args.notifications_since is not None and args.kind not in ("notifications", "all"):
        raise UsageError("--notifications-since applies to notifications and all")
    if (args.kind == "notifications" and args.since is not None
            and args.notifications_since is not None):
        raise UsageError("give --since or --notifications-since, not both (for "
                         "notifications they mean the same)")
    targeted = _check_target(args)
    if args.actor is not None and not targeted:
        raise UsageError("--actor applies to a targeted run (--account or --conversation); "
                         "scheduled full passes are not audited")
    actor = options.actor(args) if targeted and not args.dry_run else None
    if args.max_rate is not None:
        if not args.max_rate > 0:
            raise UsageError("--max-rate must be a positive number of requests a second")
        if args.kind == "notifications":
            raise UsageError("--max-rate applies to gaps, presence and all (the kinds that "
                             "send requests to the legacy network)")
    if "gaps" in kinds:
        _gaps_config(args)  # checked before anything runs
    needs_legacy = {"gaps", "presence"} & set(kinds)
    if needs_legacy and args.legacy is None:
        raise UsageError("--legacy HOST:PORT is needed to reconcile "
                         + ", ".join(sorted(needs_legacy)))
    if args.pushgateway is not None and not args.pushgateway.startswith(("http://", "https://")):
        raise UsageError("--pushgateway must be an http:// URL")
    secret = options.peer_secret(args) if needs_legacy else None
    dsn, origin = current_database(args)
    # every statement ends well within the deadline: a blocked or runaway query can not
    # hold the run (and its lock) past it
    statement_s = min(STATEMENT_TIMEOUT_S, args.max_seconds)
    scope = _resolve_scope(args, dsn, origin, statement_s) if targeted else None

    async def reconcile(reactor: Any, stop_signal: Any) -> list[Any]:
        # Ctrl-C / SIGTERM fire stop_signal: the reconciler stops at its next check, saves
        # its progress (the run ends 'interrupted'), and shutdown waits for that.
        deadline = reactor.seconds() + args.max_seconds
        links = None
        if needs_legacy:
            network = TCPNetwork(reactor)
            host, port = args.legacy
            try:
                found = defer.Deferred.fromCoroutine(discover(
                    network, host, port, name="reconciler", secret=secret))
                directory = await found.addTimeout(args.max_seconds, reactor)
            except Exception as e:
                raise RuntimeFailure(f"cannot reach the legacy network via {host}:{port}: "
                                     f"{e}") from None
            links = SupernodeLinks(network, directory, name="reconciler", secret=secret)
            if args.max_rate is not None:
                from reconcilers.pacing import PacedLinks
                links = PacedLinks(links, reactor, args.max_rate)
        reports = {}
        order = sorted(kinds, key=lambda k: k == "gaps")  # gaps last: it takes what is left
        with connect(dsn, origin, statement_timeout_s=statement_s) as conn, \
                connect(dsn, origin, statement_timeout_s=statement_s) as lock_conn:
            db = InlineDatabase(conn)
            progress = ProgressLine(sys.stderr)  # a bar on a terminal, a line per 10 s in cron
            for i, kind in enumerate(order):
                left = deadline - reactor.seconds()
                budget = left if kind == "gaps" else left / (len(order) - i)
                reports[kind] = await runner.run_one(
                    _reconciler(kind, args, links, scope), clock=reactor, db=db,
                    lock_conn=lock_conn, dry_run=args.dry_run, max_seconds=max(0.0, budget),
                    on_progress=progress, stop_requested=lambda: stop_signal.called,
                    scope=None if scope is None else scope.label, actor=actor)
                if args.max_rate is not None and kind != "notifications":
                    reports[kind].detail["max_rate"] = args.max_rate
                progress.done()
        if links is not None:
            links.close()
        return [reports[k] for k in kinds]

    pause = _reconcilers_paused(dsn, origin, statement_s)
    if pause is not None:  # refused before reaching out to the legacy network
        reports = [runner.refused_by_pause(kind, args.dry_run, pause) for kind in kinds]
    else:
        reports = runtime.run_until_stopped(reconcile)
    try:
        _emit_metrics(args, reports)
    except Exception as e:  # reconcilers.report.MetricsError: the run itself stands
        print(f"bridgectl: warning: metrics not written: {e}", file=sys.stderr)
    codes = [r.exit_code() for r in reports]
    if args.locked_ok:  # the run holding the lock reports for the kind; this one did no harm
        codes = [runner.EXIT_IN_SYNC if c == runner.EXIT_LOCKED else c for c in codes]
    code = next((c for c in (runner.EXIT_ERROR, runner.EXIT_LOCKED, runner.EXIT_PAUSED,
                             runner.EXIT_DIFFERENCES)
                 if c in codes), runner.EXIT_IN_SYNC)
    if args.json:
        body = reports[0].to_json() if len(reports) == 1 else {
            "kind": "all", "exit_code": code, "reports": [r.to_json() for r in reports]}
        print(json.dumps(body, sort_keys=True))
    else:
        for r in reports:
            print(render_text(r))
    return code


def _reconcilers_paused(dsn: str, origin: Any, statement_s: float) -> Any:
    """The pause of the reconcilers (``bridgectl control pause reconcilers``), or None."""
    from cloud.db import run_transaction
    from cloud.store import controls as controls_store

    with connect(dsn, origin, statement_timeout_s=statement_s) as conn:
        return run_transaction(conn, "read_runtime_controls",
                               controls_store.read_runtime_controls).paused("reconcilers")


def _check_target(args: argparse.Namespace) -> bool:
    """Is this a targeted gaps run? Refuses (exit 2) what a targeted run can not be."""
    if args.full_sweep and args.kind not in ("gaps", "all"):
        raise UsageError("--full-sweep applies to gaps and all")
    given = [(flag, values) for flag, values in (("--account", args.account),
                                                 ("--conversation", args.conversation))
             if values]
    if not given:
        return False
    if args.full_sweep:
        raise UsageError("a targeted run compares its whole scope: --full-sweep is for "
                         "the full pass")
    if args.kind != "gaps":
        raise UsageError("--account and --conversation apply to reconcile gaps only")
    if len(given) > 1:
        raise UsageError("give --account or --conversation, not both")
    flag, values = given[0]
    if len(values) > 1:
        raise UsageError(f"give {flag} once (run one targeted reconcile per "
                         f"{flag.removeprefix('--')})")
    if args.textfile is not None or args.pushgateway is not None:
        raise UsageError("a targeted run writes no metrics (--textfile and --pushgateway "
                         "report the full passes cron runs)")
    return True


def _resolve_scope(args: argparse.Namespace, dsn: str, origin: str,
                   statement_s: float) -> Any:
    """The targeted run's scope, read before anything runs: unknown is exit 2."""
    from cloud.db import run_transaction
    from reconcilers import gaps_scope

    try:
        with connect(dsn, origin, statement_timeout_s=statement_s) as conn:
            if args.account:
                return run_transaction(conn, "resolve_account_scope",
                                       gaps_scope.resolve_account, args.account[0])
            return run_transaction(conn, "resolve_conversation_scope",
                                   gaps_scope.resolve_conversation, args.conversation[0])
    except gaps_scope.UnknownScope as e:
        raise UsageError(str(e)) from None


def _reconciler(kind: str, args: argparse.Namespace, links: Any, scope: Any = None) -> Any:
    if kind == "gaps":
        from reconcilers.gaps import GapsReconciler
        return GapsReconciler(links, _gaps_config(args), scope)
    if kind == "notifications":
        from reconcilers.notifications import NotificationsReconciler
        # under all, --since is the gaps window: notifications keep their own unless
        # --notifications-since widens (or narrows) it
        since = args.notifications_since
        if since is None and args.kind == "notifications":
            since = args.since
        return NotificationsReconciler.for_cli(since_ms=since)
    from reconcilers.presence import PresenceReconciler
    return PresenceReconciler.for_cli(links)


def _gaps_config(args: argparse.Namespace) -> Any:
    """The gaps reconciler's configuration from the flags (a bad combination: exit 2)."""
    from reconcilers.gaps import GapsConfig
    try:
        config = GapsConfig(margin_ms=int(args.margin * 1000), lag_ms=args.lag_ms,
                            legacy_retention_ms=args.legacy_retention,
                            retention_margin_ms=args.retention_margin,
                            full_sweep=args.full_sweep)
        if args.since is not None:
            config = attrs.evolve(config, since_ms=args.since)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return config


def _emit_metrics(args: argparse.Namespace, reports: list[Any]) -> None:
    if args.textfile is None and args.pushgateway is None:
        return
    from reconcilers import report as metrics_out
    if args.textfile is not None:
        metrics_out.write_textfile(args.textfile, reports)
    if args.pushgateway is not None:
        metrics_out.push(args.pushgateway, reports)
