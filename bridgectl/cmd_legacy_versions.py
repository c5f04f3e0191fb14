"""``bridgectl legacy versions`` and ``bridgectl legacy min-version``: which client versions
log in to the legacy login server, and the oldest it still lets in.

The login server holds the rules in memory (``legacy.login``); the cloud store keeps the
durable copy (``operator_controls`` row ``legacy_min_versions``, every change audited). A
change is sent to the login server first and written to the store only when it was applied,
so the store never claims a rule the login server refused. After a login server restart the
bridge workers send the stored rules again by themselves (``bridge.min_versions``, within
about ten seconds); ``min-version --reapply`` does it at once, and also clears rules the
login server holds that are not stored.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bridgectl import options, runtime
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_OK, UsageError
from bridgectl.peers import connect_login_server

NEEDS_LEGACY = "pass --legacy HOST:PORT (the login server that applies the rule)"


def add_commands(lsub: Any) -> None:
    ver = lsub.add_parser(
        "versions", help="client versions logging in to the login server, and its minimums",
        description="Ask the legacy login server (as a privileged peer) which client "
                    "versions its logins reported since it started: logins per version, and "
                    "handles whose latest login reported it (version 0: an old client that "
                    "reports none); and the minimum-version rules it holds now.")
    ver.add_argument("--legacy", required=True, metavar="HOST:PORT", type=options.host_port,
                     help="the legacy login server")
    options.add_peer_secret_option(ver)
    ver.add_argument("--json", action="store_true", help="print one JSON object")
    ver.set_defaults(handler=cmd_legacy_versions)

    mv = lsub.add_parser(
        "min-version", help="refuse legacy clients older than VERSION (upgrade_required)",
        description="Make the legacy login server refuse logins from clients older than "
                    "VERSION (dotted numbers, e.g. 8.0) with error upgrade_required and an "
                    "upgrade message; simulated clients stop trying. Without --cohort the "
                    "rule holds for everyone; with it, for that cohort's members only (the "
                    "highest rule that applies to a handle wins). --clear removes the rule. "
                    "The login server is told first, then the rule is stored in the cloud "
                    "store and audited. After a login server restart the bridge workers "
                    "send the stored rules again by themselves; --reapply does it at once "
                    "and clears rules the store does not have. With none of VERSION, "
                    "--clear or --reapply it shows the stored rules.")
    mv.add_argument("version", nargs="?", metavar="VERSION",
                    help="the oldest client version still let in")
    mv.add_argument("--cohort", metavar="NAME",
                    help="hold only this cohort's members to it (default: everyone)")
    mv.add_argument("--clear", action="store_true",
                    help="remove the rule (for everyone, or the --cohort's)")
    mv.add_argument("--reapply", action="store_true",
                    help="send every stored rule to the login server at once, and clear the "
                         "ones it holds that are not stored (the bridge workers send missing "
                         "ones by themselves)")
    mv.add_argument("--legacy", metavar="HOST:PORT", type=options.host_port,
                    help="the legacy login server (needed to change or reapply rules)")
    options.add_peer_secret_option(mv)
    options.add_dsn_option(mv)
    mv.add_argument("--actor", metavar="NAME",
                    help="who changes it, for the audit log (default: OS user)")
    mv.add_argument("--dry-run", action="store_true",
                    help="say what would change; change nothing")
    mv.add_argument("--json", action="store_true", help="print one JSON object")
    mv.set_defaults(handler=cmd_legacy_min_version)


# -- versions -----------------------------------------------------------------------------------

def cmd_legacy_versions(args: argparse.Namespace) -> int:
    secret = options.peer_secret(args)

    async def ask(reactor: Any, _stop: Any) -> Any:
        peer = await connect_login_server(reactor, args.legacy, secret)
        try:
            return await peer.versions()
        finally:
            peer.disconnect()

    runtime.log_to_stderr()
    reply = runtime.run_until_stopped(ask)
    result = {"versions": [{"version": v.version, "logins": v.logins, "handles": v.handles}
                           for v in reply.versions],
              "rules": [{"cohort": r.cohort or None, "version": r.version,
                         "handles": r.handles} for r in reply.rules]}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    total = sum(v["handles"] for v in result["versions"]) or 1
    print(f"{'version':<12} {'logins':>8} {'handles':>8} {'share':>6}")
    for v in result["versions"]:
        name = v["version"] + (" (none)" if v["version"] == "0" else "")
        print(f"{name:<12} {v['logins']:>8} {v['handles']:>8} "
              f"{100 * v['handles'] / total:>5.1f}%")
    if not result["versions"]:
        print("(no logins since the login server started)")
    for r in result["rules"]:
        who = f"cohort {r['cohort']} ({r['handles']} handles)" if r["cohort"] else "everyone"
        print(f"minimum {r['version']} for {who}")
    if not result["rules"]:
        print("no minimum version: every client version is let in")
    return EXIT_OK


# -- min-version --------------------------------------------------------------------------------

def cmd_legacy_min_version(args: argparse.Namespace) -> int:
    from legacy.versions import normalize

    modes = [m for m, on in (("VERSION", args.version is not None), ("--clear", args.clear),
                             ("--reapply", args.reapply)) if on]
    if len(modes) > 1:
        raise UsageError(f"give one of {' and '.join(modes)}")
    if args.reapply and args.cohort is not None:
        raise UsageError("--reapply sends every stored rule: it takes no --cohort")
    version = None
    if args.version is not None:
        try:
            version = normalize(args.version)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not modes:
        return _show(args)
    actor = options.actor(args)
    if args.legacy is None and not args.dry_run:
        raise UsageError(NEEDS_LEGACY)
    if args.reapply:
        return _reapply(args, actor)
    return _change(args, version, actor)


def _show(args: argparse.Namespace) -> int:
    from cloud.db import run_transaction
    from cloud.store import controls as controls_store

    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        rules = run_transaction(conn, "read_min_versions", controls_store.read_min_versions)
    if args.json:
        print(json.dumps({"rules": [r.to_json() for r in rules]}, sort_keys=True))
        return EXIT_OK
    for r in rules:
        print(f"minimum {r.version} for {_who(r.cohort)} (set by {r.set_by})")
    if not rules:
        print("no minimum version stored: every client version is let in")
    return EXIT_OK


def _who(cohort: str) -> str:
    return f"cohort {cohort}" if cohort else "everyone"


def _members(conn: Any, cohort: str) -> tuple[str, ...]:
    """The legacy handles of *cohort*'s members; a usage error for an unknown cohort."""
    from bridge.min_versions import cohort_handles

    handles = cohort_handles(conn, cohort)
    if handles is None:
        raise UsageError(f"unknown cohort: {cohort!r}")
    return handles


