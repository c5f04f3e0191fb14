"""The simulation's cohort moves (``drills.simulation``): each plan step through a named
cohort, with the functions ``bridgectl cohort`` runs.

A forward step ends the cohort of the step before it (completed; cancelled when it moved
nobody or was reversed), creates its own cohort (``step-<i>-<phase>-<percent>``, *i* the
step's place in the plan) of the stable percent of linked accounts, and advances it through
the gates (``bridge.cohorts.load_advance``, ``phases.apply_plan``, ``finish_advance``). A
reverse step reverses the cohort of the forward step before it (``load_reverse``,
``apply_plan``, ``finish_back``): each member back to its phase before that advance, with
the back-fill to legacy in the move's transaction when it leaves cloud-only.

The simulation runs one step at a time on one connection, so the advisory lock that keeps
two ``bridgectl cohort`` commands apart is not taken here.
"""

from __future__ import annotations

from typing import Any

import attrs
import psycopg
from twisted.internet.interfaces import IReactorTime

from bridge import cohorts, phases
from bridge.gates import GateConfig
from cloud.db import InlineDatabase, run_transaction
from cloud.store.errors import Conflict
from drills.simplan import PlanStep

ACTOR = "simulate"


def cohort_name(index: int, step: PlanStep) -> str:
    """The cohort of forward step *index* (its place in the plan, from 1)."""
    return f"step-{index}-{step.phase}-{step.percent}"


@attrs.define
class Rollbacks:
    """What the plan's reverse steps did, over the run."""

    steps: int = 0
    #: accounts moved back to their phase before the step reversed
    moved_back: int = 0
    #: messages queued for legacy when accounts left cloud-only
    backfilled: int = 0
    #: members that could not be moved back (the cohort's advance stays unreversed)
    failed: int = 0


class SimCohorts:
    """Applies plan steps as cohort moves at the simulated time *now_ms* given to each."""

    def __init__(self, conn: psycopg.Connection, db: InlineDatabase, clock: IReactorTime,
                 gates: GateConfig) -> None:
        self.conn, self.db, self.clock, self.gates = conn, db, clock, gates
        #: the cohort of the latest forward step, until the next one ends it
        self.current: str | None = None
        self.moves: list[dict[str, Any]] = []
        self.rollbacks = Rollbacks()

    def _tx(self, desc: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return run_transaction(self.conn, desc, fn, *args, **kwargs)

    async def forward(self, name: str, step: PlanStep, login: Any, now_ms: int,
                      day: float) -> None:
        """End the previous cohort, create *name* and advance it to the step's phase."""
        assert step.percent is not None and step.phase is not None
        await self._end_current(login, now_ms)
        entry: dict[str, Any] = {"day": day, "action": "advance", "cohort": name,
                                 "percent": step.percent, "phase": step.phase, "moved": 0,
                                 "held": 0, "failed": 0}
        try:
            self._tx("cohort_create", cohorts.create, name,
                     cohorts.CohortSelection(percent=step.percent), actor=ACTOR,
                     now_ms=now_ms)
        except (cohorts.CohortRefused, Conflict) as e:  # e.g. a percent of nobody
            self.moves.append({**entry, "note": str(e)})
            return
        self.current = name
        move = self._tx("cohort_advance", cohorts.load_advance, name, step.phase, self.gates,
                        now_ms, force=False, record=True, actor=ACTOR)
        outcome = await self._apply(move, login, now_ms)
        if move.advance_no is not None:
            self._tx("cohort_advance_finish", cohorts.finish_advance, move, outcome,
                     actor=ACTOR, now_ms=now_ms)
        self.moves.append({**entry, "moved": len(outcome.moved),
                           "held": len(move.plan.held) + len(outcome.held),
                           "failed": len(outcome.failed)})

    async def reverse(self, name: str, step: PlanStep, login: Any, now_ms: int,
                      day: float) -> None:
        """Reverse cohort *name* (the forward step before this one): its members back to
        their phases before its advance, back-filling legacy for those leaving cloud-only."""
        entry: dict[str, Any] = {"day": day, "action": "reverse", "cohort": name,
                                 "percent": step.percent, "moved": 0, "held": 0,
                                 "failed": 0, "backfilled": 0}
        self.rollbacks.steps += 1
        if self.current != name:  # that step created no cohort: nothing to undo
            self.moves.append({**entry, "note": f"no cohort {name}: nothing to reverse"})
            return
        try:
            move = self._tx("cohort_reverse", cohorts.load_reverse, name, now_ms)
        except cohorts.CohortRefused as e:  # its advance moved nobody
            self.moves.append({**entry, "note": str(e)})
            return
        outcome = await self._apply(move, login, now_ms)
        self._tx("cohort_reverse_finish", cohorts.finish_back, move, outcome, actor=ACTOR,
                 now_ms=now_ms)
        backfilled = sum(b.total for b in outcome.backfills.values())
        self.rollbacks.moved_back += len(outcome.moved)
        self.rollbacks.backfilled += backfilled
        self.rollbacks.failed += len(outcome.failed)
        self.moves.append({**entry, "moved": len(outcome.moved),
                           "failed": len(outcome.failed), "backfilled": backfilled})

    async def _end_current(self, login: Any, now_ms: int) -> None:
        """Complete the current cohort, so that its members may join the next one; cancel it
        when it has nothing to complete (it moved nobody, or was reversed)."""
        name, self.current = self.current, None
        if name is None:
            return
        try:
            self._tx("cohort_complete", cohorts.complete, name, actor=ACTOR, now_ms=now_ms)
            return
        except cohorts.CohortRefused:
            pass
        move = self._tx("cohort_cancel", cohorts.load_cancel, name, now_ms)
        outcome = await self._apply(move, login, now_ms)
        self._tx("cohort_cancel_finish", cohorts.finish_back, move, outcome, actor=ACTOR,
                 now_ms=now_ms)

    async def _apply(self, move: cohorts.CohortMove, login: Any,
                     now_ms: int) -> phases.MigrationOutcome:
        if not move.plan.to_move:
            return phases.MigrationOutcome()
        return await phases.apply_plan(move.plan, self.db, login, actor=ACTOR, now_ms=now_ms,
                                       clock=self.clock)
