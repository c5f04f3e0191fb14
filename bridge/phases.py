"""Migration phases per account: the state machine, the gates, and applying a plan.

::

    legacy ──> dual ──> cloud ──> cloud-only     forward, by any number of steps: gated
      <──────── <──────── <────────              (force overrides failed gates, never the
                                                 freeze: gate ``frozen``); backward: not
                                                 gated; leaving cloud-only needs
                                                 allow_rollback (``cohort reverse`` is the
                                                 usual way)

    load_plan (one read transaction)               apply_plan (per account, in order)
    selection -> accounts, gate inputs -> plan  -> [gates again; login server: set_moved]
                                                -> one tx: lock, gates again, phase + audit
                                                   (out of cloud-only: + back-fill, same tx)

A plan is computed from the store, shown (``--dry-run`` stops there) and applied one account
at a time, each in its own transaction that re-checks the phase it was planned from and
evaluates a forward move's gates (``bridge.gates``) again on what is committed then: a
finding opened between plan and apply holds the move. The gates are pure functions of what
was read and of ``now_ms``: nothing here reads the wall clock.

Leaving cloud-only back-fills legacy: while every member of a conversation was cloud-only,
its cloud messages were never queued for legacy (or their rows were skipped), so the move's
transaction queues them (``cloud.store.outbox_backfill.backfill_outbox``), those sent within the
legacy network's retention (less ``BACKFILL_MARGIN_MS``); older ones are counted, not
queued. The counts come back in the outcome and the report.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import psycopg
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from bridge.gates import (  # noqa: F401 (GATES: the gate names, shown with a plan)
    GATES,
    GateConfig,
    GateInputs,
    GateResult,
    evaluate_gates,
    overridable,
    read_gate_inputs,
)
from cloud import admin
from cloud.db import TransactionRunner
from cloud.model import PHASES, Account
from cloud.store import outbox_backfill
from cloud.store.outbox_backfill import Backfill
from legacy.peer import PeerRequestFailed

CLOUD_ONLY = "cloud-only"
#: Every transition between two different phases is allowed; these say how it is guarded.
FORWARD, BACKWARD, NONE = "forward", "backward", "none"
#: What a plan does with one account.
MOVE, HELD, UNCHANGED = "move", "held", "unchanged"
#: How long a legacy supernode keeps history (``SupernodeConfig.retention_seconds``'s
#: default): a back-fill queues nothing older, which the supernode would refuse.
LEGACY_RETENTION_MS = 30 * 86_400_000
#: Why a move out of cloud-only was held: it is a rollback, asked for explicitly.
ROLLBACK_NEEDED = ("leaving cloud-only needs --allow-rollback (or `bridgectl cohort reverse` "
                   "of the cohort that moved it)")
#: The back-fill window ends this far inside the retention, so that a message queued near its
#: edge has not aged out of it by the time the injector reaches it.
BACKFILL_MARGIN_MS = 3_600_000


def direction(from_phase: str, to_phase: str) -> str:
    """``forward`` (towards cloud-only), ``backward`` or ``none``."""
    a, b = PHASES.index(from_phase), PHASES.index(to_phase)
    return FORWARD if b > a else BACKWARD if b < a else NONE


class UnknownAccounts(Exception):
    """The selection names accounts the store does not have."""

    def __init__(self, refs: Sequence[str]) -> None:
        shown = ", ".join(repr(r) for r in refs[:5]) + (", ..." if len(refs) > 5 else "")
        super().__init__(f"unknown account{'s' if len(refs) > 1 else ''}: {shown}")
        self.refs = tuple(refs)


class GatesHeld(Exception):
    """A forward move's gates, evaluated again when it was applied, failed: nothing moved."""

    def __init__(self, gates: Sequence[GateResult]) -> None:
        self.gates = tuple(gates)
        super().__init__("; ".join(f"{g.name}: {g.reason}" for g in self.gates
                                   if not g.passed))


class LoginServerLink(Protocol):
    """What the phase change needs from the legacy login server (a privileged
    ``legacy.peer.PeerConnection`` to it)."""

    def set_moved(self, handle: str, moved: bool) -> defer.Deferred: ...


# ---------------------------------------------------------------- values

def _valid_percent(_inst: Any, _attr: Any, value: int | None) -> None:
    if value is not None and not 0 <= value <= 100:
        raise ValueError("--percent must be between 0 and 100")


@attrs.frozen
class Selection:
    """Which accounts: named ones (account ids or handles), or a stable percent cohort."""

    refs: tuple[str, ...] = ()
    percent: int | None = attrs.field(default=None, validator=_valid_percent)

    def __attrs_post_init__(self) -> None:
        if self.percent is not None and self.refs:
            raise ValueError("name accounts or a percent cohort, not both")

    @property
    def is_cohort(self) -> bool:
        return self.percent is not None


