"""Findings: divergences the reconcilers repair (a feed gap, a refused injection, ...).

Lifecycle::

    open ──> repaired        the divergence is gone (a repair, or a later clean compare)
      │  ──> failed          a repair was tried and did not work: still divergent
      │  ──> unrecoverable   the legacy network's own loss: reported apart, never "repaired"
      └──> dismissed         an operator looked and let it go (audited)
    failed ──> repaired | dismissed

An operator closes an open or failed one by hand: ``resolve_finding`` (repaired, with a
note) or ``dismiss_finding`` (with a reason), each audited.

A finding names what it concerns as narrowly as can be known: its conversation, its account
(``account_id``, or several in ``detail.account_ids``), else the legacy supernode it concerns
as a whole (``source``, e.g. a feed gap, whose lost messages can not be named). The migration
gates count the ``open`` and ``failed`` ones in an account's scope (``HOLDING_STATES``).
The bridge only opens findings; the reconcilers and operators move them on.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb

from cloud.store import audit as audit_store
from cloud.store.errors import Conflict, NotFound

#: Every state, in display order.
FINDING_STATES = ("open", "repaired", "failed", "unrecoverable", "dismissed")
#: States that hold the migration gates: the divergence is still there.
HOLDING_STATES = ("open", "failed")
#: Every kind of finding the code records (``bridgectl findings list --kind`` checks a name
#: against it).
FINDING_KINDS = ("feed_gap", "mirror_refused", "inject_refused", "inject_failed",
                 "missing_in_cloud", "missing_in_legacy", "notification_failed",
                 "notification_missing", "notification_resent", "presence_corrected")


def record_finding(conn: psycopg.Connection, kind: str, detail: dict, now_ms: int, *,
                   conversation_id: uuid.UUID | None = None,
                   account_id: uuid.UUID | None = None, run_id: int | None = None,
                   account_ids: Sequence[uuid.UUID] = (), source: str | None = None) -> int:
    """Open a finding for the reconcilers (a feed gap, a refused injection, ...).

    *account_ids* names several accounts (kept in ``detail.account_ids``); *source* scopes
    it to everything homed at that legacy supernode, for when no conversation is known.
    """
    if account_ids:
        detail = {**detail, "account_ids": sorted(str(a) for a in account_ids)}
    return conn.execute(
        "INSERT INTO reconcile_findings (run_id, kind, state, conversation_id, account_id, "
        "source, detail, created_ms) VALUES (%s, %s, 'open', %s, %s, %s, %s, %s) "
        "RETURNING finding_id",
        (run_id, kind, conversation_id, account_id, source, Jsonb(detail),
         now_ms)).fetchone()[0]


def dismiss_finding(conn: psycopg.Connection, finding_id: int, *, actor: str, why: str,
                    now_ms: int) -> str:
    """An operator lets an open or failed finding go: state ``dismissed``, with who and why
    in its detail and an ``audit_log`` row. Returns the state it had. ``NotFound`` for no
    such finding; ``Conflict`` when it is no longer open or failed (nothing written)."""
    return _close_by_operator(conn, finding_id, "dismissed", "finding_dismissed", now_ms,
                              {"dismissed_by": actor, "why": why}, actor, {"why": why})


def resolve_finding(conn: psycopg.Connection, finding_id: int, *, actor: str, note: str,
                    now_ms: int) -> str:
    """An operator repaired an open or failed finding's divergence by hand: state
    ``repaired``, with who and the note in its detail and an ``audit_log`` row
    (``finding_resolved``). Unlike a dismissal it says the divergence is gone, so a message
    finding still asks for a clean compare after it (as any repaired one does). Returns the
    state it had; ``NotFound`` / ``Conflict`` as ``dismiss_finding``."""
    return _close_by_operator(conn, finding_id, "repaired", "finding_resolved", now_ms,
                              {"resolved_by": actor, "note": note}, actor, {"note": note})


def _close_by_operator(conn: psycopg.Connection, finding_id: int, to_state: str, action: str,
                       now_ms: int, detail: dict[str, str], actor: str,
                       audit: dict[str, str]) -> str:
    row = conn.execute("SELECT state FROM reconcile_findings WHERE finding_id = %s FOR UPDATE",
                       (finding_id,)).fetchone()
    if row is None:
        raise NotFound(f"no finding {finding_id}")
    if row[0] not in HOLDING_STATES:
        raise Conflict(f"finding {finding_id} is {row[0]}, not open or failed")
    conn.execute(
        "UPDATE reconcile_findings SET state = %s, resolved_ms = %s, detail = detail || %s "
        "WHERE finding_id = %s",
        (to_state, now_ms, Jsonb({**detail, "was": row[0]}), finding_id))
    audit_store.record(conn, action, str(finding_id), actor=actor, now_ms=now_ms,
                       detail={**audit, "was": row[0]})
    return row[0]


def finding_detail(conn: psycopg.Connection, finding_id: int) -> dict[str, Any] | None:
    """One finding in full, as a JSON-able dict (None: no such finding): every column, and
    what operators did to it (its ``audit_log`` rows, oldest first)."""
    row = conn.execute(
        f"SELECT {_FINDING_COLS}, f.run_id, f.resolved_ms FROM reconcile_findings f "
        "WHERE f.finding_id = %s", (finding_id,)).fetchone()
    if row is None:
        return None
    out = {**_finding_row(row), "run_id": row[8], "resolved_ms": row[9]}
    out["history"] = [
        {"at_ms": at_ms, "actor": actor, "action": action, "detail": detail}
        for at_ms, actor, action, detail in conn.execute(
            "SELECT (extract(epoch FROM at) * 1000)::bigint, actor, action, detail "
            "FROM audit_log WHERE subject = %s AND action LIKE 'finding\\_%%' "
            "ORDER BY at, audit_id", (str(finding_id),))]
    return out


# ---------------------------------------------------------------- what holds the gates

@attrs.frozen
class HoldingFindings:
    """Open or failed findings about one account or a conversation it is in, by
    ``(kind, state)``; the ids of some, for the operator to look up."""

    counts: Mapping[tuple[str, str], int]
    sample_ids: tuple[int, ...] = ()


@attrs.frozen
class SourceFinding:
    """Findings scoped to a whole legacy supernode (``reconcile_findings.source``) that
    share a kind, a state and a ring: how many, the newest's time, the lowest id."""

    kind: str
    state: str
    source: str
    #: the supernode ids the homes were computed on when it was found (None: not recorded)
    ring: tuple[str, ...] | None
    count: int
    newest_ms: int
    first_id: int


