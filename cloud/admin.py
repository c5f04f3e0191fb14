"""Operator transactions: migration phases and what ``status`` reads.

Same shape as ``cloud.store``: one plain function per transaction, ``fn(conn, ...)``, called
inside a transaction (see ``cloud.db``), parameterised SQL, the current time passed in as
milliseconds. The migration rules (which moves are allowed, the gates) belong to the caller;
these functions only read what the gates need and write what was decided, with its audit row.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import psycopg

from cloud.model import LEGACY_CLIENT_PHASES, PHASES, Account
from cloud.store import audit as audit_store
from cloud.store import findings as findings_store
from cloud.store import outbox_backfill
from cloud.store.errors import Conflict, NotFound
from cloud.store.outbox import PENDING_BY_AGE

#: A bridge worker counts as live while its last heartbeat is younger than this.
LIVE_WORKER_MS = 30_000
#: Reconcile kinds whose clean run vouches for the mirrored messages (the migration gate).
CLEAN_RECONCILE_KINDS = ("gaps", "all")
#: The states of a reconcile finding (``reconcile_findings.state``), in display order.
FINDING_STATES = findings_store.FINDING_STATES


class PhaseChanged(Conflict):
    """The account's phase is no longer the one the caller planned from."""

    code = "phase_changed"

    def __init__(self, account_id: uuid.UUID, expected: str, current: str) -> None:
        super().__init__(f"account {account_id} is in phase {current!r} now, "
                         f"not {expected!r} as planned")
        self.account_id = account_id
        self.expected = expected
        self.current = current


@attrs.frozen
class AppliedChange:
    """What ``apply_phase_change`` did."""

    #: False: the account was in the target phase already (nothing written)
    moved: bool
    #: what a move out of cloud-only queued for legacy (None for every other move)
    backfill: outbox_backfill.Backfill | None = None


@attrs.frozen
class WorkerRow:
    """One row of ``bridge_workers``: a bridge worker's last report of itself."""

    worker_id: str
    state: str
    started_ms: int
    heartbeat_ms: int
    lag_to_cloud_ms: int | None
    lag_to_legacy_ms: int | None
    mirrored_to_cloud: int
    mirrored_to_legacy: int
    feeds: int
    #: the rest of its report (``bridge.worker``): per-feed states, p50 lags, the lag
    #: outside faults (``lag_to_cloud``/``lag_to_legacy``: p99_steady_ms, samples,
    #: met_faults), the outbox as its injector last read it
    detail: dict = attrs.field(factory=dict)

    def live(self, now_ms: int, within_ms: int = LIVE_WORKER_MS) -> bool:
        """Heartbeat within *within_ms* of now, and not reported as stopped."""
        return self.state != "stopped" and now_ms - self.heartbeat_ms < within_ms


@attrs.frozen
class ReconcileRun:
    run_id: int
    kind: str
    state: str
    started_ms: int
    finished_ms: int | None
    #: ``report.clean`` of a run that wrote a report, else None
    clean: bool | None
    #: what a targeted run was limited to ('account:HANDLE', 'conversation:UUID'); None:
    #: a full pass
    scope: str | None = None
    #: how far its pass is (``progress.done`` of ``progress.total``, units of its kind;
    #: None: the reconciler does not count its pass)
    done: int | None = None
    total: int | None = None
    #: the seconds still to go as the run estimated them when it saved (``progress.eta_s``)
    #: and when that was (``progress.updated_ms``)
    eta_s: float | None = None
    updated_ms: int | None = None

    def progress_ratio(self) -> float | None:
        """How much of its pass is done, 0..1: 1 once finished; None when not counted."""
        if self.state == "finished":
            return 1.0
        if self.total is None or self.done is None:
            return None
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)

    def eta_seconds(self, now_ms: int) -> float | None:
        """Seconds until a running run's pass is done: its estimate at its last save, less
        the time since (never below 0). None for a run not running, or without an
        estimate yet."""
        if self.state != "running" or self.eta_s is None or self.updated_ms is None:
            return None
        return max(0.0, self.eta_s - max(0, now_ms - self.updated_ms) / 1000)