@attrs.frozen
class PhaseChange:
    account_id: uuid.UUID
    handle: str
    #: None for a cloud-native account: it has nothing on the legacy login server
    legacy_handle: str | None
    from_phase: str
    to_phase: str

    @property
    def direction(self) -> str:
        return direction(self.from_phase, self.to_phase)

    @property
    def needs_login_server(self) -> bool:
        """Entering or leaving cloud-only changes whether the legacy login server accepts
        the handle."""
        return (self.legacy_handle is not None and self.from_phase != self.to_phase
                and CLOUD_ONLY in (self.from_phase, self.to_phase))


@attrs.frozen
class PlannedMove:
    change: PhaseChange
    #: ``move``, ``held`` or ``unchanged``
    outcome: str
    #: why held or unchanged ('' for a move)
    reason: str = ""
    #: gate results (empty unless the move is forward)
    gates: tuple[GateResult, ...] = ()
    #: the move happens only because force overrode a failed gate
    forced: bool = False

    @property
    def would_move(self) -> bool:
        return self.outcome == MOVE


@attrs.frozen
class MigrationPlan:
    target: str
    moves: tuple[PlannedMove, ...]
    #: failed gates (never ``frozen``) do not hold a forward move
    force: bool = False
    #: what leaving cloud-only would queue for legacy now, by account (a dry run shows it)
    backfill_preview: Mapping[uuid.UUID, Backfill] = attrs.field(factory=dict)
    #: the gate bounds it was planned with: applying evaluates the gates again with them
    config: GateConfig = attrs.field(factory=GateConfig)
    #: moves out of cloud-only are allowed (the operator asked for a rollback)
    allow_rollback: bool = False
    #: the named cohort the moves belong to, if any (kept in each move's audit row)
    cohort: str | None = None

    @property
    def to_move(self) -> tuple[PlannedMove, ...]:
        return tuple(m for m in self.moves if m.outcome == MOVE)

    @property
    def held(self) -> tuple[PlannedMove, ...]:
        return tuple(m for m in self.moves if m.outcome == HELD)

    @property
    def unchanged(self) -> tuple[PlannedMove, ...]:
        return tuple(m for m in self.moves if m.outcome == UNCHANGED)

    @property
    def needs_login_server(self) -> bool:
        return any(m.change.needs_login_server for m in self.to_move)


@attrs.frozen
class MigrationOutcome:
    """What ``apply_plan`` did with the plan's moves."""

    moved: tuple[PhaseChange, ...] = ()
    #: moves that were tried and did not happen, with why
    failed: tuple[tuple[PhaseChange, str], ...] = ()
    #: accounts found already in the target phase when their turn came (moved concurrently,
    #: or by an earlier run whose report was lost): nothing to do, nothing audited
    already: tuple[PhaseChange, ...] = ()
    #: what each move out of cloud-only queued for legacy, by account
    backfills: Mapping[uuid.UUID, Backfill] = attrs.field(factory=dict)
    #: planned moves a gate held when they were applied (a finding opened, a worker fell
    #: behind, ... since the plan was made), with the gates as evaluated then
    held: tuple[tuple[PhaseChange, tuple[GateResult, ...]], ...] = ()


# ---------------------------------------------------------------- planning

def plan_moves(accounts: Sequence[Account], target: str, inputs: GateInputs,
               config: GateConfig, now_ms: int, *, force: bool = False,
               promote_only: bool = False, allow_rollback: bool = False) -> MigrationPlan:
    """Decide, for each account, whether it moves to *target*. Pure.

    *force* overrides failed gates (never ``frozen``); *allow_rollback* lets an account
    leave cloud-only (held otherwise). *promote_only* (percent and named cohorts): an
    account already past the target stays where it is, so re-running an earlier, wider
    cohort step never demotes the accounts that went further.
    """
    if target not in PHASES:
        raise ValueError(f"unknown phase {target!r}")
    moves = []
    for a in accounts:
        change = PhaseChange(a.account_id, a.handle, a.legacy_handle, a.phase, target)
        way = change.direction
        if way == NONE:
            moves.append(PlannedMove(change, UNCHANGED, f"already {target}"))
        elif way == BACKWARD and promote_only:
            moves.append(PlannedMove(change, UNCHANGED,
                                     f"already past {target} (a cohort only promotes)"))
        elif way == BACKWARD:
            if a.phase == CLOUD_ONLY and not allow_rollback:
                moves.append(PlannedMove(change, HELD, ROLLBACK_NEEDED))
            else:
                moves.append(PlannedMove(change, MOVE))
        else:
            gates = evaluate_gates(a.account_id, inputs, config, now_ms)
            failed = [g for g in gates if not g.passed]
            if failed and not (force and overridable(gates)):
                moves.append(PlannedMove(
                    change, HELD, "; ".join(f"{g.name}: {g.reason}" for g in failed), gates))
            else:
                moves.append(PlannedMove(change, MOVE, gates=gates, forced=bool(failed)))
    return MigrationPlan(target, tuple(moves), force, config=config,
                         allow_rollback=allow_rollback)


