"""``bridgectl migrate``: move accounts between migration phases, through the gates."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bridgectl import options, runtime
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_FAILURE, EXIT_GATED, EXIT_OK, UsageError
from bridgectl.peers import connect_login_server

NEEDS_LOGIN_SERVER = ("some accounts enter or leave cloud-only, which the legacy login "
                      "server must know: pass --legacy HOST:PORT")


def add_commands(sub: Any) -> None:
    from cloud.model import PHASES

    mig = sub.add_parser(
        "migrate", help="move accounts between migration phases",
        description="Move the selected accounts to --to PHASE (legacy, dual, cloud, "
                    "cloud-only). Forward moves are gated (no open or failed findings in "
                    "the account's scope, mirror lag, the outbox flowing, its conversations "
                    "compared clean by a recent reconcile since their last finding), when "
                    "planned and again when each move is applied; each held account is "
                    "shown with the gates that held it and why; --force overrides failed "
                    "gates, never the freeze. Backward moves are not gated, but leaving "
                    "cloud-only needs --allow-rollback (or `bridgectl cohort reverse`), and "
                    "queues for legacy, in the same transaction, the "
                    "messages legacy missed while nobody in a conversation had legacy clients "
                    "(the count is reported). Every move is written to the audit log. Exit "
                    "codes: 0 all moved (or nothing to do), 3 some held back by gates, "
                    "1 failure, 2 usage.")
    options.add_dsn_option(mig)
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
                     help="move despite failed gates, never past the freeze (gate frozen); "
                          "recorded in the audit log")
    mig.add_argument("--allow-rollback", action="store_true",
                     help="allow moving accounts out of cloud-only (a rollback: queues for "
                          "legacy what it missed); `bridgectl cohort reverse` does this for "
                          "a named cohort")
    mig.add_argument("--legacy", metavar="HOST:PORT", type=options.host_port,
                     help="the legacy login server; needed when an account enters or leaves "
                          "cloud-only")
    mig.add_argument("--actor", metavar="NAME",
                     help="who is moving the accounts, for the audit log (default: OS user)")
    add_gate_options(mig)
    add_retention_option(mig)
    mig.add_argument("--json", action="store_true", help="print one JSON object")
    mig.set_defaults(handler=cmd_migrate)


def add_gate_options(sp: argparse.ArgumentParser) -> None:
    """The gates' bounds, for every command that promotes (``gate_config`` reads them)."""
    sp.add_argument("--lag-bound-ms", type=options.non_negative_int, default=5000,
                    metavar="MS",
                    help="mirror lag gate: every live worker's lag under MS (default 5000)")
    sp.add_argument("--outbox-age-bound", type=options.number, default=300.0, metavar="S",
                    help="outbox gate: no outbox row to legacy waiting longer than S seconds "
                         "(default 300)")
    sp.add_argument("--reconcile-window", type=options.number, default=3600.0, metavar="S",
                    help="reconcile gate: a clean run finished within S seconds, and "
                         "each of the account's conversations compared clean within S "
                         "seconds and since its last finding (default 3600)")


def add_retention_option(sp: argparse.ArgumentParser) -> None:
    """``--legacy-retention``, for every command that may move accounts out of cloud-only
    (``legacy_retention_ms`` reads it)."""
    sp.add_argument("--legacy-retention", type=options.number, default=30 * 86400.0,
                    metavar="S",
                    help="how long legacy supernodes keep history (their retention_seconds; "
                         "default 2592000, 30 days): leaving cloud-only queues for legacy "
                         "only what it missed within S seconds less an hour; older messages "
                         "are counted, not queued")


def gate_config(args: argparse.Namespace) -> Any:
    """The ``GateConfig`` of ``add_gate_options``' flags, or a usage error."""
    from bridge import phases

    if args.lag_bound_ms <= 0 or args.reconcile_window <= 0 or args.outbox_age_bound <= 0:
        raise UsageError("--lag-bound-ms, --outbox-age-bound and --reconcile-window must be "
                         "positive")
    try:  # a bound under a millisecond is 0 ms, which the gates refuse: a usage error too
        return phases.GateConfig(lag_bound_ms=args.lag_bound_ms,
                                 outbox_age_bound_ms=int(args.outbox_age_bound * 1000),
                                 reconcile_window_ms=int(args.reconcile_window * 1000))
    except ValueError as e:
        raise UsageError(f"a gate bound is too small: {e}") from None


