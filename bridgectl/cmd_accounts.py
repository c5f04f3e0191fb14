"""``bridgectl accounts import``: link every legacy account to a cloud account.
``bridgectl accounts show``: one account's migration: phase history, what holds it, its
cohorts, and what was mirrored for it lately."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bridgectl import cmd_migrate, options, runtime
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_OK, RuntimeFailure, UsageError
from bridgectl.output import print_summary
from bridgectl.peers import connect_login_server


def add_commands(sub: Any) -> None:
    asub = options.add_group(
        sub, "accounts", help="legacy accounts in the cloud store",
        description="Manage the cloud accounts linked to legacy handles.")
    imp = asub.add_parser("import", help="link every legacy account (safe to run again)",
                          description="Page through the legacy login server's accounts and "
                                      "give each handle a linked cloud account in phase "
                                      "legacy, with its password hash; existing links get a "
                                      "changed hash, never a changed phase.")
    options.add_dsn_option(imp)
    imp.add_argument("--legacy", required=True, metavar="HOST:PORT", type=options.host_port,
                     help="the legacy login server")
    imp.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    imp.set_defaults(handler=cmd_accounts_import)

    show = asub.add_parser(
        "show", help="one account: phase history, what holds it, cohorts, latest mirrored",
        description="One account's migration, read in one transaction: its phase history "
                    "(the audit log), its open and failed findings, the gates' verdict now "
                    "for its next phase (as `migrate --dry-run` evaluates them), its cohorts, "
                    "and the latest messages mirrored for it either way (legacy -> cloud: "
                    "messages from legacy in its conversations; cloud -> legacy: their outbox "
                    "rows, pending or done). Message bodies are not shown. Exit 2 for an "
                    "account that does not exist.")
    show.add_argument("account", metavar="HANDLE", help="a handle (or an account id)")
    options.add_dsn_option(show)
    show.add_argument("--limit", type=options.non_negative_int, default=10, metavar="N",
                      help="at most N findings, and N messages each way (default 10)")
    cmd_migrate.add_gate_options(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=cmd_accounts_show)


def cmd_accounts_show(args: argparse.Namespace) -> int:
    import time

    from bridge import account_report
    from cloud import admin
    from cloud.db import run_transaction

    config = cmd_migrate.gate_config(args)
    now_ms = int(time.time() * 1000)
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        def read(c: Any) -> Any:
            found, _unknown = admin.find_accounts(c, [args.account])
            if not found:
                return None
            return account_report.describe(c, found[0], config, now_ms, args.limit)

        got = run_transaction(conn, "account_show", read)
    if got is None:
        raise UsageError(f"unknown account: {args.account!r}")
    if args.json:
        print(json.dumps(got, sort_keys=True, default=str))
        return EXIT_OK
    print(account_report.render(got))
    for step in got["next"]:
        print(f"next: {step}")
    return EXIT_OK


def cmd_accounts_import(args: argparse.Namespace) -> int:
    from bridge.accounts import import_accounts
    from cloud.db import Database

    dsn, _origin = current_database(args)
    secret = options.peer_secret(args)

    async def import_all(reactor: Any, stop_signal: Any) -> tuple[Any, bool]:
        """The counts, and whether Ctrl-C/SIGTERM stopped the import before the end."""
        db = Database(reactor, dsn, max_connections=2)
        db.startService()
        try:
            peer = await connect_login_server(reactor, args.legacy, secret)
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
        return counts, stop_signal.called

    runtime.log_to_stderr()
    result, interrupted = runtime.run_until_stopped(import_all)
    counts = result.to_json()
    if args.json:
        print(json.dumps(counts, sort_keys=True))
    else:
        print_summary({k: v for k, v in counts.items() if k != "conflict_handles"}, False)
        if counts["conflict_handles"]:
            print("conflicts (handle owned by a cloud-native account): "
                  + ", ".join(counts["conflict_handles"]))
    if interrupted:
        raise RuntimeFailure("interrupted; run it again to finish")
    return EXIT_OK
