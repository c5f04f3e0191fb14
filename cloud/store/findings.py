"""Findings: divergences the reconcilers repair (a feed gap, a refused injection, ...).

Lifecycle::

    open ──> repaired        the divergence is gone (a repair, or a later clean compare)
      │  ──> failed          a repair was tried and did not work: still divergent
      │  ──> unrecoverable   the legacy network's own loss: reported apart, never "repaired"
      └──> dismissed         an operator looked and let it go (audited)
    failed ──> repaired | dismissed

A finding names what it concerns as narrowly as can be known: its conversation, its account
(``account_id``, or several in ``detail.account_ids``), else the legacy supernode it concerns
as a whole (``source``, e.g. a feed gap, whose lost messages can not be named). The migration
gates count the ``open`` and ``failed`` ones in an account's scope (``HOLDING_STATES``).
The bridge only opens findings; the reconcilers and operators move them on.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg
from psycopg.types.json import Jsonb

from cloud.store.errors import Conflict, NotFound

#: Every state, in display order.
FINDING_STATES = ("open", "repaired", "failed", "unrecoverable", "dismissed")
#: States that hold the migration gates: the divergence is still there.
HOLDING_STATES = ("open", "failed")


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
    row = conn.execute("SELECT state FROM reconcile_findings WHERE finding_id = %s FOR UPDATE",
                       (finding_id,)).fetchone()
    if row is None:
        raise NotFound(f"no finding {finding_id}")
    if row[0] not in HOLDING_STATES:
        raise Conflict(f"finding {finding_id} is {row[0]}, not open or failed")
    conn.execute(
        "UPDATE reconcile_findings SET state = 'dismissed', resolved_ms = %s, "
        "detail = detail || jsonb_build_object('dismissed_by', %s::text, 'why', %s::text, "
        "'was', %s::text) WHERE finding_id = %s",
        (now_ms, actor, why, row[0], finding_id))
    conn.execute(
        "INSERT INTO audit_log (at, actor, action, subject, detail) "
        "VALUES (to_timestamp(%s / 1000.0), %s, 'finding_dismissed', %s, %s)",
        (now_ms, actor, str(finding_id), Jsonb({"why": why, "was": row[0]})))
    return row[0]