@attrs.frozen
class Lease:
    name: str
    holder: str
    fence: int
    expires_ms: int


# ---------------------------------------------------------------- accounts and phases

_ACCOUNT_COLS = "account_id, handle, phase, legacy_handle, display_name"


def _account(row: Sequence[Any]) -> Account:
    return Account(row[0], row[1], row[2], row[3], row[4])


def accounts_per_phase(conn: psycopg.Connection) -> dict[str, int]:
    """How many accounts are in each phase (every phase present, zero if none)."""
    counts = dict.fromkeys(PHASES, 0)
    for phase, n in conn.execute("SELECT phase, count(*) FROM accounts GROUP BY 1"):
        counts[phase] = n
    return counts


def find_accounts(conn: psycopg.Connection,
                  refs: Sequence[str]) -> tuple[list[Account], list[str]]:
    """Accounts named by account id or handle, in the order named, each once; and the refs
    that name no account. A ref that looks like an id but is none is tried as a handle."""
    as_ids: dict[str, uuid.UUID] = {}
    for ref in refs:
        try:
            as_ids[ref] = uuid.UUID(ref)
        except ValueError:
            pass  # not an id: a handle
    by_id = {r[0]: _account(r) for r in conn.execute(
        f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE account_id = ANY(%s)",
        (list(set(as_ids.values())),))}
    by_handle = {r[0]: _account(r[1:]) for r in conn.execute(
        f"SELECT h.handle, {', '.join('a.' + c for c in _ACCOUNT_COLS.split(', '))} "
        "FROM account_handles h JOIN accounts a USING (account_id) WHERE h.handle = ANY(%s)",
        (list({r for r in refs if as_ids.get(r) not in by_id}),))}
    found: list[Account] = []
    seen: set[uuid.UUID] = set()
    unknown: list[str] = []
    for ref in refs:
        account_id = as_ids.get(ref)
        account = by_id.get(account_id) if account_id is not None else None
        if account is None:
            account = by_handle.get(ref)
        if account is None:
            unknown.append(ref)
        elif account.account_id not in seen:
            seen.add(account.account_id)
            found.append(account)
    return found, unknown


def cohort_bucket(account_id: uuid.UUID) -> int:
    """The account's cohort bucket, 0..99: the first 4 bytes of sha256 of the id's text form,
    as an unsigned big-endian integer, mod 100. ``cohort_accounts`` computes the same in SQL.
    """
    digest = hashlib.sha256(str(account_id).encode("ascii")).digest()
    return int.from_bytes(digest[:4], "big") % 100


_COHORT_BUCKET_SQL = ("mod(('x' || substr(encode(sha256(convert_to(account_id::text, 'UTF8')), "
                      "'hex'), 1, 8))::bit(32)::bigint, 100)")


def cohort_accounts(conn: psycopg.Connection, percent: int) -> list[Account]:
    """The linked (legacy) accounts in the *percent* % cohort: those whose bucket is below it.

    Buckets depend only on the account id, so a cohort is the same on every run and raising
    *percent* only adds accounts. Cloud-native accounts (no legacy handle) are never in one.
    """
    if not 0 <= percent <= 100:
        raise ValueError("percent must be within 0..100")
    rows = conn.execute(
        f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE legacy_handle IS NOT NULL "
        f"AND {_COHORT_BUCKET_SQL} < %s ORDER BY handle", (percent,)).fetchall()
    return [_account(r) for r in rows]


