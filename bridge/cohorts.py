"""Named cohorts (``bridgectl cohort``): choosing the members, and planning an advance, a
reverse or a cancel as a ``bridge.phases`` plan, applied by ``phases.apply_plan`` like any
migration (the same gates, evaluated again per move; the same audit rows, which name the
cohort; the same back-fill out of cloud-only, in the move's own transaction).

::

    create   one tx: resolve the selection, refuse what is wrong, store cohort + members
    advance  one tx: members now, gates -> plan (promote-only: never backward);
                     unless a dry run: record advance n, every member's phase before it,
                     the gates that held some
             apply_plan (one tx per member, gates again); finish_advance (counts, held)
    reverse  one tx: the advance to undo (newest not reversed that moved someone), each
                     member's phase before it -> backward moves only
             apply_plan; then that advance is marked reversed, unless a member failed
                     (the same command, run again, finishes it)
    cancel   like reverse, back to each member's phase before the oldest advance not
             reversed; then the cohort ends (cancelled); nothing ends while one failed
    complete one tx: the cohort ends (completed): final, no more advance or reverse

Reverse moves a member only backward: to its phase before the advance, if it is past it
now (also when something else than this cohort, e.g. ``migrate``, promoted it since: it
goes back to where the cohort found it); a member at or behind that phase stays. The
planning functions are pure given what they read; time is passed in.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import psycopg

from bridge import phases
from bridge.phases import BACKWARD, FORWARD, MOVE, UNCHANGED, MigrationOutcome, MigrationPlan
from cloud import admin
from cloud.model import PHASES, Account
from cloud.store import cohorts as cohorts_store
from cloud.store.cohorts import ACTIVE, CANCELLED, COMPLETED, Cohort

#: Phases an advance may go to (an advance to legacy would move nobody).
ADVANCE_TARGETS = PHASES[1:]
#: How many refs an error message names before it says "and N more".
SHOWN_REFS = 20


class CohortRefused(Exception):
    """The request can not be done as asked; nothing was changed (a usage error)."""


class NeedsLoginServer(Exception):
    """Some planned move enters or leaves cloud-only and no login server link was given."""


@attrs.frozen
class CohortSelection:
    """How the members are chosen: a stable percent of linked accounts, or named ones
    (from ``--file``, kept as *file*, or ``--handles``)."""

    percent: int | None = None
    refs: tuple[str, ...] = ()
    file: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.percent is not None:
            return {"percent": self.percent}
        if self.file is not None:
            return {"file": self.file, "names": len(self.refs)}
        return {"handles": list(self.refs)}


@attrs.frozen
class CreatePlan:
    name: str
    selection: CohortSelection
    members: tuple[Account, ...]
    #: accounts of a percent selection left out because another active cohort has them:
    #: that cohort's name -> how many
    left_out: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class CohortMove:
    """An advance, reverse or cancel of one cohort, as planned."""

    cohort: Cohort
    #: ``advance``, ``reverse`` or ``cancel``
    action: str
    plan: MigrationPlan
    #: advance: the advance recorded (None in a dry run, or when there was nothing to do);
    #: reverse: the advance being undone
    advance_no: int | None = None


def _names(refs: Sequence[str]) -> str:
    shown = ", ".join(repr(r) for r in refs[:SHOWN_REFS])
    return shown + (f" and {len(refs) - SHOWN_REFS} more" if len(refs) > SHOWN_REFS else "")


def check_name(name: str) -> None:
    """``CohortRefused`` unless *name* is a valid cohort name."""
    if not cohorts_store.NAME_PATTERN.match(name):
        raise CohortRefused(
            f"bad cohort name {name!r}: 1-63 characters, lower-case letters, digits, '.', "
            "'_' or '-', starting with a letter or a digit")


def active_cohort(conn: psycopg.Connection, name: str, *, lock: bool = False) -> Cohort:
    """The cohort *name*, which must exist and be active (else ``CohortRefused``)."""
    cohort = find_cohort(conn, name, lock=lock)
    if cohort.state != ACTIVE:
        raise CohortRefused(f"cohort {name!r} is {cohort.state} (by {cohort.ended_by}): it "
                            "does not change any more; create a new cohort")
    return cohort


def find_cohort(conn: psycopg.Connection, name: str, *, lock: bool = False) -> Cohort:
    """The cohort *name* (``CohortRefused`` when there is none)."""
    cohort = cohorts_store.get_cohort(conn, name, lock=lock)
    if cohort is None:
        raise CohortRefused(f"unknown cohort {name!r} (`bridgectl cohort list` lists them)")
    return cohort


# ---------------------------------------------------------------- create

def plan_create(conn: psycopg.Connection, name: str,
                selection: CohortSelection) -> CreatePlan:
    """Resolve *selection* and check everything a create needs (read only).

    Refused: a bad or taken name; named accounts that do not exist (all of them named) or
    that are members of another active cohort; a selection of no account. A percent
    selection leaves out the accounts another active cohort has, and says so.
    """
    check_name(name)
    taken = cohorts_store.get_cohort(conn, name)
    if taken is not None:
        raise CohortRefused(f"a cohort named {name!r} exists already ({taken.state}, created "
                            f"by {taken.created_by}); cohort names are never reused")
    left_out: dict[str, int] = {}
    if selection.percent is not None:
        accounts = admin.cohort_accounts(conn, selection.percent)
        busy = cohorts_store.active_memberships(conn, [a.account_id for a in accounts])
        for cohort_name in busy.values():
            left_out[cohort_name] = left_out.get(cohort_name, 0) + 1
        accounts = [a for a in accounts if a.account_id not in busy]
    else:
        accounts, unknown = admin.find_accounts(conn, selection.refs)
        if unknown:
            raise CohortRefused(f"unknown account{'s' * (len(unknown) > 1)}: {_names(unknown)}"
                                "; nothing was created")
        busy = cohorts_store.active_memberships(conn, [a.account_id for a in accounts])
        if busy:
            named = [f"{a.handle} ({busy[a.account_id]})" for a in accounts
                     if a.account_id in busy]
            raise CohortRefused(
                f"{len(named)} of the accounts {'is' if len(named) == 1 else 'are'} in "
                f"another active cohort: {', '.join(named[:SHOWN_REFS])}"
                f"{', ...' if len(named) > SHOWN_REFS else ''}; an account is in one active "
                "cohort at a time: leave them out, or complete or cancel that cohort")
    if not accounts:
        why = (" (the others are in active cohorts: "
               + ", ".join(f"{n} in {c}" for c, n in sorted(left_out.items())) + ")"
               if left_out else "")
        raise CohortRefused(f"the selection has no account{why}; nothing was created")
    return CreatePlan(name, selection, tuple(accounts), left_out)


def create(conn: psycopg.Connection, name: str, selection: CohortSelection, *, actor: str,
           now_ms: int) -> tuple[CreatePlan, Cohort]:
    """One transaction: ``plan_create`` and store the cohort, audited."""
    plan = plan_create(conn, name, selection)
    cohort = cohorts_store.create_cohort(
        conn, name, {**selection.to_json(),
                     **({"left_out": dict(plan.left_out)} if plan.left_out else {})},
        [a.account_id for a in plan.members], actor=actor, now_ms=now_ms)
    return plan, cohort


# ---------------------------------------------------------------- advance

def load_advance(conn: psycopg.Connection, name: str, target: str,
                 config: phases.GateConfig, now_ms: int, *, force: bool, record: bool,
                 actor: str, have_login: bool = True) -> CohortMove:
    """Plan moving the cohort's members forward to *target* through the gates; with
    *record*, in this same transaction, record the advance and each member's phase before
    it (only when something would move or was held: an advance of nobody is no advance).

    ``NeedsLoginServer`` (with *record*: before anything is written) when a move enters
    cloud-only and *have_login* is false.
    """
    if target not in ADVANCE_TARGETS:
        raise CohortRefused(f"a cohort advances to one of {', '.join(ADVANCE_TARGETS)}, not "
                            f"{target!r}; `bridgectl cohort reverse` moves it back")
    cohort = active_cohort(conn, name, lock=record)
    members = cohorts_store.member_accounts(conn, cohort.cohort_id)
    promoted = [a.account_id for a in members if phases.direction(a.phase, target) == FORWARD]
    inputs = phases.read_gate_inputs(conn, promoted, config, now_ms)
    plan = attrs.evolve(phases.plan_moves(members, target, inputs, config, now_ms,
                                          force=force, promote_only=True), cohort=name)
    advance_no = None
    if record and (plan.to_move or plan.held):
        if plan.needs_login_server and not have_login:
            raise NeedsLoginServer()
        advance_no = cohorts_store.begin_advance(
            conn, cohort.cohort_id, target, {a.account_id: a.phase for a in members},
            {m.change.account_id: failed_gates(m.gates) for m in plan.held},
            forced=force, actor=actor, now_ms=now_ms)
    return CohortMove(cohort, "advance", plan, advance_no)


def failed_gates(gates: Sequence[phases.GateResult]) -> list[dict[str, Any]]:
    return [g.to_json() for g in gates if not g.passed]


def finish_advance(conn: psycopg.Connection, move: CohortMove, outcome: MigrationOutcome, *,
                   actor: str, now_ms: int) -> None:
    """Record what applying the advance did: counts, and the members held when applied."""
    assert move.advance_no is not None
    plan = move.plan
    cohorts_store.finish_advance(
        conn, move.cohort, move.advance_no, moved=len(outcome.moved),
        held_at_apply={c.account_id: failed_gates(g) for c, g in outcome.held},
        held_total=len(plan.held) + len(outcome.held), failed=len(outcome.failed),
        unchanged=len(plan.unchanged) + len(outcome.already), actor=actor, now_ms=now_ms)


# ---------------------------------------------------------------- reverse and cancel

def plan_back(members: Sequence[Account], before: Mapping[uuid.UUID, str],
              label: str) -> tuple[phases.PlannedMove, ...]:
    """Each member back to its phase in *before*, only ever backward. Pure.

    A member past that phase moves back to it; one at it, or behind it (moved back since by
    something else), stays: a reverse never moves anyone forward. A member with no phase in
    *before* (not in the advance) stays.
    """
    moves = []
    for a in members:
        target = before.get(a.account_id)
        if target is None:
            moves.append(phases.PlannedMove(
                phases.PhaseChange(a.account_id, a.handle, a.legacy_handle, a.phase, a.phase),
                UNCHANGED, f"nothing to undo: not in {label}"))
            continue
        change = phases.PhaseChange(a.account_id, a.handle, a.legacy_handle, a.phase, target)
        way = phases.direction(a.phase, target)
        if way == BACKWARD:
            moves.append(phases.PlannedMove(change, MOVE))
        elif way == FORWARD:
            moves.append(phases.PlannedMove(
                change, UNCHANGED, f"in {a.phase}, behind its phase before {label} ({target}): "
                                   "a reverse never moves anyone forward"))
        else:
            moves.append(phases.PlannedMove(change, UNCHANGED,
                                            f"at its phase before {label} ({target})"))
    return tuple(moves)


def load_reverse(conn: psycopg.Connection, name: str, now_ms: int, *,
                 legacy_retention_ms: int = phases.LEGACY_RETENTION_MS) -> CohortMove:
    """Plan moving every member back to its phase before the cohort's last advance (the
    newest not reversed yet that moved someone); what leaving cloud-only would queue for
    legacy is counted (``backfill_preview``). Read only."""
    cohort = active_cohort(conn, name)
    last = cohorts_store.advance_to_reverse(conn, cohort.cohort_id)
    if last is None:
        done = cohorts_store.advances(conn, cohort.cohort_id)
        raise CohortRefused(
            f"cohort {name!r} has nothing to reverse: "
            + ("it never advanced" if not any(a.may_have_moved for a in done)
               else "every advance that moved someone is reversed already")
            + "; nothing changed")
    label = f"advance {last.advance_no}"
    before = cohorts_store.phases_before(conn, cohort.cohort_id, last.advance_no)
    return _back(conn, cohort, "reverse", before, label, now_ms, legacy_retention_ms,
                 last.advance_no)


def load_cancel(conn: psycopg.Connection, name: str, now_ms: int, *,
                legacy_retention_ms: int = phases.LEGACY_RETENTION_MS) -> CohortMove:
    """Plan a cancel: every member back to its phase before the oldest advance not reversed
    (all of them undone at once: a member leaves cloud-only once, with one back-fill).
    Read only."""
    cohort = active_cohort(conn, name)
    before = cohorts_store.phases_before_unreversed(conn, cohort.cohort_id)
    return _back(conn, cohort, "cancel", before, "the cohort's advances", now_ms,
                 legacy_retention_ms)


def _back(conn: psycopg.Connection, cohort: Cohort, action: str,
          before: Mapping[uuid.UUID, str], label: str, now_ms: int,
          legacy_retention_ms: int, advance_no: int | None = None) -> CohortMove:
    members = cohorts_store.member_accounts(conn, cohort.cohort_id)
    plan = MigrationPlan(f"their phases before {label}", plan_back(members, before, label),
                         allow_rollback=True, cohort=cohort.name)
    plan = phases.with_backfill_preview(conn, plan, now_ms, legacy_retention_ms)
    return CohortMove(cohort, action, plan, advance_no)


def finish_back(conn: psycopg.Connection, move: CohortMove, outcome: MigrationOutcome, *,
                actor: str, now_ms: int) -> bool:
    """After a reverse or cancel was applied: when no member failed, mark the advance
    reversed (reverse) or end the cohort (cancel); else only audit what was done, so the
    same command run again finishes it. Returns whether it is complete."""
    counts = {"moved": len(outcome.moved), "failed": len(outcome.failed),
              "unchanged": len(move.plan.unchanged) + len(outcome.already),
              "queued_for_legacy": sum(b.total for b in outcome.backfills.values())}
    cohort = cohorts_store.get_cohort(conn, move.cohort.name, lock=True)
    if cohort is None or cohort.state != ACTIVE:
        raise CohortRefused(f"cohort {move.cohort.name!r} ended while this ran")
    if outcome.failed:
        cohorts_store.audit_incomplete(
            conn, cohort, f"cohort_{'reversed' if move.action == 'reverse' else CANCELLED}",
            actor=actor, now_ms=now_ms, detail={**counts, "advance": move.advance_no})
        return False
    if move.action == "reverse":
        assert move.advance_no is not None
        cohorts_store.mark_reversed(conn, cohort, move.advance_no, actor=actor,
                                    now_ms=now_ms, detail={**counts, "complete": True})
    else:
        cohorts_store.end_cohort(conn, cohort, CANCELLED, actor=actor, now_ms=now_ms,
                                 detail=counts)
    return True


# ---------------------------------------------------------------- complete

def check_complete(conn: psycopg.Connection, name: str, *, lock: bool = False) -> Cohort:
    """The cohort to complete: active, with an advance that moved someone and is not
    reversed (else ``CohortRefused``: cancel ends a cohort that has done nothing)."""
    cohort = active_cohort(conn, name, lock=lock)
    if cohorts_store.advance_to_reverse(conn, cohort.cohort_id) is None:
        raise CohortRefused(f"cohort {name!r} has moved nobody (never advanced, or every "
                            "advance reversed): there is nothing to complete; "
                            f"`bridgectl cohort cancel {name}` ends it")
    return cohort


def complete(conn: psycopg.Connection, name: str, *, actor: str, now_ms: int) -> Cohort:
    """One transaction: end the cohort as completed (final), audited with its members per
    phase."""
    cohort = check_complete(conn, name, lock=True)
    per_phase = cohorts_store.members_per_phase(conn, [cohort.cohort_id])[cohort.cohort_id]
    return cohorts_store.end_cohort(conn, cohort, COMPLETED, actor=actor, now_ms=now_ms,
                                    detail={"per_phase": per_phase})
