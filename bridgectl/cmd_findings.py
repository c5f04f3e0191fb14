"""``bridgectl findings list`` and ``bridgectl findings dismiss``: what holds an account, and
letting a finding go after a look (audited)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bridgectl import options
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_OK, UsageError


def add_commands(sub: Any) -> None:
    fsub = options.add_group(
        sub, "findings", help="reconcile findings: what holds an account, dismissing one",
        description="List the reconcile findings that hold accounts' promotions, or dismiss "
                    "one after a look (recorded in the audit log).")
    ls = fsub.add_parser(
        "list", help="open and failed findings, or those holding one account",
        description="Open and failed findings (the ones the migration gates count), newest "
                    "first; with --account, those holding that account: about it, a "
                    "conversation it is in, or the home supernode of one (a feed gap).")
    options.add_dsn_option(ls)
    ls.add_argument("--account", metavar="REF", help="a handle or account id")
    ls.add_argument("--limit", type=options.non_negative_int, default=100, metavar="N",
                    help="show at most N findings (default 100)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=cmd_findings_list)
    dis = fsub.add_parser(
        "dismiss", help="let an open or failed finding go (audited)",
        description="Mark an open or failed finding dismissed, with who and why, and write an "
                    "audit_log row. It then holds no account. Refused (exit 2, nothing "
                    "changed) for a finding that does not exist or is no longer open or "
                    "failed.")
    options.add_dsn_option(dis)
    dis.add_argument("finding_id", metavar="FINDING_ID", type=options.non_negative_int,
                     help="the finding's id (findings list, status, the gate's reason)")
    dis.add_argument("--why", required=True, metavar="TEXT",
                     help="why it may be let go, for the audit log")
    dis.add_argument("--actor", metavar="NAME",
                     help="who dismisses it, for the audit log (default: OS user)")
    dis.set_defaults(handler=cmd_findings_dismiss)


def cmd_findings_list(args: argparse.Namespace) -> int:
    from bridge import gates
    from cloud import admin
    from cloud.db import run_transaction

    now = int(time.time() * 1000)
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        account_id = None
        if args.account is not None:
            found, unknown = run_transaction(conn, "find_accounts", admin.find_accounts,
                                             [args.account])
            if unknown:
                raise UsageError(f"unknown account: {args.account!r}")
            account_id = found[0].account_id
        rows = run_transaction(conn, "holding_findings", gates.holding_finding_rows,
                               account_id, args.limit)
    if args.json:
        print(json.dumps({"findings": rows}, sort_keys=True))
        return EXIT_OK
    for r in rows:
        about = r["conversation_id"] or r["account_id"] or f"supernode {r['source']}"
        age = max(0, now - r["created_ms"]) // 1000
        print(f"{r['finding_id']:>8}  {r['state']:<7} {r['kind']:<22} {age:>8} s ago  "
              f"{about}  {json.dumps(r['detail'], sort_keys=True)[:200]}")
    print(f"{len(rows)} finding{'s' * (len(rows) != 1)}"
          + (f" holding {args.account}" if args.account else " open or failed"))
    return EXIT_OK


def cmd_findings_dismiss(args: argparse.Namespace) -> int:
    from cloud.db import run_transaction
    from cloud.store import findings as findings_store
    from cloud.store.errors import Conflict, NotFound

    actor = options.actor(args)
    why = args.why.strip()
    if not why or len(why) > 1000:
        raise UsageError("--why must say why, in at most 1000 characters")
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        try:
            was = run_transaction(conn, "dismiss_finding", findings_store.dismiss_finding,
                                  args.finding_id, actor=actor, why=why,
                                  now_ms=int(time.time() * 1000))
        except (NotFound, Conflict) as e:
            raise UsageError(str(e)) from None
    print(f"finding {args.finding_id} dismissed (was {was}) by {actor}")
    return EXIT_OK
