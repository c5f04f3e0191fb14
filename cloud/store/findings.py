"""Findings: divergences the reconcilers repair (a feed gap, a refused injection, ...).

Their lifecycle (open -> repaired | failed | unrecoverable | dismissed) belongs to the
reconcilers and the operator; the bridge only opens them. ``unrecoverable`` is the legacy
network's own loss (a feed gap whose entries died with a supernode's memory): reported apart,
never called repaired.
"""

from __future__ import annotations

import uuid

import psycopg
from psycopg.types.json import Jsonb


def record_finding(conn: psycopg.Connection, kind: str, detail: dict, now_ms: int, *,
                   conversation_id: uuid.UUID | None = None,
                   account_id: uuid.UUID | None = None, run_id: int | None = None) -> int:
    """Open a finding for the reconcilers (a feed gap, a refused injection, ...)."""
    return conn.execute(
        "INSERT INTO reconcile_findings (run_id, kind, state, conversation_id, account_id, "
        "detail, created_ms) VALUES (%s, %s, 'open', %s, %s, %s, %s) RETURNING finding_id",
        (run_id, kind, conversation_id, account_id, Jsonb(detail), now_ms)).fetchone()[0]
