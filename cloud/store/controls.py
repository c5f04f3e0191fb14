"""Operator controls: deployment-wide switches an operator turns on and off (audited).

A switch is on while its row exists in ``operator_controls`` (its name, a JSON value, who
set it and when) and off when there is none. The first is the migration freeze
(``MIGRATION_FREEZE``): while it is on, the migration gates hold every promotion.
Turning a switch on that is already on, or off that is already off, is refused
(``Conflict``) and writes nothing, so a second operator's freeze never silently replaces
the first one's reason.
"""

from __future__ import annotations

from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb

from cloud.store.errors import Conflict

#: The migration freeze: every promotion is held while it is on.
MIGRATION_FREEZE = "migration_freeze"


@attrs.frozen
class Freeze:
    """The migration freeze as it was set: who, when (ms since the epoch) and why."""

    reason: str
    set_by: str
    set_ms: int

    def to_json(self, now_ms: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "set_by": self.set_by,
                               "set_ms": self.set_ms}
        if now_ms is not None:
            out["age_ms"] = now_ms - self.set_ms
        return out


def read_freeze(conn: psycopg.Connection) -> Freeze | None:
    """The migration freeze, or None when promotions are not frozen."""
    row = conn.execute("SELECT value->>'reason', set_by, set_ms FROM operator_controls "
                       "WHERE name = %s", (MIGRATION_FREEZE,)).fetchone()
    return None if row is None else Freeze(row[0] or "", row[1], row[2])


def freeze_on(conn: psycopg.Connection, *, reason: str, actor: str, now_ms: int) -> Freeze:
    """Freeze promotions, with an ``audit_log`` row (``migration_frozen``). ``Conflict`` when
    they are frozen already (nothing written; the message says by whom)."""
    row = conn.execute(
        "INSERT INTO operator_controls (name, value, set_by, set_ms) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (name) DO NOTHING RETURNING set_ms",
        (MIGRATION_FREEZE, Jsonb({"reason": reason}), actor, now_ms)).fetchone()
    if row is None:
        held = read_freeze(conn)
        who = "" if held is None else f" by {held.set_by}: {held.reason}"
        raise Conflict(f"promotions are already frozen{who}")
    conn.execute(
        "INSERT INTO audit_log (at, actor, action, subject, detail) "
        "VALUES (to_timestamp(%s / 1000.0), %s, 'migration_frozen', %s, %s)",
        (now_ms, actor, MIGRATION_FREEZE, Jsonb({"reason": reason})))
    return Freeze(reason, actor, now_ms)


def freeze_off(conn: psycopg.Connection, *, actor: str, now_ms: int) -> Freeze:
    """Lift the freeze, with an ``audit_log`` row (``migration_unfrozen``) that keeps the
    freeze it ended. Returns that freeze. ``Conflict`` when promotions are not frozen
    (nothing written)."""
    row = conn.execute("DELETE FROM operator_controls WHERE name = %s "
                       "RETURNING value->>'reason', set_by, set_ms",
                       (MIGRATION_FREEZE,)).fetchone()
    if row is None:
        raise Conflict("promotions are not frozen")
    ended = Freeze(row[0] or "", row[1], row[2])
    conn.execute(
        "INSERT INTO audit_log (at, actor, action, subject, detail) "
        "VALUES (to_timestamp(%s / 1000.0), %s, 'migration_unfrozen', %s, %s)",
        (now_ms, actor, MIGRATION_FREEZE, Jsonb({"ended": ended.to_json(),
                                                  "frozen_ms": now_ms - ended.set_ms})))
    return ended
