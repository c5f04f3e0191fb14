"""The audit log: one row per operator action and per repair, written in the transaction
that makes the change (so a change and its record commit or vanish together).

``at`` is the caller's injected clock, never PostgreSQL's ``now()``: a simulated migration's
audit log reads in simulated time, like the rest of its records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def record(conn: psycopg.Connection, action: str, subject: str, *, actor: str, now_ms: int,
           detail: Mapping[str, Any]) -> None:
    """Append one ``audit_log`` row: *actor* did *action* to *subject* at *now_ms*."""
    conn.execute("INSERT INTO audit_log (at, actor, action, subject, detail) "
                 "VALUES (to_timestamp(%s / 1000.0), %s, %s, %s, %s)",
                 (now_ms, actor, action, subject, Jsonb(dict(detail))))
