"""``bridgectl control pause|resume|set|show``: steer live bridge workers and reconcile runs
without a restart (gh-ost's throttle and postpone, for this migration), audited.

The controls live in the store (``cloud.store.controls``): every bridge worker reads them on
its heartbeat and follows within one (``bridge.worker``), every reconcile run when it starts
and every few seconds while it runs (``reconcilers.runner``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bridgectl import options
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_OK, UsageError

MAX_REASON = 1000
#: What ``control pause`` and ``resume`` take, and what each pauses.
TARGETS = {"injection": "cloud -> legacy injection: the bridge workers' outbox injectors "
                        "claim nothing (injections in flight finish)",
           "reconcilers": "reconcile runs: a run refuses to start (exit 5), one running "
                          "stops at its next check with its progress saved"}
#: What ``control set`` takes.
SETTINGS = ("injector-concurrency",)


def add_commands(sub: Any) -> None:
    csub = options.add_group(
        sub, "control", help="pause or resume injection or the reconcilers, set the injector's "
                             "concurrency, live",
        description="Runtime controls, without restarts: stored in the cloud store, read by "
                    "every bridge worker on its heartbeat (so live workers follow within one "
                    "heartbeat) and by every reconcile run, shown by status and the status "
                    "page, written to the audit log.")
    pause = csub.add_parser(
        "pause", help="pause injection into legacy, or the reconcilers",
        description="Pause TARGET: injection (the bridge workers claim no outbox row; "
                    "injections in flight finish; messages to legacy wait in the outbox) "
                    "or reconcilers (reconcile runs refuse to start with exit 5; a run "
                    "in progress stops at its next check, its progress saved). Refused "
                    "(exit 2, nothing changed) when TARGET is paused already.")
    pause.add_argument("target", metavar="TARGET", choices=tuple(TARGETS),
                       help="injection or reconcilers")
    pause.add_argument("--reason", metavar="TEXT",
                       help="why, for status and the audit log (at most 1000 characters)")
    resume = csub.add_parser(
        "resume", help="resume what was paused",
        description="End the pause of TARGET; the workers claim again within one heartbeat, "
                    "reconcile runs start again. Refused (exit 2, nothing changed) when "
                    "TARGET is not paused.")
    resume.add_argument("target", metavar="TARGET", choices=tuple(TARGETS),
                        help="injection or reconcilers")
    set_ = csub.add_parser(
        "set", help="set the outbox injector's concurrency on every worker",
        description="Set SETTING to VALUE. injector-concurrency: the most injections into "
                    "legacy each bridge worker keeps in flight at once (its injector's "
                    "window, InjectorConfig.window, default 1000); 1 to 100000, or default "
                    "for each worker's configured window. Live workers apply it within one "
                    "heartbeat: a raise sends more at once, a cut lets fewer start as the "
                    "answers come in.")
    set_.add_argument("setting", metavar="SETTING", choices=SETTINGS,
                      help="injector-concurrency")
    set_.add_argument("value", metavar="VALUE", type=_concurrency,
                      help="a whole number from 1 to 100000, or default")
    for sp, handler, who in ((pause, cmd_control_pause, "who pauses it"),
                             (resume, cmd_control_resume, "who resumes it"),
                             (set_, cmd_control_set, "who sets it")):
        options.add_dsn_option(sp)
        sp.add_argument("--actor", metavar="NAME",
                        help=f"{who}, for the audit log (default: OS user)")
        sp.add_argument("--dry-run", action="store_true",
                        help="say what would change; change nothing")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.set_defaults(handler=handler)
    show = csub.add_parser(
        "show", help="the controls as set, and as each live worker applies them",
        description="The pauses that are on (who, when, why), the injector's concurrency "
                    "as set, and how each live bridge worker applied them on its last "
                    "heartbeat.")
    options.add_dsn_option(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=cmd_control_show)


def _concurrency(text: str) -> int | None:
    """``default`` (None) or a whole number within the store's bounds."""
    from cloud.store.controls import MAX_CONCURRENCY, MIN_CONCURRENCY

    if text == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number (or default)") from None
    if not MIN_CONCURRENCY <= value <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(
            f"{value} is not from {MIN_CONCURRENCY} to {MAX_CONCURRENCY}")
    return value


def cmd_control_pause(args: argparse.Namespace) -> int:
    from cloud.store import controls as controls_store

    reason = (args.reason or "").strip()
    if len(reason) > MAX_REASON:
        raise UsageError(f"--reason must be at most {MAX_REASON} characters")
    actor = options.actor(args)
    now_ms = int(time.time() * 1000)

    def check(current: Any) -> Any:
        held = current.paused(args.target)
        if held is not None:
            raise UsageError(f"{args.target} is already paused by {held.set_by}"
                             + (f": {held.reason}" if held.reason else ""))
        return controls_store.Pause(args.target, reason, actor, now_ms)

    pause = _change(args, "pause", check, lambda conn: controls_store.pause(
        conn, args.target, reason=reason, actor=actor, now_ms=now_ms))
    if args.json:
        return _print_json(args, {"target": args.target, "paused": True,
                                  "pause": pause.to_json(now_ms)})
    print(f"{args.target} {'would be' if args.dry_run else 'is now'} paused by {actor}"
          + (f": {reason}" if reason else ""))
    if args.target == "injection":
        print("next: live bridge workers stop claiming outbox rows within one heartbeat "
              "(`bridgectl control show` says which did); messages to legacy wait in the "
              "outbox, and the gate outbox_flowing holds promotions once the oldest waits "
              "past its bound; `bridgectl control resume injection` lets them go")
    else:
        print("next: reconcile runs now exit 5 at start, and one running stops at its next "
              "check (its progress saved); `bridgectl control resume reconcilers` lets them "
              "run again (the gate recent_clean_reconcile needs a clean run)")
    return EXIT_OK