def load_plan(conn: psycopg.Connection, selection: Selection, target: str,
              config: GateConfig, now_ms: int, *, force: bool = False,
              allow_rollback: bool = False,
              legacy_retention_ms: int = LEGACY_RETENTION_MS) -> MigrationPlan:
    """One read transaction: resolve the selection, read the gate inputs, plan, and count
    what each move out of cloud-only would queue for legacy.

    ``UnknownAccounts`` if the selection names an account the store does not have.
    """
    if target not in PHASES:
        raise ValueError(f"unknown phase {target!r}")
    if selection.is_cohort:
        accounts = admin.cohort_accounts(conn, selection.percent)
    else:
        accounts, unknown = admin.find_accounts(conn, selection.refs)
        if unknown:
            raise UnknownAccounts(unknown)
    promoted = [a.account_id for a in accounts if direction(a.phase, target) == FORWARD]
    inputs = read_gate_inputs(conn, promoted, config, now_ms)
    plan = plan_moves(accounts, target, inputs, config, now_ms, force=force,
                      promote_only=selection.is_cohort, allow_rollback=allow_rollback)
    return with_backfill_preview(conn, plan, now_ms, legacy_retention_ms)


def with_backfill_preview(conn: psycopg.Connection, plan: MigrationPlan, now_ms: int,
                          legacy_retention_ms: int) -> MigrationPlan:
    """*plan* with what each of its moves out of cloud-only would queue for legacy now."""
    since_ms = backfill_since_ms(now_ms, legacy_retention_ms)
    return attrs.evolve(plan, backfill_preview={
        m.change.account_id: outbox_backfill.preview_backfill(conn, m.change.account_id, since_ms)
        for m in plan.to_move if m.change.from_phase == CLOUD_ONLY})


# ---------------------------------------------------------------- applying

def backfill_since_ms(now_ms: int, legacy_retention_ms: int) -> int:
    """Where a back-fill's window starts: the legacy retention back from *now_ms*, less the
    margin. ValueError when the retention is not longer than the margin."""
    if legacy_retention_ms <= BACKFILL_MARGIN_MS:
        raise ValueError(f"the legacy retention must be longer than the back-fill margin "
                         f"({BACKFILL_MARGIN_MS // 1000} s)")
    return now_ms - legacy_retention_ms + BACKFILL_MARGIN_MS


def recheck_gates(conn: psycopg.Connection, move: PlannedMove, config: GateConfig,
                  now_ms: int, *, force: bool) -> tuple[tuple[GateResult, ...], bool]:
    """The gates of a forward move, evaluated again on what is committed now: (gates,
    forced). ``GatesHeld`` when one fails and *force* is off. A move that is not forward, or
    whose account is no longer in the phase it was planned from (``apply_phase_change``
    says what to do then), keeps the gates and the force it was planned with."""
    change = move.change
    if change.direction != FORWARD:
        return move.gates, move.forced
    row = conn.execute("SELECT phase FROM accounts WHERE account_id = %s",
                       (change.account_id,)).fetchone()
    if row is None or row[0] != change.from_phase:
        return move.gates, move.forced
    inputs = read_gate_inputs(conn, [change.account_id], config, now_ms)
    gates = evaluate_gates(change.account_id, inputs, config, now_ms)
    failed = any(not g.passed for g in gates)
    if failed and not (force and overridable(gates)):
        raise GatesHeld(gates)
    return gates, failed


def apply_move(conn: psycopg.Connection, move: PlannedMove, config: GateConfig, *,
               force: bool, actor: str, now_ms: int, backfill_since_ms: int | None,
               cohort: str | None = None) -> admin.AppliedChange:
    """One account's move, in one transaction: the account row is locked, a forward move's
    gates are evaluated again (``recheck_gates``) and the phase is changed with them, so a
    finding opened since the plan was made holds the move. (A finding committed after this
    transaction read the findings counts as found after the move.)"""
    change = move.change
    conn.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE",
                 (change.account_id,))
    gates, forced = recheck_gates(conn, move, config, now_ms, force=force)
    return admin.apply_phase_change(
        conn, change.account_id, change.from_phase, change.to_phase, actor=actor,
        now_ms=now_ms, forced=forced, gates=[g.to_json() for g in gates],
        backfill_since_ms=backfill_since_ms, cohort=cohort)


