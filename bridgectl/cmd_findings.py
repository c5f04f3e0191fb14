"""``bridgectl findings list|show|resolve|dismiss``: what holds an account, one finding in
full, and closing one after a look (repaired by hand, or let go), audited."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from bridgectl import options
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_OK, UsageError

MAX_TEXT = 1000


def add_commands(sub: Any) -> None:
    fsub = options.add_group(
        sub, "findings", help="reconcile findings: what holds an account, closing one",
        description="List the reconcile findings that hold accounts' promotions, show one "
                    "in full, or close one after a look: resolve (repaired by hand) or "
                    "dismiss (let go). Closing is recorded in the audit log.")
    ls = fsub.add_parser(
        "list", help="open and failed findings, or those matching the filters",
        description="Findings newest first: open and failed ones (those the migration gates "
                    "count) unless --state says otherwise; with --account, those holding "
                    "that account: about it, a conversation it is in, or the home supernode "
                    "of one (a feed gap); with --conversation, those about it or its home "
                    "supernode. Filters combine.")
    options.add_dsn_option(ls)
    ls.add_argument("--kind", metavar="K",
                    help="only findings of this kind (e.g. feed_gap, inject_failed)")
    ls.add_argument("--state", metavar="S",
                    help="only findings in this state: open, repaired, failed, "
                         "unrecoverable, dismissed (default: open and failed)")
    ls.add_argument("--account", metavar="REF", help="a handle or account id")
    ls.add_argument("--conversation", metavar="ID", help="a conversation id (a UUID)")
    ls.add_argument("--limit", type=options.non_negative_int, default=100, metavar="N",
                    help="show at most N findings (default 100)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=cmd_findings_list)

    show = fsub.add_parser(
        "show", help="one finding in full, with what operators did to it",
        description="Every field of one finding (its detail in full) and its audit_log "
                    "rows. Exit 2 for a finding that does not exist.")
    options.add_dsn_option(show)
    show.add_argument("finding_id", metavar="FINDING_ID", type=options.non_negative_int,
                      help="the finding's id")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=cmd_findings_show)

    for name, handler, flag, text_help, help_, description in (
            ("resolve", cmd_findings_resolve, "--note",
             "what was done to repair it, for the audit log",
             "mark an open or failed finding repaired by an operator (audited)",
             "Mark an open or failed finding repaired: the divergence was fixed by hand. Who "
             "and the note go into its detail and an audit_log row (finding_resolved). It "
             "then holds no account, but a finding about messages still asks for a clean "
             "compare of its conversation after it. Refused (exit 2, nothing changed) for "
             "a finding that does not exist or is no longer open or failed."),
            ("dismiss", cmd_findings_dismiss, "--reason",
             "why it may be let go, for the audit log",
             "let an open or failed finding go (audited)",
             "Mark an open or failed finding dismissed, with who and why, and write an "
             "audit_log row (finding_dismissed). It then holds no account. Refused (exit 2, "
             "nothing changed) for a finding that does not exist or is no longer open or "
             "failed.")):
        sp = fsub.add_parser(name, help=help_, description=description)
        options.add_dsn_option(sp)
        sp.add_argument("finding_id", metavar="FINDING_ID", type=options.non_negative_int,
                        help="the finding's id (findings list, status, the gate's reason)")
        flags = (flag, "--why") if name == "dismiss" else (flag,)  # --why: the old name
        sp.add_argument(*flags, dest="text", required=True, metavar="TEXT", help=text_help)
        sp.add_argument("--actor", metavar="NAME",
                        help=f"who {'resolves' if name == 'resolve' else 'dismisses'} it, "
                             "for the audit log (default: OS user)")
        sp.add_argument("--dry-run", action="store_true",
                        help="check it would be accepted; change nothing")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.set_defaults(handler=handler, text_flag=flag)


def _uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise UsageError(f"{what} must be a UUID, not {text!r}") from None


def cmd_findings_list(args: argparse.Namespace) -> int:
    from bridge import gates
    from cloud import admin
    from cloud.db import run_transaction
    from cloud.store import findings as findings_store

    if args.kind is not None and args.kind not in findings_store.FINDING_KINDS:
        raise UsageError(f"unknown finding kind {args.kind!r}: use one of "
                         f"{', '.join(findings_store.FINDING_KINDS)}")
    if args.state is not None and args.state not in findings_store.FINDING_STATES:
        raise UsageError(f"unknown finding state {args.state!r}: use one of "
                         f"{', '.join(findings_store.FINDING_STATES)}")
    conversation_id = (None if args.conversation is None
                       else _uuid(args.conversation, "--conversation"))
    states = findings_store.HOLDING_STATES if args.state is None else (args.state,)
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
        if conversation_id is not None and run_transaction(
                conn, "find_conversation", lambda c: c.execute(
                    "SELECT 1 FROM conversations WHERE conversation_id = %s",
                    (conversation_id,)).fetchone()) is None:
            raise UsageError(f"unknown conversation: {args.conversation}")
        rows = run_transaction(conn, "list_findings", gates.finding_rows, states=states,
                               kind=args.kind, account_id=account_id,
                               conversation_id=conversation_id, limit=args.limit)
    if args.json:
        print(json.dumps({"findings": rows}, sort_keys=True))
        return EXIT_OK
    for r in rows:
        about = r["conversation_id"] or r["account_id"] or f"supernode {r['source']}"
        age = max(0, now - r["created_ms"]) // 1000
        print(f"{r['finding_id']:>8}  {r['state']:<7} {r['kind']:<22} {age:>8} s ago  "
              f"{about}  {json.dumps(r['detail'], sort_keys=True)[:200]}")
    which = [f"state {args.state}" if args.state else "open or failed"]
    which += [f"{flag} {v}" for flag, v in (("kind", args.kind), ("holding", args.account),
                                            ("conversation", args.conversation)) if v]
    print(f"{len(rows)} finding{'s' * (len(rows) != 1)} {', '.join(which)}")
    if rows and args.state is None:
        print("next: `bridgectl findings show ID`; once dealt with, `findings resolve ID "
              "--note TEXT` (repaired by hand) or `findings dismiss ID --reason TEXT`")
    return EXIT_OK


def cmd_findings_show(args: argparse.Namespace) -> int:
    from cloud.db import run_transaction
    from cloud.store import findings as findings_store

    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        got = run_transaction(conn, "show_finding", findings_store.finding_detail,
                              args.finding_id)
    if got is None:
        raise UsageError(f"no finding {args.finding_id}")
    if args.json:
        print(json.dumps(got, sort_keys=True))
        return EXIT_OK
    about = got["conversation_id"] or got["account_id"] or f"supernode {got['source']}"
    lines = [f"finding {got['finding_id']}: {got['kind']}, {got['state']}",
             f"about:       {about}",
             f"conversation {got['conversation_id'] or '-'}, account {got['account_id'] or '-'}"
             f", supernode {got['source'] or '-'}",
             f"created_ms:  {got['created_ms']}  resolved_ms: {got['resolved_ms'] or '-'}  "
             f"run: {got['run_id'] or '-'}",
             "detail:      " + json.dumps(got["detail"], sort_keys=True, indent=2)
             .replace("\n", "\n             ")]
    for h in got["history"]:
        lines.append(f"  {h['at_ms']}  {h['actor']}  {h['action']}  "
                     f"{json.dumps(h['detail'], sort_keys=True)}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_findings_resolve(args: argparse.Namespace) -> int:
    from cloud.store import findings as findings_store

    return _close(args, "resolved", "repaired", findings_store.resolve_finding, "note")


def cmd_findings_dismiss(args: argparse.Namespace) -> int:
    from cloud.store import findings as findings_store

    return _close(args, "dismissed", "dismissed", findings_store.dismiss_finding, "why")


def _close(args: argparse.Namespace, verb: str, to_state: str, close: Any,
           keyword: str) -> int:
    """Close one finding by an operator in one transaction (or, with --dry-run, check the
    store would accept it), then print what happened."""
    from cloud.db import run_transaction
    from cloud.store import findings as findings_store
    from cloud.store.errors import Conflict, NotFound

    text = args.text.strip()
    if not text or len(text) > MAX_TEXT:
        what = "why" if verb == "dismissed" else "what was done"
        raise UsageError(f"{args.text_flag} must say {what}, in at most {MAX_TEXT} characters")
    actor = options.actor(args)
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        if args.dry_run:
            got = run_transaction(conn, "show_finding", findings_store.finding_detail,
                                  args.finding_id)
            if got is None:
                raise UsageError(f"no finding {args.finding_id}")
            if got["state"] not in findings_store.HOLDING_STATES:
                raise UsageError(f"finding {args.finding_id} is {got['state']}, "
                                 "not open or failed")
            was = got["state"]
        else:
            try:
                was = run_transaction(conn, f"{verb}_finding", close, args.finding_id,
                                      actor=actor, now_ms=int(time.time() * 1000),
                                      **{keyword: text})
            except (NotFound, Conflict) as e:
                raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"finding_id": args.finding_id, "was": was, "state": to_state,
                          "actor": actor, "dry_run": args.dry_run,
                          "changed": not args.dry_run}, sort_keys=True))
        return EXIT_OK
    print(f"finding {args.finding_id} {'would be ' if args.dry_run else ''}{verb} "
          f"(was {was}) by {actor}")
    return EXIT_OK
