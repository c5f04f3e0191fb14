"""The migration gates: what must hold before an account is promoted, and why not.

Every gate is a pure function of what ``read_gate_inputs`` read in one transaction and of
``now_ms``. ``bridge.phases`` evaluates them when it plans and again inside the transaction
that applies each move.

The ``frozen`` gate is global: while an operator has frozen the migration
(``bridgectl freeze on``) it fails for every account, and ``--force`` does not override it
(``UNFORCEABLE``): a freeze is what an operator reaches for when something is wrong.

Scope of an account: itself, the conversations it is a member of, and the legacy
supernodes that are the home of those conversations (a finding about a whole supernode,
such as a feed gap, holds every account with a conversation homed there).
"""

from __future__ import annotations

import datetime
import functools
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import psycopg

from cloud import admin
from cloud.store import controls as controls_store
from cloud.store import findings as findings_store
from legacy.ring import HashRing

#: Gate names, in the order they are evaluated and shown.
GATES = ("no_open_findings", "mirror_lag", "outbox_flowing", "recent_clean_reconcile",
         "frozen")
#: Gates that hold a move even with force: only the operator who froze can let it go.
UNFORCEABLE = frozenset({"frozen"})


@attrs.frozen
class GateConfig:
    #: every live worker's p99 lag, both directions, must be under this
    lag_bound_ms: int = attrs.field(default=5_000, validator=attrs.validators.gt(0))
    #: a clean reconcile run must have finished at most this long ago
    reconcile_window_ms: int = attrs.field(default=3_600_000, validator=attrs.validators.gt(0))
    #: a worker is live while its heartbeat is at most this old
    live_within_ms: int = admin.LIVE_WORKER_MS
    #: the oldest outbox row waiting for the legacy network must be younger than this (a
    #: stuck cloud -> legacy leg completes nothing, so the lag gate alone would not see it)
    outbox_age_bound_ms: int = attrs.field(default=300_000, validator=attrs.validators.gt(0))


@attrs.frozen
class Uncovered:
    """A conversation of the account no recent clean compare has vouched for since its last
    finding."""

    legacy_chat_id: str
    last_clean_reconcile_ms: int | None
    last_finding_ms: int | None


@attrs.frozen
class AccountScope:
    """What the per-account gates see of one account."""

    #: open and failed findings about the account or a conversation it is in
    findings: findings_store.HoldingFindings | None = None
    #: open and failed findings about a whole supernode that is the home of some of its
    #: conversations: (the findings, how many of its conversations are homed there)
    source_holds: tuple[tuple[findings_store.SourceFinding, int], ...] = ()
    #: its conversations with a legacy chat (those a gaps pass compares)
    conversations: int = 0
    #: those not compared clean since their last finding, or not within the window
    uncovered: tuple[Uncovered, ...] = ()


@attrs.frozen
class GateInputs:
    """Everything the gates look at, read in one transaction."""

    live_workers: tuple[admin.WorkerRow, ...]
    last_clean_reconcile: admin.ReconcileRun | None
    #: per promoted account; absent: nothing in its scope (no findings, no conversations)
    scopes: Mapping[uuid.UUID, AccountScope] = attrs.field(factory=dict)
    #: when the oldest outbox row still waiting for the legacy network was written
    oldest_outbox_ms: int | None = None
    #: the migration freeze, when an operator has set one
    freeze: controls_store.Freeze | None = None


@attrs.frozen
class GateResult:
    name: str
    passed: bool
    #: why it failed, or what it saw when it passed
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "reason": self.reason}


def gate_no_open_findings(scope: AccountScope) -> GateResult:
    """No open or failed finding about the account, a conversation it is in, or a supernode
    that is the home of one of its conversations."""
    counts = dict(scope.findings.counts) if scope.findings is not None else {}
    for sf, _homed in scope.source_holds:
        counts[(sf.kind, sf.state)] = counts.get((sf.kind, sf.state), 0) + sf.count
    if not counts:
        return GateResult("no_open_findings", True,
                          "no open or failed findings for the account or its conversations")
    total = sum(counts.values())
    states = {state for _kind, state in counts}
    which = states.pop() if len(states) == 1 else "open or failed"
    kinds = ", ".join(f"{k}{'' if st == 'open' else f' ({st})'}: {n}"
                      for (k, st), n in sorted(counts.items()))
    text = (f"{total} {which} finding{'s' if total != 1 else ''} for the account or its "
            f"conversations ({kinds})")
    some = scope.findings.sample_ids if scope.findings is not None else ()
    if some:
        text += f"; finding{'s' * (len(some) != 1)} {', '.join(map(str, some))}"
        if len(some) < sum(scope.findings.counts.values()):
            text += ", ..."
    for sf, homed in scope.source_holds:
        text += (f"; {sf.state} {sf.kind} of supernode {sf.source} (finding {sf.first_id}"
                 f"{f' and {sf.count - 1} more' if sf.count > 1 else ''}), the home of "
                 + (f"{homed} of its conversations" if sf.ring is not None
                    else "any of its conversations (the ring was not recorded)"))
    return GateResult("no_open_findings", False, text)