async def apply_plan(plan: MigrationPlan, db: TransactionRunner,
                     login: LoginServerLink | None, *, actor: str, now_ms: int,
                     clock: IReactorTime | None = None, login_timeout_s: float = 10.0,
                     should_stop: Callable[[], bool] = lambda: False,
                     legacy_retention_ms: int = LEGACY_RETENTION_MS) -> MigrationOutcome:
    """Carry out the plan's moves, one account at a time, each in its own transaction.

    A move that enters or leaves cloud-only also tells the legacy login server (*login*),
    with a timeout on *clock* when one is given. *should_stop* is asked before each account
    (Ctrl-C): the accounts not reached yet are reported as failed, nothing is half done.
    One account's failure does not stop the others. A move out of cloud-only queues for
    legacy, in its own transaction, what legacy missed within *legacy_retention_ms*.
    A forward move's gates are evaluated again in its transaction (``apply_move``); a move
    they hold now is reported in ``held`` (and a login server already told is set back).
    """
    since_ms = backfill_since_ms(now_ms, legacy_retention_ms)
    backfills: dict[uuid.UUID, Backfill] = {}
    moved: list[PhaseChange] = []
    failed: list[tuple[PhaseChange, str]] = []
    already: list[PhaseChange] = []
    held: list[tuple[PhaseChange, tuple[GateResult, ...]]] = []
    login_broken: str | None = None
    for move in plan.to_move:
        change = move.change
        if should_stop():
            failed.append((change, "interrupted before this account"))
            continue
        told_login = False
        if change.needs_login_server:
            # Order of the two writes: the login server first, the store's phase last. The
            # phase is the commit point: a re-run of the same command plans from the store,
            # so after a crash between the two it finds the old phase and does both again
            # (set_moved is idempotent). In the other order the store would already show the
            # target and the re-run would see nothing to do, leaving the login server behind.
            if login is None:
                failed.append((change, "no link to the legacy login server"))
                continue
            if login_broken is not None:
                failed.append((change, login_broken))
                continue
            if change.direction == FORWARD:
                try:  # a gate that fails already is not worth telling the login server
                    await db.run("recheck_gates", recheck_gates, move, plan.config, now_ms,
                                 force=plan.force)
                except GatesHeld as e:
                    held.append((change, e.gates))
                    continue
                except Exception as e:
                    failed.append((change, f"store: {_describe(e)}"))
                    continue
            try:
                await _set_moved(login, change.legacy_handle, change.to_phase == CLOUD_ONLY,
                                 clock, login_timeout_s)
            except PeerRequestFailed as e:  # it answered: the link is fine, this handle not
                failed.append((change, f"the legacy login server refused: {e.reason}"))
                continue
            except Exception as e:
                login_broken = f"legacy login server: {_describe(e)}"
                failed.append((change, login_broken))
                continue
            told_login = True
        try:
            applied = await db.run(
                "apply_phase_change", apply_move, move, plan.config, force=plan.force,
                actor=actor, now_ms=now_ms, backfill_since_ms=since_ms, cohort=plan.cohort)
        except GatesHeld as e:
            trouble = (await _restore_login(login, change, change.from_phase, clock,
                                            login_timeout_s) if told_login else "")
            if trouble:  # held, but the login server now disagrees with the store
                failed.append((change, f"held at apply by {e}{trouble}"))
            else:
                held.append((change, e.gates))
            continue
        except admin.PhaseChanged as e:
            why = str(e)
            if told_login:
                why += await _restore_login(login, change, e.current, clock, login_timeout_s)
            failed.append((change, why))
            continue
        except Exception as e:
            hint = ("; the legacy login server was already told: run the same command again "
                    "to complete the move") if told_login else ""
            failed.append((change, f"store: {_describe(e)}{hint}"))
            continue
        (moved if applied.moved else already).append(change)
        if applied.backfill is not None:
            backfills[change.account_id] = applied.backfill
    return MigrationOutcome(tuple(moved), tuple(failed), tuple(already), backfills,
                            tuple(held))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _set_moved(login: LoginServerLink, handle: str, moved: bool,
                     clock: IReactorTime | None, timeout_s: float) -> None:
    d = login.set_moved(handle, moved)
    if clock is not None:
        d.addTimeout(timeout_s, clock)
    await d


async def _restore_login(login: LoginServerLink, change: PhaseChange, stored: str,
                         clock: IReactorTime | None, timeout_s: float) -> str:
    """The store refused the phase change after the login server was told: make the login
    server agree with the phase the store really has. Returns '' or what went wrong, for the
    failed move's reason (a re-run of the command towards either phase repairs it)."""
    try:
        await _set_moved(login, change.legacy_handle, stored == CLOUD_ONLY, clock, timeout_s)
    except Exception as e:
        return (f"; the legacy login server could not be set back to match {stored!r}: "
                f"{_describe(e)}")
    return ""
