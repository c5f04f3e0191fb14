"""Operator controls: deployment-wide switches an operator turns on and off (audited).

A switch is on while its row exists in ``operator_controls`` (its name, a JSON value, who
set it and when) and off when there is none. The first is the migration freeze
(``MIGRATION_FREEZE``): while it is on, the migration gates hold every promotion. The
runtime controls (``bridgectl control``) are two pauses, of the outbox injection and of
the reconcilers (``PAUSES``), and one setting, the injector's concurrency
(``INJECTOR_CONCURRENCY``); the bridge workers read them on each heartbeat, reconcile
runs when they start. Turning a switch on that is already on, or off that is already off,
is refused (``Conflict``) and writes nothing, so a second operator's freeze or pause never
silently replaces the first one's reason. Every change writes an ``audit_log`` row.
"""

from __future__ import annotations

from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb

from cloud.db import one_statement
from cloud.store import audit
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
    audit.record(conn, "migration_frozen", MIGRATION_FREEZE, actor=actor, now_ms=now_ms,
                 detail={"reason": reason})
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
    audit.record(conn, "migration_unfrozen", MIGRATION_FREEZE, actor=actor, now_ms=now_ms,
                 detail={"ended": ended.to_json(), "frozen_ms": now_ms - ended.set_ms})
    return ended


# ---------------------------------------------------------------- runtime controls

#: Pause switches (``bridgectl control pause|resume``), by what they pause: while
#: ``injection`` is on, the bridge workers' outbox injectors claim nothing (passes in
#: flight finish); while ``reconcilers`` is on, a reconcile run refuses to start, and one
#: running stops at its next check.
PAUSES = {"injection": "injection_paused", "reconcilers": "reconcilers_paused"}
#: The outbox injector's window (``InjectorConfig.window``): most injections in flight at
#: once per bridge worker. No row: each worker's configured window.
INJECTOR_CONCURRENCY = "injector_concurrency"
#: Bounds of ``INJECTOR_CONCURRENCY``'s value.
MIN_CONCURRENCY, MAX_CONCURRENCY = 1, 100_000


@attrs.frozen
class Pause:
    """One pause as it was set: what it pauses, who, when (ms since the epoch), why."""

    what: str
    reason: str
    set_by: str
    set_ms: int

    def to_json(self, now_ms: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "reason": self.reason,
                               "set_by": self.set_by, "set_ms": self.set_ms}
        if now_ms is not None:
            out["age_ms"] = now_ms - self.set_ms
        return out


@attrs.frozen
class Setting:
    """A value an operator set, who and when."""

    value: int
    set_by: str
    set_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "set_by": self.set_by, "set_ms": self.set_ms}


@attrs.frozen
class RuntimeControls:
    """The runtime controls as the store has them: what live workers and reconcile runs
    obey (the workers read them on each heartbeat)."""

    #: what -> its pause, for each pause that is on
    pauses: dict[str, Pause] = attrs.field(factory=dict)
    #: the injector's window, when an operator set one
    injector_concurrency: Setting | None = None

    def paused(self, what: str) -> Pause | None:
        return self.pauses.get(what)

    def to_json(self, now_ms: int | None = None) -> dict[str, Any]:
        return {"paused": {what: (None if what not in self.pauses
                                  else self.pauses[what].to_json(now_ms)) for what in PAUSES},
                "injector_concurrency": (None if self.injector_concurrency is None
                                         else self.injector_concurrency.to_json())}


@one_statement
def read_runtime_controls(conn: psycopg.Connection) -> RuntimeControls:
    """The pauses that are on and the injector's window, in one statement."""
    names = {name: what for what, name in PAUSES.items()}
    pauses, concurrency = {}, None
    for name, value, set_by, set_ms in conn.execute(
            "SELECT name, value, set_by, set_ms FROM operator_controls WHERE name = ANY(%s)",
            ([*names, INJECTOR_CONCURRENCY],)):
        if name == INJECTOR_CONCURRENCY:
            concurrency = Setting(int(value["value"]), set_by, set_ms)
        else:
            pauses[names[name]] = Pause(names[name], value.get("reason") or "", set_by, set_ms)
    return RuntimeControls(pauses, concurrency)



def _pause_name(what: str) -> str:
    if what not in PAUSES:
        raise ValueError(f"unknown pause {what!r}: one of {', '.join(PAUSES)}")
    return PAUSES[what]


def pause(conn: psycopg.Connection, what: str, *, reason: str, actor: str,
          now_ms: int) -> Pause:
    """Pause *what* (``injection`` or ``reconcilers``), with an ``audit_log`` row
    (``control_paused``). ``Conflict`` when it is paused already (nothing written; the
    message says by whom)."""
    name = _pause_name(what)
    row = conn.execute(
        "INSERT INTO operator_controls (name, value, set_by, set_ms) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (name) DO NOTHING RETURNING set_ms",
        (name, Jsonb({"reason": reason}), actor, now_ms)).fetchone()
    if row is None:
        held = read_runtime_controls(conn).paused(what)
        who = "" if held is None else f" by {held.set_by}" + (f": {held.reason}"
                                                               if held.reason else "")
        raise Conflict(f"{what} is already paused{who}")
    audit.record(conn, "control_paused", name, actor=actor, now_ms=now_ms,
                 detail={"reason": reason})
    return Pause(what, reason, actor, now_ms)


