"""``bridgectl cohort create|show|list|advance|reverse|cancel|complete``: named cohorts, a
stored set of accounts moved forward together through the gates and back exactly to where
each member was (``bridge.cohorts``), every change audited, every command with ``--json``
and its next steps, every one that changes state with ``--dry-run``."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bridgectl import cmd_migrate, options
from bridgectl.database import connect, current_database
from bridgectl.errors import EXIT_FAILURE, EXIT_GATED, EXIT_OK, RuntimeFailure, UsageError

DRY_RUN_NEXT = "nothing changed (dry run): run the same command without --dry-run to do it"


def add_commands(sub: Any) -> None:
    from bridge.cohorts import ADVANCE_TARGETS

    csub = options.add_group(
        sub, "cohort", help="named cohorts: create, advance, reverse, complete or cancel",
        description="A named cohort is a stored set of accounts moved forward together, "
                    "through the migration gates, and moved back exactly to where each "
                    "member was before the last advance. An account is in one active "
                    "cohort at a time. Every change is written to the audit log.")
    create = csub.add_parser(
        "create", help="store a named cohort's members",
        description="Store the members of a new cohort: the stable --percent P of linked "
                    "accounts (those in another active cohort are left out, and counted), "
                    "the handles or account ids of --file F (one per line, # comments), or "
                    "--handles H .... Refused (exit 2, nothing written): a bad or taken "
                    "name, unknown accounts (named), accounts in another active cohort, a "
                    "selection of nobody.")
    _name(create)
    create.add_argument("--percent", metavar="P",
                        help="the stable P%% of linked accounts (1-100), as migrate --percent")
    create.add_argument("--file", type=Path, metavar="F",
                        help="handles or account ids, one per line (# starts a comment)")
    create.add_argument("--handles", nargs="+", metavar="H",
                        help="handles (or account ids)")
    _changes(create, "who creates it")
    create.set_defaults(handler=cmd_cohort_create)

    show = csub.add_parser(
        "show", help="a cohort's members per phase, held members and history",
        description="Members per phase now, each advance, the members the gates held on "
                    "the last advance with the gates' reasons, and the cohort's audit rows.")
    _name(show)
    options.add_dsn_option(show)
    show.add_argument("--limit", type=options.non_negative_int, default=50, metavar="N",
                      help="list at most N held members (default 50; all are counted)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=cmd_cohort_show)

    ls = csub.add_parser("list", help="every cohort with its state and counts",
                         description="Every cohort, oldest first: state, members, members "
                                     "per phase, its last advance not reversed.")
    options.add_dsn_option(ls)
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=cmd_cohort_list)

    adv = csub.add_parser(
        "advance", help="move a cohort forward, through the gates",
        description="Move the cohort's members forward to --to PHASE through the gates "
                    "(as migrate; evaluated again as each move is applied). Promote-only: "
                    "a member already at or past PHASE stays. Records each member's phase "
                    "before the advance (what reverse moves it back to) and the gates that "
                    "held members. Exit 0 all moved (or nothing to do), 3 some held, "
                    "1 failure, 2 usage.")
    _name(adv)
    adv.add_argument("--to", required=True, metavar="PHASE",
                     help=f"target phase: {', '.join(ADVANCE_TARGETS)}")
    adv.add_argument("--force", action="store_true",
                     help="move despite failed gates, never past the freeze (gate frozen); "
                          "recorded in the audit log")
    _legacy(adv, "enters")
    cmd_migrate.add_gate_options(adv)
    _changes(adv, "who advances it")
    adv.set_defaults(handler=cmd_cohort_advance)

    for name, handler, help_, description in (
            ("reverse", cmd_cohort_reverse, "move each member back to its phase before the "
             "last advance",
             "Move each member back to the phase it had before the cohort's last advance "
             "(the newest not reversed that moved someone), never forward: a member at or "
             "behind that phase stays. Not gated, not held by a freeze. Leaving cloud-only "
             "queues for legacy, in the move's transaction, what legacy missed. Run again "
             "after a failure, it finishes the same reverse; run again after a success, it "
             "reverses the advance before. Exit 0 done, 1 some member failed, 2 usage."),
            ("cancel", cmd_cohort_cancel, "end a cohort, moving its members back",
             "End the cohort: every member back to its phase before the oldest advance not "
             "reversed (never forward), then the cohort is cancelled. If a member can not be "
             "moved back the cohort stays active (exit 1): run cancel again.")):
        sp = csub.add_parser(name, help=help_, description=description)
        _name(sp)
        _legacy(sp, "leaves")
        cmd_migrate.add_retention_option(sp)
        _changes(sp, f"who {'reverses' if name == 'reverse' else 'cancels'} it")
        sp.set_defaults(handler=handler)

    done = csub.add_parser(
        "complete", help="mark a cohort done: no more advance or reverse",
        description="End the cohort as completed: its members stay where they are, the "
                    "cohort can no longer advance or reverse, and its members may join "
                    "another cohort. Refused for a cohort that moved nobody (cancel it).")
    _name(done)
    _changes(done, "who completes it")
    done.set_defaults(handler=cmd_cohort_complete)


def _name(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", metavar="NAME", help="the cohort's name")


def _legacy(sp: argparse.ArgumentParser, way: str) -> None:
    sp.add_argument("--legacy", metavar="HOST:PORT", type=options.host_port,
                    help=f"the legacy login server; needed when a member {way} cloud-only")


def _changes(sp: argparse.ArgumentParser, who: str) -> None:
    options.add_dsn_option(sp)
    sp.add_argument("--actor", metavar="NAME",
                    help=f"{who}, for the audit log (default: OS user)")
    sp.add_argument("--dry-run", action="store_true",
                    help="print the plan; change nothing")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """A cohort refusal or a store conflict is a usage error: nothing was changed."""
    from bridge.cohorts import CohortRefused
    from cloud.store.errors import Conflict

    try:
        yield
    except (CohortRefused, Conflict) as e:
        raise UsageError(str(e)) from None


@contextlib.contextmanager
def _locked(conn: Any, cohort: Any) -> Iterator[None]:
    """Hold the cohort's advisory lock: one command at a time changes a cohort."""
    import psycopg

    from cloud.store import cohorts as cohorts_store

    if not cohorts_store.try_lock(conn, cohort.cohort_id):
        raise RuntimeFailure(f"another bridgectl cohort command is changing cohort "
                             f"{cohort.name!r} now; nothing changed: run this again when it "
                             "is done")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):  # a broken connection released it anyway
            cohorts_store.unlock(conn, cohort.cohort_id)


