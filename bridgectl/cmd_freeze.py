"""``bridgectl freeze on`` and ``bridgectl freeze off``: hold every promotion while
something is wrong (the migration gate ``frozen``), audited; backward moves still work."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bridgectl import options
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_OK, UsageError

MAX_REASON = 1000


def add_commands(sub: Any) -> None:
    fsub = options.add_group(
        sub, "freeze", help="hold every promotion (gate frozen), or let them go again",
        description="A deployment-wide freeze of the migration: while it is on, every "
                    "forward move (migrate, cohorts) is held by the gate 'frozen', even with "
                    "--force; backward moves still work. Stored in the cloud store, shown by "
                    "status and the status page, written to the audit log.")
    on = fsub.add_parser(
        "on", help="freeze promotions, saying why",
        description="Freeze every promotion. Refused (exit 2, nothing changed) when "
                    "promotions are frozen already: the message says by whom and why.")
    on.add_argument("--reason", required=True, metavar="TEXT",
                    help="why, for the gate's reason, status and the audit log")
    off = fsub.add_parser(
        "off", help="lift the freeze",
        description="Lift the freeze; promotions go through their other gates again. "
                    "Refused (exit 2, nothing changed) when promotions are not frozen.")
    for sp, handler in ((on, cmd_freeze_on), (off, cmd_freeze_off)):
        options.add_dsn_option(sp)
        sp.add_argument("--actor", metavar="NAME",
                        help="who freezes or lifts it, for the audit log (default: OS user)")
        sp.add_argument("--dry-run", action="store_true",
                        help="say what would change; change nothing")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.set_defaults(handler=handler)


def cmd_freeze_on(args: argparse.Namespace) -> int:
    from cloud.store import controls as controls_store

    reason = args.reason.strip()
    if not reason or len(reason) > MAX_REASON:
        raise UsageError(f"--reason must say why, in at most {MAX_REASON} characters")
    actor = options.actor(args)
    now_ms = int(time.time() * 1000)
    return _change(args, "on", lambda conn: controls_store.freeze_on(
        conn, reason=reason, actor=actor, now_ms=now_ms), now_ms,
        would=controls_store.Freeze(reason, actor, now_ms))


def cmd_freeze_off(args: argparse.Namespace) -> int:
    from cloud.store import controls as controls_store

    actor = options.actor(args)
    now_ms = int(time.time() * 1000)
    return _change(args, "off", lambda conn: controls_store.freeze_off(
        conn, actor=actor, now_ms=now_ms), now_ms, would=None)


def _change(args: argparse.Namespace, to: str, change: Any, now_ms: int, *,
            would: Any) -> int:
    """Run *change* in one transaction (or, with --dry-run, check it would be accepted and
    change nothing), then print what happened and what to do next."""
    from cloud.db import run_transaction
    from cloud.store import controls as controls_store
    from cloud.store.errors import Conflict

    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        current = run_transaction(conn, "read_freeze", controls_store.read_freeze)
        if args.dry_run:
            if (current is None) == (to == "off"):
                raise UsageError(_refusal(to, current))
            freeze = would if to == "on" else current
        else:
            try:
                freeze = run_transaction(conn, f"freeze_{to}", change)
            except Conflict as e:
                raise UsageError(str(e)) from None
    frozen = to == "on"
    result = {"frozen": frozen, "dry_run": args.dry_run, "changed": not args.dry_run,
              ("freeze" if frozen else "ended"): freeze.to_json(now_ms)}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    if frozen:
        print(f"promotions {'would be' if args.dry_run else 'are now'} frozen by "
              f"{freeze.set_by}: {freeze.reason}")
        print("next: backward moves still work; `bridgectl status` shows the freeze; "
              "`bridgectl freeze off` lets promotions through their gates again")
    else:
        print(f"{'the freeze would be lifted' if args.dry_run else 'freeze lifted'} (set by "
              f"{freeze.set_by} {max(0, now_ms - freeze.set_ms) // 1000} s ago: "
              f"{freeze.reason})")
        print("next: `bridgectl migrate --dry-run ...` shows what the gates hold now")
    return EXIT_OK


def _refusal(to: str, current: Any) -> str:
    if to == "on":
        return f"promotions are already frozen by {current.set_by}: {current.reason}"
    return "promotions are not frozen"