def gate_mirror_lag(live: Sequence[admin.WorkerRow], bound_ms: int) -> GateResult:
    """At least one live worker; none degraded; every measured lag under the bound.

    A lag the worker did not measure (no traffic in its window) is no lag.
    """
    if not live:
        return GateResult("mirror_lag", False, "no live bridge worker (no heartbeat within "
                                               f"{admin.LIVE_WORKER_MS // 1000} s)")
    problems = []
    for w in live:
        if w.state == "degraded":
            problems.append(f"worker {w.worker_id} is degraded")
        for label, lag in (("to cloud", w.lag_to_cloud_ms), ("to legacy", w.lag_to_legacy_ms)):
            if lag is not None and lag >= bound_ms:
                problems.append(f"worker {w.worker_id} lags {lag} ms {label}")
    if problems:
        return GateResult("mirror_lag", False,
                          "; ".join(problems) + f" (bound {bound_ms} ms)")
    worst = max((lag for w in live for lag in (w.lag_to_cloud_ms, w.lag_to_legacy_ms)
                 if lag is not None), default=None)
    seen = "no lag measured" if worst is None else f"worst lag {worst} ms"
    return GateResult("mirror_lag", True, f"{len(live)} live worker{'s' * (len(live) != 1)}, "
                                          f"{seen} (bound {bound_ms} ms)")


def gate_outbox_flowing(oldest_ms: int | None, bound_ms: int, now_ms: int) -> GateResult:
    """The cloud -> legacy leg is moving: no outbox row has waited longer than the bound."""
    if oldest_ms is None:
        return GateResult("outbox_flowing", True, "no outbox row waits for legacy")
    age = now_ms - oldest_ms
    if age > bound_ms:
        return GateResult("outbox_flowing", False,
                          f"the oldest outbox row to legacy has waited {_age(age)} "
                          f"(bound {_age(bound_ms)})")
    return GateResult("outbox_flowing", True,
                      f"the oldest outbox row to legacy has waited {_age(age)}")


def _age(ms: int) -> str:
    s = max(ms, 0) // 1000
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def gate_recent_clean_reconcile(run: admin.ReconcileRun | None, scope: AccountScope,
                                window_ms: int, now_ms: int) -> GateResult:
    """A clean gaps (or all) run finished within the window, and every conversation of the
    account with a legacy chat was compared clean within the window and after its last
    finding (its own, or one about its home supernode): a resumed run that compared only
    some conversations vouches for those alone."""
    if run is None or run.finished_ms is None:
        return GateResult("recent_clean_reconcile", False,
                          "no clean reconcile run (kind gaps or all) has finished")
    age = now_ms - run.finished_ms
    what = f"clean {run.kind} run {run.run_id} finished {_age(age)} ago"
    if age > window_ms:
        return GateResult("recent_clean_reconcile", False,
                          f"the last {what}; the window is {_age(window_ms)}")
    if scope.uncovered:
        n, total = len(scope.uncovered), scope.conversations
        shown = "; ".join(_uncovered(u, now_ms) for u in scope.uncovered[:3])
        more = f"; and {n - 3} more" if n > 3 else ""
        return GateResult("recent_clean_reconcile", False,
                          f"{n} of its {total} conversation{'s' * (total != 1)} not compared "
                          f"clean within {_age(window_ms)} and since its last finding: "
                          f"{shown}{more}")
    if scope.conversations:
        what += (f"; its {scope.conversations} conversation"
                 f"{'s' * (scope.conversations != 1)} compared clean since their last finding")
    return GateResult("recent_clean_reconcile", True, what)


def _uncovered(u: Uncovered, now_ms: int) -> str:
    clean = ("never compared clean" if u.last_clean_reconcile_ms is None
             else f"compared clean up to {_age(now_ms - u.last_clean_reconcile_ms)} ago")
    found = ("" if u.last_finding_ms is None
             else f", last finding {_age(now_ms - u.last_finding_ms)} ago")
    return f"chat {u.legacy_chat_id} {clean}{found}"


def gate_frozen(freeze: controls_store.Freeze | None, now_ms: int) -> GateResult:
    """No operator has frozen the migration (``bridgectl freeze on``)."""
    if freeze is None:
        return GateResult("frozen", True, "promotions are not frozen")
    at = datetime.datetime.fromtimestamp(freeze.set_ms / 1000, datetime.UTC)
    return GateResult("frozen", False,
                      f"promotions frozen by {freeze.set_by} at {at:%Y-%m-%d %H:%M:%S} UTC "
                      f"({_age(now_ms - freeze.set_ms)} ago): {freeze.reason}")


def evaluate_gates(account_id: uuid.UUID, inputs: GateInputs, config: GateConfig,
                   now_ms: int) -> tuple[GateResult, ...]:
    """Every gate for promoting *account_id*, in ``GATES`` order."""
    scope = inputs.scopes.get(account_id, AccountScope())
    return (gate_no_open_findings(scope),
            gate_mirror_lag(inputs.live_workers, config.lag_bound_ms),
            gate_outbox_flowing(inputs.oldest_outbox_ms, config.outbox_age_bound_ms, now_ms),
            gate_recent_clean_reconcile(inputs.last_clean_reconcile, scope,
                                        config.reconcile_window_ms, now_ms),
            gate_frozen(inputs.freeze, now_ms))