def cmd_control_resume(args: argparse.Namespace) -> int:
    from cloud.store import controls as controls_store

    actor = options.actor(args)
    now_ms = int(time.time() * 1000)

    def check(current: Any) -> Any:
        held = current.paused(args.target)
        if held is None:
            raise UsageError(f"{args.target} is not paused")
        return held

    ended = _change(args, "resume", check, lambda conn: controls_store.resume(
        conn, args.target, actor=actor, now_ms=now_ms))
    if args.json:
        return _print_json(args, {"target": args.target, "paused": False,
                                  "ended": ended.to_json(now_ms)})
    print(f"{args.target} {'would be' if args.dry_run else 'is'} resumed (paused by "
          f"{ended.set_by} {max(0, now_ms - ended.set_ms) // 1000} s ago"
          + (f": {ended.reason})" if ended.reason else ")"))
    print("next: " + ("live bridge workers claim again within one heartbeat; `bridgectl "
                      "status` shows the outbox draining" if args.target == "injection"
                      else "the next reconcile run starts (an interrupted one resumes)"))
    return EXIT_OK


def cmd_control_set(args: argparse.Namespace) -> int:
    from cloud.store import controls as controls_store

    actor = options.actor(args)
    now_ms = int(time.time() * 1000)

    def check(current: Any) -> Any:
        before = current.injector_concurrency
        same = (before is None if args.value is None
                else before is not None and before.value == args.value)
        after = (before if same else None if args.value is None
                 else controls_store.Setting(args.value, actor, now_ms))
        return before, after

    before, after = _change(args, "set", check, lambda conn: (
        controls_store.set_injector_concurrency(conn, args.value, actor=actor, now_ms=now_ms)))
    changed = before != after

    def shown(setting: Any) -> Any:
        return None if setting is None else setting.value

    if args.json:
        return _print_json(args, {"setting": args.setting, "from": shown(before),
                                  "to": shown(after)}, changed=changed)
    old = "the configured window" if before is None else before.value
    new = "the configured window" if after is None else after.value
    if not changed:
        print(f"injector concurrency is {new} already; nothing to change")
        return EXIT_OK
    print(f"injector concurrency {'would go' if args.dry_run else 'set'} from {old} to {new}")
    print("next: live bridge workers apply it within one heartbeat; `bridgectl control show` "
          "says each worker's window, bridge_injector_concurrency charts it")
    return EXIT_OK


def cmd_control_show(args: argparse.Namespace) -> int:
    from bridge.ops.status import render_controls
    from cloud import admin
    from cloud.db import run_transaction
    from cloud.store import controls as controls_store

    now_ms = int(time.time() * 1000)
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        controls = run_transaction(conn, "read_runtime_controls",
                                   controls_store.read_runtime_controls)
        live = run_transaction(conn, "live_workers", admin.live_workers, now_ms)
    workers = [{"worker_id": w.worker_id, "heartbeat_age_ms": now_ms - w.heartbeat_ms,
                "injection": w.detail.get("injection")} for w in live]
    if args.json:
        print(json.dumps({**controls.to_json(now_ms), "workers": workers}, sort_keys=True))
        return EXIT_OK
    print("controls: " + render_controls(controls.to_json(now_ms)))
    print(f"live workers: {len(workers)}")
    for w in workers:
        got = w["injection"]
        applied = ("no injector" if got is None else
                   f"injection {'PAUSED' if got['paused'] else 'on'}, window {got['window']}")
        print(f"  {w['worker_id']:<20} {applied} (heartbeat {w['heartbeat_age_ms'] // 1000} s "
              "ago)")
    return EXIT_OK


def _change(args: argparse.Namespace, verb: str, check: Any, change: Any) -> Any:
    """Run *change* in one transaction (``Conflict``: a usage error, nothing changed), or,
    with --dry-run, *check* the controls as they are: what would result, or a UsageError
    where the real command would be refused."""
    from cloud.db import run_transaction
    from cloud.store import controls as controls_store
    from cloud.store.errors import Conflict

    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        if args.dry_run:
            return check(run_transaction(conn, "read_runtime_controls",
                                         controls_store.read_runtime_controls))
        try:
            return run_transaction(conn, f"control_{verb}", change)
        except Conflict as e:
            raise UsageError(str(e)) from None


def _print_json(args: argparse.Namespace, body: dict[str, Any], *,
                changed: bool = True) -> int:
    print(json.dumps({**body, "dry_run": args.dry_run,
                      "changed": changed and not args.dry_run}, sort_keys=True))
    return EXIT_OK