def apply_phase_change(conn: psycopg.Connection, account_id: uuid.UUID, from_phase: str,
                       to_phase: str, *, actor: str, now_ms: int, forced: bool = False,
                       gates: Sequence[Mapping[str, Any]] = (),
                       backfill_since_ms: int | None = None,
                       cohort: str | None = None) -> AppliedChange:
    """Move an account from *from_phase* to *to_phase* and write its ``audit_log`` row.

    The account row is locked first (after its conversations, for a move out of
    cloud-only, whose back-fill locks them); if its phase is no longer *from_phase* the move is
    refused (``PhaseChanged``) unless it already is *to_phase*, in which case nothing is
    written and ``moved`` is False (a re-run of a move that committed).

    A move out of cloud-only (into a phase with legacy clients) first queues for legacy what
    it missed in the account's conversations, sent at or after *backfill_since_ms*
    (``cloud.store.outbox_backfill.backfill_outbox``), in this same transaction: the back-fill and
    the phase commit together or not at all, and the audit row says what was queued.
    A move made by a named cohort's command keeps the cohort's name in the audit row.
    """
    if from_phase not in PHASES or to_phase not in PHASES:
        raise ValueError(f"unknown phase in {from_phase!r} -> {to_phase!r}")
    leaves_cloud_only = from_phase == PHASES[-1] and to_phase in LEGACY_CLIENT_PHASES
    if leaves_cloud_only and backfill_since_ms is None:
        raise ValueError("a move out of cloud-only queues what legacy missed: "
                         "backfill_since_ms is required")
    if leaves_cloud_only:
        # The back-fill locks the account's conversations: take them before the account, in
        # the order a post takes its locks (conversations, then the members' accounts), so
        # that a post and this move wait for each other instead of deadlocking.
        conn.execute("SELECT c.conversation_id FROM conversations c JOIN members mb "
                     "USING (conversation_id) WHERE mb.account_id = %s "
                     "ORDER BY c.conversation_id FOR NO KEY UPDATE OF c", (account_id,))
    row = conn.execute("SELECT phase, handle FROM accounts WHERE account_id = %s FOR UPDATE",
                       (account_id,)).fetchone()
    if row is None:
        raise NotFound(f"no account {account_id}")
    current, handle = row
    if current == to_phase and current != from_phase:
        return AppliedChange(False)
    if current != from_phase:
        raise PhaseChanged(account_id, from_phase, current)
    if from_phase == to_phase:
        return AppliedChange(False)
    backfill = None
    detail: dict[str, Any] = {"from": from_phase, "to": to_phase, "handle": handle,
                              "forced": forced, "gates": [dict(g) for g in gates]}
    if cohort is not None:
        detail["cohort"] = cohort
    if leaves_cloud_only:
        assert backfill_since_ms is not None
        backfill = outbox_backfill.backfill_outbox(conn, account_id, backfill_since_ms, now_ms)
        detail["backfill"] = {**backfill.to_json(), "since_ms": backfill_since_ms}
    conn.execute("UPDATE accounts SET phase = %s, phase_changed_at = to_timestamp(%s / 1000.0) "
                 "WHERE account_id = %s", (to_phase, now_ms, account_id))
    audit_store.record(conn, "phase_change", str(account_id), actor=actor, now_ms=now_ms,
                       detail=detail)
    return AppliedChange(True, backfill)


def phase_history(conn: psycopg.Connection, account_id: uuid.UUID,
                  limit: int = 200) -> list[dict[str, Any]]:
    """The account's phase changes from the audit log (``apply_phase_change``'s rows), the
    newest *limit* of them, oldest first: when, who, from, to, forced, the cohort that made
    it, the gates that failed (a forced move) and what a move out of cloud-only queued."""
    rows = conn.execute(
        "SELECT ms, actor, detail FROM ("
        "  SELECT audit_id, (extract(epoch FROM at) * 1000)::bigint AS ms, actor, detail "
        "  FROM audit_log WHERE subject = %s AND action = 'phase_change' "
        "  ORDER BY audit_id DESC LIMIT %s) newest ORDER BY audit_id",
        (str(account_id), limit)).fetchall()
    return [{"at_ms": ms, "actor": actor, "from": d.get("from"), "to": d.get("to"),
             "forced": bool(d.get("forced")), "cohort": d.get("cohort"),
             "failed_gates": [g.get("name") for g in d.get("gates", ()) if not g.get("passed")],
             "queued_for_legacy": (d.get("backfill") or {}).get("queued_for_legacy")}
            for ms, actor, d in rows]