def holding_findings_for_accounts(conn: psycopg.Connection, account_ids: Sequence[uuid.UUID]
                                  ) -> dict[uuid.UUID, HoldingFindings]:
    """Open and failed findings per account: those naming the account (``account_id`` or
    ``detail.account_ids``) and those about any conversation it is a member of. Findings
    scoped to a supernode are not here (``source_findings``: their homes need the ring).
    Accounts without any are missing from the result."""
    if not account_ids:
        return {}
    rows = conn.execute(
        "WITH acct AS (SELECT unnest(%(ids)s::uuid[]) AS account_id), "
        "hits AS ("
        "  SELECT acct.account_id, f.finding_id, f.kind, f.state FROM acct "
        "  JOIN reconcile_findings f ON f.account_id = acct.account_id "
        "    AND f.state = ANY(%(holding)s) "
        "  UNION "
        "  SELECT acct.account_id, f.finding_id, f.kind, f.state FROM acct "
        "  JOIN reconcile_findings f ON f.account_id IS NULL AND f.state = ANY(%(holding)s) "
        "    AND f.detail->'account_ids' ? acct.account_id::text "
        "  UNION "
        "  SELECT acct.account_id, f.finding_id, f.kind, f.state FROM acct "
        "  JOIN members m ON m.account_id = acct.account_id "
        "  JOIN reconcile_findings f ON f.conversation_id = m.conversation_id "
        "    AND f.state = ANY(%(holding)s)) "
        "SELECT account_id, kind, state, count(*), "
        "       (array_agg(finding_id ORDER BY finding_id))[1:5] "
        "FROM hits GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        {"ids": list(account_ids), "holding": list(HOLDING_STATES)}).fetchall()
    counts: dict[uuid.UUID, dict[tuple[str, str], int]] = {}
    samples: dict[uuid.UUID, list[int]] = {}
    for account_id, kind, state, n, some in rows:
        counts.setdefault(account_id, {})[(kind, state)] = n
        samples.setdefault(account_id, []).extend(some)
    return {a: HoldingFindings(c, tuple(sorted(samples[a])[:5])) for a, c in counts.items()}


_FINDING_COLS = ("f.finding_id, f.kind, f.state, f.conversation_id, f.account_id, f.source, "
                 "f.created_ms, f.detail")


def _finding_row(r: Sequence[Any]) -> dict[str, Any]:
    return {"finding_id": r[0], "kind": r[1], "state": r[2],
            "conversation_id": None if r[3] is None else str(r[3]),
            "account_id": None if r[4] is None else str(r[4]), "source": r[5],
            "created_ms": r[6], "detail": r[7]}


def finding_rows(conn: psycopg.Connection, *, states: Sequence[str] = HOLDING_STATES,
                 kind: str | None = None, account_id: uuid.UUID | None = None,
                 conversation_id: uuid.UUID | None = None,
                 limit: int = 100) -> list[dict[str, Any]]:
    """Findings in *states* (default: open and failed), newest first, as JSON-able rows;
    only those of *kind*, about *conversation_id*, or naming *account_id* or a conversation
    it is in, when given. Findings about a whole supernode are among the unscoped ones but
    not an account's or a conversation's: their homes need the ring
    (``source_finding_rows``)."""
    where = ["f.state = ANY(%(states)s)"]
    if kind is not None:
        where.append("f.kind = %(kind)s")
    if conversation_id is not None:
        where.append("f.conversation_id = %(c)s")
    if account_id is not None:
        where.append("(f.account_id = %(a)s OR f.detail->'account_ids' ? %(a)s::text "
                     " OR f.conversation_id IN (SELECT conversation_id FROM members "
                     "                          WHERE account_id = %(a)s))")
    rows = conn.execute(
        f"SELECT {_FINDING_COLS} FROM reconcile_findings f WHERE {' AND '.join(where)} "
        "ORDER BY f.created_ms DESC, f.finding_id DESC LIMIT %(n)s",
        {"states": list(states), "kind": kind, "c": conversation_id, "a": account_id,
         "n": limit})
    return [_finding_row(r) for r in rows]


def source_finding_rows(conn: psycopg.Connection, states: Sequence[str] = HOLDING_STATES,
                        kind: str | None = None) -> list[dict[str, Any]]:
    """Findings about a whole supernode in *states* (default: open and failed; few: feed
    gaps not yet covered), newest first, as JSON-able rows."""
    return [_finding_row(r) for r in conn.execute(
        f"SELECT {_FINDING_COLS} FROM reconcile_findings f WHERE f.source IS NOT NULL "
        "AND f.state = ANY(%s) AND (%s::text IS NULL OR f.kind = %s) "
        "ORDER BY f.created_ms DESC, f.finding_id DESC",
        (list(states), kind, kind))]


def source_findings(conn: psycopg.Connection) -> list[SourceFinding]:
    """Every finding scoped to a whole supernode but dismissed ones, grouped by kind, state,
    supernode and ring: the open and failed ones hold the accounts homed there, and every
    one asks for a clean compare of those conversations after it."""
    rows = conn.execute(
        "SELECT kind, state, source, detail->'ring', count(*), max(created_ms), "
        "       min(finding_id) FROM reconcile_findings "
        "WHERE source IS NOT NULL AND state <> 'dismissed' "
        "GROUP BY kind, state, source, detail->'ring' ORDER BY 3, 1, 2").fetchall()
    return [SourceFinding(kind, state, source,
                          tuple(ring) if isinstance(ring, list) else None, n, newest, first)
            for kind, state, source, ring, n, newest, first in rows]