def overridable(gates: Sequence[GateResult]) -> bool:
    """Can force move past these failed gates? Not when one of them is ``UNFORCEABLE``."""
    return not any(g.name in UNFORCEABLE and not g.passed for g in gates)


@functools.lru_cache(maxsize=16)
def _ring(ring_ids: tuple[str, ...]) -> HashRing:
    """The ring a finding recorded, built once per process and shared with the answers it
    remembers: findings name few rings (the directory of their time), and every gate check
    of every account asked again (a ring hashes 64 points per supernode: in a simulated
    migration, rebuilding them for each account's move was 5% of the run)."""
    return HashRing(ring_ids)


def _homed_at(ring_ids: Sequence[str] | None, source: str, chat_id: str) -> bool:
    """Is *chat_id* homed at *source* on that ring? Always, when no ring was recorded
    (the finding then holds every conversation)."""
    if not ring_ids:
        return True
    return _ring(tuple(ring_ids)).home_of(chat_id) == source


def read_gate_inputs(conn: psycopg.Connection, account_ids: Sequence[uuid.UUID],
                     config: GateConfig, now_ms: int) -> GateInputs:
    """Read what the gates need for promoting *account_ids*, in the caller's transaction.

    Findings scoped to a whole supernode are matched to the accounts' conversations here,
    by the conversation's home on the ring the finding recorded (the bridge's directory when
    it was found): the store keeps no homes, and the ring of the time is the one under which
    the lost messages were homed. A finding without a ring holds every conversation.
    """
    holding = findings_store.holding_findings_for_accounts(conn, account_ids)
    coverage = admin.conversation_coverage(conn, account_ids)
    by_source = findings_store.source_findings(conn) if coverage else []

    conversations: dict[uuid.UUID, list[admin.ConversationCoverage]] = {}
    for c in coverage:
        conversations.setdefault(c.account_id, []).append(c)
    covered_after = now_ms - config.reconcile_window_ms
    scopes: dict[uuid.UUID, AccountScope] = {}
    for account_id in account_ids:
        convs = conversations.get(account_id, [])
        holds: dict[int, list[Any]] = {}  # first_id -> [SourceFinding, homed count]
        uncovered = []
        for c in convs:
            last = c.last_finding_ms
            for sf in by_source:
                if not _homed_at(sf.ring, sf.source, c.legacy_chat_id):
                    continue
                last = sf.newest_ms if last is None else max(last, sf.newest_ms)
                if sf.state in findings_store.HOLDING_STATES:
                    holds.setdefault(sf.first_id, [sf, 0])[1] += 1
            clean = c.last_clean_reconcile_ms
            if clean is None or clean < covered_after or (last is not None and clean <= last):
                uncovered.append(Uncovered(c.legacy_chat_id, clean, last))
        if account_id in holding or convs:
            scopes[account_id] = AccountScope(
                holding.get(account_id), tuple((sf, n) for sf, n in holds.values()),
                len(convs), tuple(uncovered))
    return GateInputs(
        live_workers=tuple(admin.live_workers(conn, now_ms, config.live_within_ms)),
        last_clean_reconcile=admin.last_clean_reconcile(conn), scopes=scopes,
        oldest_outbox_ms=admin.oldest_pending_outbox_ms(conn),
        freeze=controls_store.read_freeze(conn))


def finding_rows(conn: psycopg.Connection, *,
                 states: Sequence[str] = findings_store.HOLDING_STATES, kind: str | None = None,
                 account_id: uuid.UUID | None = None, conversation_id: uuid.UUID | None = None,
                 limit: int = 100) -> list[dict[str, Any]]:
    """What ``bridgectl findings list`` shows: findings in *states* (default: open and
    failed, the ones the gates count), newest first, filtered by *kind*; with *account_id*
    those in its scope (``gate_no_open_findings``'s), with *conversation_id* those about
    that conversation, findings about the home supernode of a conversation in scope
    included (homed on the ring the finding recorded)."""
    rows = findings_store.finding_rows(conn, states=states, kind=kind, account_id=account_id,
                                       conversation_id=conversation_id, limit=limit)
    if account_id is None and conversation_id is None:
        return rows
    chats = set()
    if account_id is not None:
        chats = {c.legacy_chat_id for c in admin.conversation_coverage(conn, [account_id])
                 if conversation_id is None or c.conversation_id == conversation_id}
    else:
        row = conn.execute("SELECT legacy_chat_id FROM conversations "
                           "WHERE conversation_id = %s", (conversation_id,)).fetchone()
        chats = {row[0]} if row is not None and row[0] is not None else set()
    for r in findings_store.source_finding_rows(conn, states, kind):
        ring = r["detail"].get("ring")
        ring = tuple(ring) if isinstance(ring, list) else None
        if any(_homed_at(ring, r["source"], chat) for chat in chats):
            rows.append(r)
    rows.sort(key=lambda r: (r["created_ms"], r["finding_id"]), reverse=True)
    return rows[:limit]