# ---------------------------------------------------------------- what the gates read

@attrs.frozen
class ConversationCoverage:
    """One of an account's conversations with a legacy chat, and what a clean reconcile
    vouched for in it."""

    account_id: uuid.UUID
    conversation_id: uuid.UUID
    legacy_chat_id: str
    #: the watermark of the newest gaps pass that compared it clean, or vouched for it
    #: from the dirty set (see ``conversation_coverage``; None: never compared clean)
    last_clean_reconcile_ms: int | None
    #: when its newest finding about messages was made, whatever its state but dismissed
    #: (None: none)
    last_finding_ms: int | None


#: Finding kinds that are not about messages: a clean gaps compare does not answer them, so
#: they do not ask for one (SQL LIKE patterns).
NOT_MESSAGE_FINDINGS = ("notification\\_%", "presence\\_%")


def conversation_coverage(conn: psycopg.Connection, account_ids: Sequence[uuid.UUID]
                          ) -> list[ConversationCoverage]:
    """The accounts' conversations that have a legacy chat (those the gaps reconciler
    compares), each with its clean-compare watermark and its newest message finding.

    A conversation compared clean once and not in the dirty set since (``digest_dirty``:
    no write changed it, no compare found it different) is clean up to the newest pass
    that went through everything it had to compare (``gaps_clean_through``)."""
    if not account_ids:
        return []
    rows = conn.execute(
        "SELECT m.account_id, c.conversation_id, c.legacy_chat_id, "
        "  CASE WHEN c.last_clean_reconcile_ms IS NOT NULL AND NOT EXISTS ("
        "         SELECT 1 FROM digest_dirty d WHERE d.conversation_id = c.conversation_id) "
        "       THEN greatest(c.last_clean_reconcile_ms, "
        "                     (SELECT watermark_ms FROM gaps_clean_through)) "
        "       ELSE c.last_clean_reconcile_ms END, "
        "  (SELECT max(f.created_ms) FROM reconcile_findings f "
        "    WHERE f.conversation_id = c.conversation_id AND f.state <> 'dismissed' "
        "      AND NOT f.kind LIKE ANY(%(skip)s)) "
        "FROM members m JOIN conversations c USING (conversation_id) "
        "WHERE m.account_id = ANY(%(ids)s) AND c.legacy_chat_id IS NOT NULL "
        "ORDER BY 1, 2",
        {"ids": list(account_ids), "skip": list(NOT_MESSAGE_FINDINGS)}).fetchall()
    return [ConversationCoverage(*r) for r in rows]


_WORKER_COLS = ("worker_id, state, started_ms, heartbeat_ms, lag_to_cloud_ms, lag_to_legacy_ms, "
                "mirrored_to_cloud, mirrored_to_legacy, feeds, coalesce(detail, '{}'::jsonb)")


def workers(conn: psycopg.Connection) -> list[WorkerRow]:
    """Every bridge worker that ever reported, newest heartbeat first."""
    rows = conn.execute(f"SELECT {_WORKER_COLS} FROM bridge_workers "
                        "ORDER BY heartbeat_ms DESC, worker_id").fetchall()
    return [WorkerRow(*r) for r in rows]


def live_workers(conn: psycopg.Connection, now_ms: int,
                 within_ms: int = LIVE_WORKER_MS) -> list[WorkerRow]:
    """Live workers (``WorkerRow.live``) with their lags: the one rule the gates, status,
    the gaps watermark and the worker's lease share use."""
    rows = conn.execute(f"SELECT {_WORKER_COLS} FROM bridge_workers "
                        "WHERE heartbeat_ms > %s AND state <> 'stopped' ORDER BY worker_id",
                        (now_ms - within_ms,)).fetchall()
    return [WorkerRow(*r) for r in rows]