def resume(conn: psycopg.Connection, what: str, *, actor: str, now_ms: int) -> Pause:
    """End the pause of *what*, with an ``audit_log`` row (``control_resumed``) that keeps
    the pause it ended. Returns that pause. ``Conflict`` when *what* is not paused
    (nothing written)."""
    name = _pause_name(what)
    row = conn.execute("DELETE FROM operator_controls WHERE name = %s "
                       "RETURNING value->>'reason', set_by, set_ms", (name,)).fetchone()
    if row is None:
        raise Conflict(f"{what} is not paused")
    ended = Pause(what, row[0] or "", row[1], row[2])
    audit.record(conn, "control_resumed", name, actor=actor, now_ms=now_ms,
                 detail={"ended": ended.to_json(), "paused_ms": now_ms - ended.set_ms})
    return ended


def set_injector_concurrency(conn: psycopg.Connection, value: int | None, *, actor: str,
                             now_ms: int) -> tuple[Setting | None, Setting | None]:
    """Set the injector's window to *value* (None: back to each worker's configured
    window), with an ``audit_log`` row (``control_set``) saying from what. Returns (before,
    after); when the value is what it is already, nothing is written (before == after)."""
    if value is not None and not (isinstance(value, int)
                                  and MIN_CONCURRENCY <= value <= MAX_CONCURRENCY):
        raise ValueError(f"injector concurrency must be an integer from {MIN_CONCURRENCY} "
                         f"to {MAX_CONCURRENCY}, not {value!r}")
    row = conn.execute("SELECT value, set_by, set_ms FROM operator_controls WHERE name = %s "
                       "FOR UPDATE", (INJECTOR_CONCURRENCY,)).fetchone()
    before = None if row is None else Setting(int(row[0]["value"]), row[1], row[2])
    if (before is None and value is None) or (before is not None and before.value == value):
        return before, before
    if value is None:
        conn.execute("DELETE FROM operator_controls WHERE name = %s", (INJECTOR_CONCURRENCY,))
        after = None
    else:
        conn.execute(
            "INSERT INTO operator_controls (name, value, set_by, set_ms) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, "
            "set_by = EXCLUDED.set_by, set_ms = EXCLUDED.set_ms",
            (INJECTOR_CONCURRENCY, Jsonb({"value": value}), actor, now_ms))
        after = Setting(value, actor, now_ms)
    audit.record(conn, "control_set", INJECTOR_CONCURRENCY, actor=actor, now_ms=now_ms,
                 detail={"from": None if before is None else before.value, "to": value})
    return before, after


#: The legacy login server's minimum client versions, one row for every rule (its value:
#: {"rules": {cohort: {"version", "set_by", "set_ms"}}}, cohort "" for everyone).
LEGACY_MIN_VERSIONS = "legacy_min_versions"


@attrs.frozen
class MinVersion:
    """A minimum client version for everyone (*cohort* "") or for one cohort's members."""

    cohort: str
    version: str
    set_by: str
    set_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"cohort": self.cohort or None, "version": self.version,
                "set_by": self.set_by, "set_ms": self.set_ms}


def read_min_versions(conn: psycopg.Connection, *, lock: bool = False) -> list[MinVersion]:
    """Every minimum-version rule, the one for everyone first, then by cohort name."""
    row = conn.execute("SELECT value FROM operator_controls WHERE name = %s"
                       + (" FOR UPDATE" if lock else ""), (LEGACY_MIN_VERSIONS,)).fetchone()
    rules = {} if row is None else row[0].get("rules", {})
    return [MinVersion(c, r["version"], r["set_by"], int(r["set_ms"]))
            for c, r in sorted(rules.items())]


def set_min_version(conn: psycopg.Connection, cohort: str, version: str | None, *,
                    actor: str, now_ms: int) -> tuple[MinVersion | None, MinVersion | None]:
    """Set the minimum client version of *cohort* ("" for everyone) to *version* (None
    clears it), with an ``audit_log`` row (``legacy_min_version_set``) saying from what.
    Returns (before, after); when nothing changes, nothing is written (before == after)."""
    rules = {r.cohort: r for r in read_min_versions(conn, lock=True)}
    before = rules.get(cohort)
    if (before is None and version is None) or (before is not None
                                                 and before.version == version):
        return before, before
    after = None if version is None else MinVersion(cohort, version, actor, now_ms)
    if after is None:
        del rules[cohort]
    else:
        rules[cohort] = after
    value = {"rules": {c: {"version": r.version, "set_by": r.set_by, "set_ms": r.set_ms}
                       for c, r in rules.items()}}
    if rules:
        conn.execute(
            "INSERT INTO operator_controls (name, value, set_by, set_ms) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, "
            "set_by = EXCLUDED.set_by, set_ms = EXCLUDED.set_ms",
            (LEGACY_MIN_VERSIONS, Jsonb(value), actor, now_ms))
    else:
        conn.execute("DELETE FROM operator_controls WHERE name = %s", (LEGACY_MIN_VERSIONS,))
    audit_min_version(conn, "legacy_min_version_set", cohort, actor, now_ms,
                      {"from": None if before is None else before.version, "to": version})
    return before, after


def audit_min_version(conn: psycopg.Connection, action: str, cohort: str, actor: str,
                      now_ms: int, detail: dict[str, Any]) -> None:
    """An ``audit_log`` row about the minimum version of *cohort* ("" for everyone)."""
    audit.record(conn, action, f"cohort:{cohort}" if cohort else LEGACY_MIN_VERSIONS,
                 actor=actor, now_ms=now_ms, detail={"cohort": cohort or None, **detail})
