"""``bridgectl accounts import``: link every legacy account to a cloud account."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bridgectl import options, runtime
from bridgectl.database import current_database
from bridgectl.errors import EXIT_OK, RuntimeFailure
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