def _tx(conn: Any, desc: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from cloud.db import run_transaction

    with _refusals():
        return run_transaction(conn, desc, fn, *args, **kwargs)


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- create, show, list

def _create_selection(args: argparse.Namespace) -> Any:
    from bridge.cohorts import CohortSelection

    given = [f for f, v in (("--percent", args.percent), ("--file", args.file),
                            ("--handles", args.handles)) if v is not None]
    if len(given) != 1:
        raise UsageError("choose the members with exactly one of --percent, --file, "
                         f"--handles{' (got ' + ' and '.join(given) + ')' if given else ''}")
    if args.percent is not None:
        if not args.percent.isdigit() or not 0 < int(args.percent) <= 100:
            raise UsageError(f"--percent must be a whole number from 1 to 100, "
                             f"not {args.percent!r}")
        return CohortSelection(percent=int(args.percent))
    if args.file is not None:
        refs = options.account_file(args.file)
        if not refs:
            raise UsageError(f"--file {args.file} names no account")
        return CohortSelection(refs=refs, file=str(args.file))
    refs = tuple(h.strip() for h in args.handles if h.strip())
    if not refs:
        raise UsageError("--handles names no account")
    return CohortSelection(refs=refs)


def cmd_cohort_create(args: argparse.Namespace) -> int:
    from bridge import cohort_report, cohorts

    with _refusals():
        cohorts.check_name(args.name)
    selection = _create_selection(args)
    actor = options.actor(args)
    now_ms = _now_ms()
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        if args.dry_run:
            plan = _tx(conn, "cohort_create_plan", cohorts.plan_create, args.name, selection)
            cohort_json = None
            steps = [DRY_RUN_NEXT]
        else:
            plan, cohort = _tx(conn, "cohort_create", cohorts.create, args.name, selection,
                               actor=actor, now_ms=now_ms)
            cohort_json = cohort.to_json()
            steps = cohort_report.next_steps(cohort, [])
    per_phase: dict[str, int] = {}
    for a in plan.members:
        per_phase[a.phase] = per_phase.get(a.phase, 0) + 1
    result = {"name": args.name, "dry_run": args.dry_run, "created": not args.dry_run,
              "cohort": cohort_json, "selection": selection.to_json(),
              "members": len(plan.members), "per_phase": per_phase,
              "left_out": dict(plan.left_out), "next": steps}
    n = len(plan.members)
    text = (f"cohort {args.name} {'would be created' if args.dry_run else 'created'}: "
            f"{n} member{'s' * (n != 1)} ({', '.join(f'{p} {k}' for p, k in per_phase.items())})")
    for other, k in sorted(plan.left_out.items()):
        text += f"\nleft out: {k} account{'s' * (k != 1)} in active cohort {other}"
    cohort_report.emit(result, text, args.json)
    return EXIT_OK


def cmd_cohort_show(args: argparse.Namespace) -> int:
    from bridge import cohort_report, cohorts

    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        got = _tx(conn, "cohort_show", lambda c: cohort_report.describe(
            c, cohorts.find_cohort(c, args.name), args.limit))
    cohort_report.emit(got, cohort_report.render_show(got), args.json)
    return EXIT_OK


def cmd_cohort_list(args: argparse.Namespace) -> int:
    from bridge import cohort_report

    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        got = _tx(conn, "cohort_list", cohort_report.summaries)
    cohort_report.emit(got, cohort_report.render_list(got), args.json)
    return EXIT_OK


# ---------------------------------------------------------------- advance, reverse, cancel

def cmd_cohort_advance(args: argparse.Namespace) -> int:
    from bridge import cohorts, phases
    from cloud.model import PHASES

    if args.to not in PHASES:
        raise UsageError(f"unknown phase {args.to!r}: use one of {', '.join(PHASES)}")
    config = cmd_migrate.gate_config(args)
    actor = options.actor(args)
    now_ms = _now_ms()
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        cohort = _tx(conn, "find_cohort", cohorts.active_cohort, args.name)
        plan_it = lambda record: _tx(  # noqa: E731
            conn, "cohort_advance", cohorts.load_advance, args.name, args.to, config,
            now_ms, force=args.force, record=record, actor=actor,
            have_login=args.legacy is not None)
        if args.dry_run:
            return _print_move(conn, plan_it(False), None, args)
        with _locked(conn, cohort):
            try:
                move = plan_it(True)
            except cohorts.NeedsLoginServer:
                raise UsageError(cmd_migrate.NEEDS_LOGIN_SERVER) from None
            outcome = (cmd_migrate.apply_now(move.plan, conn, actor, args,
                                             phases.LEGACY_RETENTION_MS, now_ms)
                       if move.plan.to_move else phases.MigrationOutcome())
            if move.advance_no is not None:
                _tx(conn, "cohort_advance_finish", cohorts.finish_advance, move, outcome,
                    actor=actor, now_ms=now_ms)
            return _print_move(conn, move, outcome, args)


def cmd_cohort_reverse(args: argparse.Namespace) -> int:
    from bridge import cohorts

    return _back(args, "cohort_reverse", cohorts.load_reverse)


def cmd_cohort_cancel(args: argparse.Namespace) -> int:
    from bridge import cohorts

    return _back(args, "cohort_cancel", cohorts.load_cancel)


def _back(args: argparse.Namespace, desc: str, load: Callable[..., Any]) -> int:
    """Reverse or cancel: plan (read only), then apply and record, under the cohort's lock."""
    from bridge import cohorts, phases

    retention_ms = cmd_migrate.legacy_retention_ms(args)
    actor = options.actor(args)
    now_ms = _now_ms()
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        cohort = _tx(conn, "find_cohort", cohorts.active_cohort, args.name)
        plan_it = lambda: _tx(conn, desc, load, args.name, now_ms,  # noqa: E731
                              legacy_retention_ms=retention_ms)
        if args.dry_run:
            return _print_move(conn, plan_it(), None, args)
        with _locked(conn, cohort):
            move = plan_it()
            if move.plan.needs_login_server and args.legacy is None:
                raise UsageError(cmd_migrate.NEEDS_LOGIN_SERVER)
            outcome = (cmd_migrate.apply_now(move.plan, conn, actor, args, retention_ms,
                                             now_ms)
                       if move.plan.to_move else phases.MigrationOutcome())
            _tx(conn, f"{desc}_finish", cohorts.finish_back, move, outcome,
                actor=actor, now_ms=now_ms)
            return _print_move(conn, move, outcome, args)


def _print_move(conn: Any, move: Any, outcome: Any, args: argparse.Namespace) -> int:
    """Print an advance, reverse or cancel (planned, or done) with its next steps; the exit
    code: 1 a member failed, 3 some held (advance), else 0."""
    from bridge import cohort_report
    from cloud.store import cohorts as cohorts_store

    dry_run = outcome is None
    held = len(move.plan.held) + (len(outcome.held) if outcome else 0)
    failed = len(outcome.failed) if outcome else 0
    if dry_run:
        steps = [DRY_RUN_NEXT]
        if move.plan.needs_login_server and args.legacy is None:
            steps.append("some members enter or leave cloud-only: pass --legacy HOST:PORT")
    else:
        cohort = _tx(conn, "find_cohort", cohorts_store.get_cohort, move.cohort.name)
        advances = _tx(conn, "cohort_advances", cohorts_store.advances, cohort.cohort_id)
        steps = cohort_report.next_steps(cohort, advances, held=held, failed=failed)
    report, text = cohort_report.move_report(move, outcome, dry_run=dry_run, next_=steps)
    cohort_report.emit(report, text, args.json)
    if failed:
        return EXIT_FAILURE
    return EXIT_GATED if held else EXIT_OK


def cmd_cohort_complete(args: argparse.Namespace) -> int:
    from bridge import cohort_report, cohorts
    from cloud.model import PHASES
    from cloud.store import cohorts as cohorts_store

    actor = options.actor(args)
    now_ms = _now_ms()
    dsn, origin = current_database(args)
    with connect(dsn, origin) as conn:
        cohort = _tx(conn, "find_cohort", cohorts.check_complete, args.name)
        if not args.dry_run:
            with _locked(conn, cohort):
                cohort = _tx(conn, "cohort_complete", cohorts.complete, args.name,
                             actor=actor, now_ms=now_ms)
        advances = _tx(conn, "cohort_advances", cohorts_store.advances, cohort.cohort_id)
        per_phase = _tx(conn, "cohort_phases", cohorts_store.members_per_phase,
                        [cohort.cohort_id])[cohort.cohort_id]
    last = cohort_report.reversible(advances)
    assert last is not None  # check_complete refused a cohort without one
    behind = sum(n for p, n in per_phase.items()
                 if PHASES.index(p) < PHASES.index(last.to_phase))
    steps = [DRY_RUN_NEXT] if args.dry_run else cohort_report.next_steps(cohort, advances)
    if behind:
        steps.insert(0, f"{behind} member{'s' * (behind != 1)} did not reach "
                        f"{last.to_phase} (held): {'they' if behind != 1 else 'it'} stay"
                        f"{'s' * (behind == 1)} where {'they are' if behind != 1 else 'it is'}"
                        "; a new cohort can move them")
    result = {"name": cohort.name, "dry_run": args.dry_run, "completed": not args.dry_run,
              "cohort": cohort.to_json(), "per_phase": per_phase, "last_advance":
              last.to_json(), "behind_last_advance": behind, "next": steps}
    text = (f"cohort {cohort.name} {'would be completed' if args.dry_run else 'completed'}: "
            f"{sum(per_phase.values())} members ("
            + ", ".join(f"{p} {n}" for p, n in per_phase.items() if n)
            + f"); last advance {last.advance_no} to {last.to_phase}")
    cohort_report.emit(result, text, args.json)
    return EXIT_OK