def _send(args: argparse.Namespace, rules: list[tuple[str, str, tuple]], *,
          clear_others: bool = False) -> list[str]:
    """``send_rules`` to the login server ``--legacy`` names, on the reactor."""
    from bridge.min_versions import send_rules

    secret = options.peer_secret(args)

    async def send(reactor: Any, _stop: Any) -> list[str]:
        peer = await connect_login_server(reactor, args.legacy, secret)
        try:
            return await send_rules(peer, rules, clear_others=clear_others)
        finally:
            peer.disconnect()

    runtime.log_to_stderr()
    return runtime.run_until_stopped(send)


def _change(args: argparse.Namespace, version: str | None, actor: str) -> int:
    from cloud.db import run_transaction
    from cloud.store import controls as controls_store

    cohort = args.cohort or ""
    if args.cohort is not None and not cohort.strip():
        raise UsageError("--cohort needs a cohort name")
    now_ms = int(time.time() * 1000)
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        handles = (run_transaction(conn, "cohort_members", lambda c: _members(c, cohort))
                   if cohort else ())
        rules = {r.cohort: r for r in run_transaction(
            conn, "read_min_versions", controls_store.read_min_versions)}
        before = rules.get(cohort)
        if args.dry_run:
            changed = False
        else:
            _send(args, [(cohort, version or "", handles)])
            _before, after = run_transaction(
                conn, "set_min_version", lambda c: controls_store.set_min_version(
                    c, cohort, version, actor=actor, now_ms=now_ms))
            changed = _before != after
    result = {"cohort": cohort or None, "version": version,
              "before": None if before is None else before.version,
              "handles": len(handles), "dry_run": args.dry_run, "changed": changed,
              "login_server": None if args.dry_run else "applied"}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    who = _who(cohort) + (f" ({len(handles)} handles)" if cohort else "")
    would = "would be" if args.dry_run else "is now"
    if version is None:
        print(f"minimum version for {who} {would} cleared (was "
              f"{'none' if before is None else before.version})")
    else:
        print(f"minimum version for {who} {would} {version} (was "
              f"{'none' if before is None else before.version})")
    if not args.dry_run:
        print("next: `bridgectl legacy versions --legacy HOST:PORT` shows who still logs in "
              "with what; refusals count in legacy_logins_total{result=\"upgrade_required\"}")
    return EXIT_OK


def _reapply(args: argparse.Namespace, actor: str) -> int:
    from cloud.db import run_transaction
    from cloud.store import controls as controls_store

    now_ms = int(time.time() * 1000)
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        stored = run_transaction(conn, "read_min_versions", controls_store.read_min_versions)
        rules = [(r.cohort, r.version,
                  run_transaction(conn, "cohort_members", lambda c, r=r: _members(c, r.cohort))
                  if r.cohort else ()) for r in stored]
        cleared: list[str] = []
        if not args.dry_run:
            cleared = _send(args, rules, clear_others=True)
            run_transaction(conn, "audit_reapply", lambda c: controls_store.audit_min_version(
                c, "legacy_min_version_reapplied", "", actor, now_ms,
                {"rules": {co: v for co, v, _h in rules}, "cleared": cleared}))
    result = {"rules": [{"cohort": c or None, "version": v, "handles": len(h)}
                        for c, v, h in rules],
              "cleared": [c or None for c in cleared],
              "dry_run": args.dry_run, "changed": not args.dry_run}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    verb = "would send" if args.dry_run else "sent"
    for c, v, h in rules:
        print(f"{verb} minimum {v} for {_who(c)}" + (f" ({len(h)} handles)" if c else ""))
    if not rules:
        print(f"no stored rule; {verb} nothing")
    for c in cleared:
        print(f"cleared the login server's rule for {_who(c)} (not stored)")
    return EXIT_OK