def legacy_retention_ms(args: argparse.Namespace) -> int:
    """``--legacy-retention`` in milliseconds, or a usage error."""
    from bridge import phases

    retention = int(args.legacy_retention * 1000)
    if retention <= phases.BACKFILL_MARGIN_MS:
        raise UsageError(f"--legacy-retention must be more than "
                         f"{phases.BACKFILL_MARGIN_MS // 1000} seconds (the back-fill stops "
                         "that far inside it)")
    return retention


def _selection(args: argparse.Namespace) -> Any:
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
    return Selection(refs=options.account_file(args.file))


def cmd_migrate(args: argparse.Namespace) -> int:
    from bridge import migration_report, phases
    from cloud.db import run_transaction
    from cloud.model import PHASES

    if args.to not in PHASES:
        raise UsageError(f"unknown phase {args.to!r}: use one of {', '.join(PHASES)}")
    selection = _selection(args)
    config = gate_config(args)
    retention_ms = legacy_retention_ms(args)
    actor = options.actor(args)
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        try:
            plan = run_transaction(conn, "load_plan", phases.load_plan, selection, args.to, config,
                                   int(time.time() * 1000), force=args.force,
                                   allow_rollback=args.allow_rollback,
                                   legacy_retention_ms=retention_ms)
        except phases.UnknownAccounts as e:
            raise UsageError(str(e)) from None
        gated = EXIT_GATED if plan.held else EXIT_OK
        if args.dry_run or not plan.to_move:
            report = migration_report.plan_to_json(plan, dry_run=args.dry_run)
            print(json.dumps(report, sort_keys=True) if args.json
                  else migration_report.render_plan(report))
            return gated
        if plan.needs_login_server and args.legacy is None:
            raise UsageError(NEEDS_LOGIN_SERVER)
        outcome = apply_now(plan, conn, actor, args, retention_ms)
    if outcome.held:  # gates evaluated again when applying held some planned moves
        gated = EXIT_GATED
    report = migration_report.plan_to_json(plan, outcome)
    print(json.dumps(report, sort_keys=True) if args.json
          else migration_report.render_plan(report))
    if outcome.failed:
        print(f"bridgectl: error: {len(outcome.failed)} account"
              f"{'s' * (len(outcome.failed) != 1)} could not be moved", file=sys.stderr)
        return EXIT_FAILURE
    return gated


def apply_now(plan: Any, conn: Any, actor: str, args: argparse.Namespace,
              legacy_retention_ms: int, now_ms: int | None = None) -> Any:
    """Apply *plan* (``bridge.phases.apply_plan``) and return its ``MigrationOutcome``; with
    the legacy login server (``args.legacy``) when a move enters or leaves cloud-only.
    *now_ms*: the time the moves are made at (default: now)."""
    from twisted.internet import defer

    from bridge import phases
    from cloud.db import InlineDatabase

    # One short transaction per account on this command's own connection: running them
    # inline (no thread pool) is right for a one-shot command, and without a login
    # server to talk to it needs no reactor at all.
    db = InlineDatabase(conn)
    if plan.needs_login_server:
        return _apply_with_login_server(plan, db, actor, args, legacy_retention_ms, now_ms)
    done: list[Any] = []
    defer.Deferred.fromCoroutine(phases.apply_plan(
        plan, db, None, actor=actor,
        now_ms=int(time.time() * 1000) if now_ms is None else now_ms,
        legacy_retention_ms=legacy_retention_ms)).addBoth(done.append)
    outcome = done[0]
    if not isinstance(outcome, phases.MigrationOutcome):
        outcome.raiseException()
    return outcome


def _apply_with_login_server(plan: Any, db: Any, actor: str, args: argparse.Namespace,
                             legacy_retention_ms: int, now_ms: int | None) -> Any:
    from bridge import phases

    secret = options.peer_secret(args)

    async def apply(reactor: Any, stop_signal: Any) -> Any:
        peer = await connect_login_server(reactor, args.legacy, secret)
        try:
            return await phases.apply_plan(
                plan, db, peer, actor=actor,
                now_ms=int(reactor.seconds() * 1000) if now_ms is None else now_ms,
                clock=reactor, should_stop=lambda: stop_signal.called,
                legacy_retention_ms=legacy_retention_ms)
        finally:
            peer.disconnect()

    runtime.log_to_stderr()
    return runtime.run_until_stopped(apply)
