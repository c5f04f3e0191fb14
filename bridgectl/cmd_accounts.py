"""``bridgectl accounts import``: link every legacy account to a cloud account.
``bridgectl accounts show``: one account's migration: phase history, what holds it, its
cohorts, and what was mirrored for it lately.
``bridgectl accounts recovery-code``: a one-time code for ``POST /v1/recover`` (audited)."""

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

    rec = asub.add_parser(
        "recovery-code", help="issue a one-time account recovery code (printed once)",
        description="Issue a one-time recovery code for HANDLE's account, standing in for "
                    "the e-mail a real service would send. The code is printed once and "
                    "stored only as a salted hash; it expires after --ttl and works once, "
                    "with POST /v1/recover {handle, code, new_password}, which sets the new "
                    "password on the cloud and, through the bridge, on the legacy login "
                    "server. A new code replaces an earlier unused one. Audited "
                    "(recovery_code_issued). Exit 2 for an unknown handle.")
    rec.add_argument("handle", metavar="HANDLE", help="the account's handle")
    options.add_dsn_option(rec)
    rec.add_argument("--ttl", type=options.duration_ms, default="1h", metavar="DURATION",
                     help="how long the code works, e.g. 30m, 1h, 2d (default 1h, at most 7d)")
    rec.add_argument("--actor", metavar="NAME",
                     help="who issues it, for the audit log (default: OS user)")
    rec.add_argument("--dry-run", action="store_true",
                     help="check the handle and say what would happen; issue nothing")
    rec.add_argument("--json", action="store_true", help="print one JSON object")
    rec.set_defaults(handler=cmd_accounts_recovery_code)


def cmd_accounts_recovery_code(args: argparse.Namespace) -> int:
    import time

    from cloud import recovery
    from cloud.db import run_transaction
    from cloud.store import recovery as recovery_store
    from cloud.store.errors import NotFound

    if args.ttl > recovery.MAX_TTL_S * 1000:
        raise UsageError(f"--ttl must be at most {recovery.MAX_TTL_S // 86400} days")
    actor = options.actor(args)
    now_ms = int(time.time() * 1000)
    expires_ms = now_ms + args.ttl
    dsn, origin = current_database(args)
    code = None
    with connect(dsn, origin) as conn:
        if args.dry_run:
            row = run_transaction(conn, "recovery_code_for_handle",
                                  recovery_store.code_for_handle, args.handle)
            if row is None:
                raise UsageError(f"unknown account: {args.handle!r}")
            replaced = (row.code_hash is not None and row.used_ms is None
                        and row.expires_ms > now_ms)
        else:
            code = recovery.new_code()
            try:
                row, replaced = run_transaction(
                    conn, "issue_recovery_code", recovery_store.issue_code, args.handle,
                    recovery.hash_code(code), now_ms=now_ms, expires_ms=expires_ms,
                    actor=actor)
            except NotFound:
                raise UsageError(f"unknown account: {args.handle!r}") from None
    result = {"handle": row.handle, "account_id": str(row.account_id), "code": code,
              "expires_ms": expires_ms, "ttl_s": args.ttl // 1000,
              "replaced_unused": replaced, "linked_legacy": row.legacy_handle is not None,
              "dry_run": args.dry_run, "changed": not args.dry_run}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    if args.dry_run:
        print(f"would issue a recovery code for {row.handle} (account {row.account_id}), "
              f"valid {args.ttl // 1000} s" + ("; it would replace an unused one" if replaced
                                               else ""))
        return EXIT_OK
    print(f"recovery code for {row.handle} (account {row.account_id}): {code}")
    print(f"valid {args.ttl // 1000} s, once; shown only now (stored hashed)"
          + ("; the earlier unused code no longer works" if replaced else ""))
    print('next: give it to the user, who sends POST /v1/recover {"handle", "code", '
          '"new_password"}' + ("; the bridge then hands the new password to the legacy "
                               "login server" if row.legacy_handle is not None else ""))
    return EXIT_OK


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