_RUN_COLS = ("run_id, kind, state, started_ms, finished_ms, "
             "CASE WHEN report ? 'clean' THEN report->>'clean' = 'true' END, scope, "
             "(progress->>'done')::bigint, (progress->>'total')::bigint, "
             "(progress->>'eta_s')::float8, (progress->>'updated_ms')::bigint")
#: Targeted runs ``status`` lists at most.
TARGETED_RUNS_SHOWN = 10


def last_clean_reconcile(conn: psycopg.Connection) -> ReconcileRun | None:
    """The newest finished full (not targeted) reconcile run of a kind that checks messages
    and reported clean."""
    row = conn.execute(
        f"SELECT {_RUN_COLS} FROM reconcile_runs WHERE state = 'finished' AND scope IS NULL "
        "AND kind = ANY(%s) AND report->>'clean' = 'true' AND finished_ms IS NOT NULL "
        "ORDER BY finished_ms DESC, run_id DESC LIMIT 1",
        (list(CLEAN_RECONCILE_KINDS),)).fetchone()
    return None if row is None else ReconcileRun(*row)


def oldest_pending_outbox_ms(conn: psycopg.Connection) -> int | None:
    """When the oldest outbox row still waiting for the legacy network was written (None:
    none waits); one read of the index of pending rows by age, whatever the backlog."""
    return conn.execute("SELECT min(created_ms) FROM outbox_to_legacy "
                        f"WHERE {PENDING_BY_AGE}").fetchone()[0]


# ---------------------------------------------------------------- what status reads

def findings_by_state(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """Findings per kind and state, every state present (zero if none): what the
    reconcilers found and what became of it (the status page's open vs repaired counts)."""
    out: dict[str, dict[str, int]] = {}
    for kind, state, n in conn.execute("SELECT kind, state, count(*) FROM reconcile_findings "
                                       "GROUP BY 1, 2 ORDER BY 1, 2"):
        out.setdefault(kind, dict.fromkeys(FINDING_STATES, 0))[state] = n
    return out


def last_reconcile_runs(conn: psycopg.Connection) -> dict[str, ReconcileRun]:
    """The most recently started full (not targeted) run of each kind, whatever its state.

    The bridge worker reads it on every heartbeat, so it never reads the runs' history: the
    kinds are found by skipping through the index (``reconcile_runs_latest``) one kind at a
    time, and each kind's newest run is one more index read."""
    rows = conn.execute(
        "WITH RECURSIVE kinds(kind) AS ("
        "  (SELECT kind FROM reconcile_runs WHERE scope IS NULL ORDER BY kind LIMIT 1)"
        "  UNION ALL"
        "  SELECT (SELECT r.kind FROM reconcile_runs r WHERE r.scope IS NULL "
        "          AND r.kind > k.kind ORDER BY r.kind LIMIT 1)"
        "  FROM kinds k WHERE k.kind IS NOT NULL) "
        "SELECT latest.* FROM kinds, LATERAL ("
        f"  SELECT {_RUN_COLS} FROM reconcile_runs r WHERE r.kind = kinds.kind "
        "   AND r.scope IS NULL ORDER BY r.started_ms DESC, r.run_id DESC LIMIT 1) latest "
        "WHERE kinds.kind IS NOT NULL ORDER BY latest.kind").fetchall()
    return {r[1]: ReconcileRun(*r) for r in rows}


def targeted_reconcile_runs(conn: psycopg.Connection,
                            limit: int = TARGETED_RUNS_SHOWN) -> list[ReconcileRun]:
    """The most recently started targeted runs (``scope`` set), newest first."""
    rows = conn.execute(
        f"SELECT {_RUN_COLS} FROM reconcile_runs WHERE scope IS NOT NULL "
        "ORDER BY started_ms DESC, run_id DESC LIMIT %s", (limit,)).fetchall()
    return [ReconcileRun(*r) for r in rows]


def leases(conn: psycopg.Connection) -> list[Lease]:
    rows = conn.execute("SELECT name, holder, fence, expires_ms FROM leases "
                        "ORDER BY name").fetchall()
    return [Lease(*r) for r in rows]
