"""Named cohorts: a stored set of accounts moved forward together, and what each advance
recorded so that a reverse can move every member back to where it was.

::

    create ──> active ──advance──> (advance n: each member's phase before it, who was held)
                 │  <──reverse───  (the newest advance not reversed that moved someone)
                 ├──complete──> completed   final: no more advance or reverse
                 └──cancel────> cancelled   its advances reversed first (by the caller)

An account is a member of at most one active cohort (a partial unique index): the
membership is freed when the cohort ends. The migration rules (gates, which moves to make)
belong to the caller (``bridge.cohorts``); these functions read what it needs and write what
it decided, each change with its ``audit_log`` row (subject: the cohort's name; actions
``cohort_created``, ``cohort_advanced``, ``cohort_reversed``, ``cohort_completed``,
``cohort_cancelled``). Time is passed in as milliseconds.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import psycopg
from psycopg.types.json import Jsonb

from cloud.model import PHASES, Account
from cloud.store import audit
from cloud.store.errors import Conflict

#: What a cohort's name may be (the migration's CHECK says the same).
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: A cohort's states; only an active one advances or reverses.
ACTIVE, COMPLETED, CANCELLED = "active", "completed", "cancelled"
COHORT_STATES = (ACTIVE, COMPLETED, CANCELLED)
#: Advisory lock class of the cohort commands (two-key form: this, the cohort's id): one
#: command at a time changes a cohort. ("coho" in ASCII.)
LOCK_CLASS = 0x636F686F


@attrs.frozen
class Cohort:
    cohort_id: int
    name: str
    state: str
    #: how the members were chosen: {"percent": P}, {"file": PATH} or {"handles": [...]}
    selection: Mapping[str, Any]
    created_by: str
    created_ms: int
    ended_by: str | None = None
    ended_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "selection": dict(self.selection),
                "created_by": self.created_by, "created_ms": self.created_ms,
                "ended_by": self.ended_by, "ended_ms": self.ended_ms}


@attrs.frozen
class Advance:
    """One row of ``cohort_advances``."""

    advance_no: int
    to_phase: str
    forced: bool
    actor: str
    at_ms: int
    #: None until the command finished (a crash leaves it None: someone may have moved)
    moved: int | None
    held: int | None
    failed: int | None
    reversed_ms: int | None

    @property
    def may_have_moved(self) -> bool:
        return self.moved is None or self.moved > 0

    def to_json(self) -> dict[str, Any]:
        return {"advance": self.advance_no, "to": self.to_phase, "forced": self.forced,
                "actor": self.actor, "at_ms": self.at_ms, "moved": self.moved,
                "held": self.held, "failed": self.failed, "finished": self.moved is not None,
                "reversed_ms": self.reversed_ms}


@attrs.frozen
class HeldMember:
    """A member a gate held on the cohort's last advance, with the gates that failed."""

    account_id: uuid.UUID
    handle: str
    phase: str
    gates: tuple[Mapping[str, Any], ...]
    #: 'plan' (held when the advance was planned) or 'apply' (when its move was applied)
    when: str

    def to_json(self) -> dict[str, Any]:
        return {"account_id": str(self.account_id), "handle": self.handle,
                "phase": self.phase, "when": self.when, "gates": [dict(g) for g in self.gates]}


_COHORT_COLS = ("cohort_id, name, state, selection, created_by, created_ms, ended_by, "
                "ended_ms")
_ADVANCE_COLS = ("advance_no, to_phase, forced, actor, at_ms, moved, held, failed, "
                 "reversed_ms")



# ---------------------------------------------------------------- reading

def get_cohort(conn: psycopg.Connection, name: str, *, lock: bool = False) -> Cohort | None:
    """The cohort called *name* (with *lock*: its row locked for this transaction)."""
    row = conn.execute(f"SELECT {_COHORT_COLS} FROM cohorts WHERE name = %s"
                       + (" FOR UPDATE" if lock else ""), (name,)).fetchone()
    return None if row is None else Cohort(*row)


def list_cohorts(conn: psycopg.Connection) -> list[Cohort]:
    """Every cohort, oldest first."""
    return [Cohort(*r) for r in conn.execute(
        f"SELECT {_COHORT_COLS} FROM cohorts ORDER BY created_ms, cohort_id")]


def members_per_phase(conn: psycopg.Connection, cohort_ids: Sequence[int]
                      ) -> dict[int, dict[str, int]]:
    """Members of each cohort by their phase now (every phase present, zero if none)."""
    counts = {c: dict.fromkeys(PHASES, 0) for c in cohort_ids}
    for cohort_id, phase, n in conn.execute(
            "SELECT m.cohort_id, a.phase, count(*) FROM cohort_members m "
            "JOIN accounts a USING (account_id) WHERE m.cohort_id = ANY(%s) GROUP BY 1, 2",
            (list(cohort_ids),)):
        counts[cohort_id][phase] = n
    return counts


def member_accounts(conn: psycopg.Connection, cohort_id: int) -> list[Account]:
    """The cohort's members as they are now, in handle order."""
    return [Account(*r) for r in conn.execute(
        "SELECT a.account_id, a.handle, a.phase, a.legacy_handle, a.display_name "
        "FROM cohort_members m JOIN accounts a USING (account_id) "
        "WHERE m.cohort_id = %s ORDER BY a.handle", (cohort_id,))]


def active_memberships(conn: psycopg.Connection,
                       account_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Of *account_ids*, those in an active cohort: account -> that cohort's name."""
    return dict(conn.execute(
        "SELECT m.account_id, c.name FROM cohort_members m JOIN cohorts c USING (cohort_id) "
        "WHERE m.active AND m.account_id = ANY(%s)", (list(account_ids),)).fetchall())


def account_memberships(conn: psycopg.Connection,
                        account_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every cohort the account is or was a member of, oldest first: the cohort's name and
    state, whether the membership is active, and the last advance that recorded the
    account (its number, target, the account's phase before it, whether it was reversed,
    and the gates that held the account on it, if any)."""
    rows = conn.execute(
        "SELECT c.name, c.state, m.active, c.created_ms, c.ended_ms, am.advance_no, "
        "  a.to_phase, am.before_phase, a.reversed_ms, am.held "
        "FROM cohort_members m JOIN cohorts c USING (cohort_id) "
        "LEFT JOIN LATERAL (SELECT x.advance_no, x.before_phase, x.held "
        "  FROM cohort_advance_members x WHERE x.account_id = m.account_id "
        "  AND x.cohort_id = m.cohort_id ORDER BY x.advance_no DESC LIMIT 1) am ON true "
        "LEFT JOIN cohort_advances a ON a.cohort_id = m.cohort_id "
        "  AND a.advance_no = am.advance_no "
        "WHERE m.account_id = %s ORDER BY c.created_ms, c.cohort_id", (account_id,)).fetchall()
    return [{"name": r[0], "state": r[1], "active": r[2], "created_ms": r[3],
             "ended_ms": r[4], "last_advance": None if r[5] is None else {
                 "advance": r[5], "to": r[6], "before": r[7], "reversed_ms": r[8],
                 "held_by": [g.get("name") for g in (r[9] or {}).get("gates", ())
                             if not g.get("passed")] if r[9] is not None else []}}
            for r in rows]


def advances(conn: psycopg.Connection, cohort_id: int) -> list[Advance]:
    """The cohort's advances, oldest first."""
    return [Advance(*r) for r in conn.execute(
        f"SELECT {_ADVANCE_COLS} FROM cohort_advances WHERE cohort_id = %s "
        "ORDER BY advance_no", (cohort_id,))]


def advance_to_reverse(conn: psycopg.Connection, cohort_id: int) -> Advance | None:
    """The advance a reverse undoes: the newest one not reversed that may have moved
    someone (an advance that moved nobody, e.g. everyone held by a freeze, undoes
    nothing)."""
    row = conn.execute(
        f"SELECT {_ADVANCE_COLS} FROM cohort_advances WHERE cohort_id = %s "
        "AND reversed_ms IS NULL AND (moved IS NULL OR moved > 0) "
        "ORDER BY advance_no DESC LIMIT 1", (cohort_id,)).fetchone()
    return None if row is None else Advance(*row)


def phases_before(conn: psycopg.Connection, cohort_id: int,
                  advance_no: int) -> dict[uuid.UUID, str]:
    """Each member's phase when advance *advance_no* was planned."""
    return dict(conn.execute(
        "SELECT account_id, before_phase FROM cohort_advance_members "
        "WHERE cohort_id = %s AND advance_no = %s", (cohort_id, advance_no)).fetchall())


def phases_before_unreversed(conn: psycopg.Connection,
                             cohort_id: int) -> dict[uuid.UUID, str]:
    """Each member's phase before the oldest of the cohort's advances not reversed yet: where
    undoing all of them, newest first, would leave it (what a cancel moves it back to)."""
    return dict(conn.execute(
        "SELECT DISTINCT ON (m.account_id) m.account_id, m.before_phase "
        "FROM cohort_advance_members m JOIN cohort_advances a USING (cohort_id, advance_no) "
        "WHERE m.cohort_id = %s AND a.reversed_ms IS NULL "
        "ORDER BY m.account_id, m.advance_no", (cohort_id,)).fetchall())


def held_members(conn: psycopg.Connection, cohort_id: int, advance_no: int,
                 limit: int) -> tuple[list[HeldMember], int]:
    """Members a gate held on advance *advance_no*, in handle order (at most *limit*), and
    how many there were."""
    total = conn.execute(
        "SELECT count(*) FROM cohort_advance_members WHERE cohort_id = %s "
        "AND advance_no = %s AND held IS NOT NULL", (cohort_id, advance_no)).fetchone()[0]
    rows = conn.execute(
        "SELECT a.account_id, a.handle, a.phase, m.held FROM cohort_advance_members m "
        "JOIN accounts a USING (account_id) WHERE m.cohort_id = %s AND m.advance_no = %s "
        "AND m.held IS NOT NULL ORDER BY a.handle LIMIT %s",
        (cohort_id, advance_no, limit)).fetchall()
    return [HeldMember(r[0], r[1], r[2], tuple(r[3].get("gates", ())), r[3].get("when", ""))
            for r in rows], total


def history(conn: psycopg.Connection, name: str, limit: int = 200) -> list[dict[str, Any]]:
    """The cohort's own audit rows (created, advanced, reversed, ended), oldest first."""
    rows = conn.execute(
        "SELECT (extract(epoch FROM at) * 1000)::bigint, actor, action, detail FROM ("
        "  SELECT audit_id, at, actor, action, detail FROM audit_log WHERE subject = %s "
        "  AND action LIKE 'cohort\\_%%' ORDER BY audit_id DESC LIMIT %s) newest "
        "ORDER BY audit_id", (name, limit)).fetchall()
    return [{"at_ms": r[0], "actor": r[1], "action": r[2], "detail": r[3]} for r in rows]


# ---------------------------------------------------------------- writing

def create_cohort(conn: psycopg.Connection, name: str, selection: Mapping[str, Any],
                  account_ids: Sequence[uuid.UUID], *, actor: str, now_ms: int) -> Cohort:
    """Store a new active cohort with these members, audited (``cohort_created``).

    ``Conflict`` (nothing written) when the name is taken, or when a member joined another
    active cohort since the caller looked (the partial unique index refuses it).
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(f"bad cohort name {name!r}")
    row = conn.execute(
        "INSERT INTO cohorts (name, selection, created_by, created_ms) VALUES (%s, %s, %s, %s) "
        f"ON CONFLICT (name) DO NOTHING RETURNING {_COHORT_COLS}",
        (name, Jsonb(dict(selection)), actor, now_ms)).fetchone()
    if row is None:
        raise Conflict(f"a cohort named {name!r} exists already")
    cohort = Cohort(*row)
    try:  # the error aborts the caller's transaction: the cohort row goes with it
        conn.execute("INSERT INTO cohort_members (account_id, cohort_id) "
                     "SELECT unnest(%s::uuid[]), %s", (list(account_ids), cohort.cohort_id))
    except psycopg.errors.UniqueViolation:
        raise Conflict("some of the accounts joined another active cohort meanwhile; "
                       "run the command again") from None
    audit.record(conn, "cohort_created", name, actor=actor, now_ms=now_ms,
                 detail={"selection": dict(selection), "members": len(account_ids)})
    return cohort


def begin_advance(conn: psycopg.Connection, cohort_id: int, to_phase: str,
                  before: Mapping[uuid.UUID, str], held: Mapping[uuid.UUID, Sequence[Any]], *,
                  forced: bool, actor: str, now_ms: int) -> int:
    """Record a new advance and every member's phase before it (*before*, read in this same
    transaction by the caller), with the gates that held some at the plan (*held*). Returns
    its number. Nothing moves here: the moves follow, one transaction each."""
    advance_no = conn.execute(
        "INSERT INTO cohort_advances (cohort_id, advance_no, to_phase, forced, actor, at_ms) "
        "SELECT %s, coalesce(max(advance_no), 0) + 1, %s, %s, %s, %s FROM cohort_advances "
        "WHERE cohort_id = %s RETURNING advance_no",
        (cohort_id, to_phase, forced, actor, now_ms, cohort_id)).fetchone()[0]
    ids = list(before)
    conn.execute(
        "INSERT INTO cohort_advance_members (account_id, cohort_id, advance_no, before_phase, "
        "held) SELECT a, %s, %s, p, h FROM unnest(%s::uuid[], %s::text[], %s::jsonb[]) "
        "AS t(a, p, h)",
        (cohort_id, advance_no, ids, [before[a] for a in ids],
         [Jsonb({"when": "plan", "gates": list(held[a])}) if a in held else None
          for a in ids]))
    return advance_no


def finish_advance(conn: psycopg.Connection, cohort: Cohort, advance_no: int, *,
                   moved: int, held_at_apply: Mapping[uuid.UUID, Sequence[Any]],
                   held_total: int, failed: int, unchanged: int, actor: str, now_ms: int,
                   extra: Mapping[str, Any] = {}) -> None:  # noqa: B006 (read only)
    """Record what the advance did (and the members its gates held when applied), audited
    (``cohort_advanced``)."""
    for account_id, gates in held_at_apply.items():
        conn.execute("UPDATE cohort_advance_members SET held = %s WHERE account_id = %s "
                     "AND cohort_id = %s AND advance_no = %s",
                     (Jsonb({"when": "apply", "gates": list(gates)}), account_id,
                      cohort.cohort_id, advance_no))
    to_phase, forced = conn.execute(
        "UPDATE cohort_advances SET moved = %s, held = %s, failed = %s WHERE cohort_id = %s "
        "AND advance_no = %s RETURNING to_phase, forced",
        (moved, held_total, failed, cohort.cohort_id, advance_no)).fetchone()
    audit.record(conn, "cohort_advanced", cohort.name, actor=actor, now_ms=now_ms,
                 detail={"advance": advance_no, "to": to_phase, "forced": forced,
                         "moved": moved, "held": held_total, "failed": failed,
                         "unchanged": unchanged, **extra})


def mark_reversed(conn: psycopg.Connection, cohort: Cohort, advance_no: int, *,
                  actor: str, now_ms: int, detail: Mapping[str, Any]) -> list[int]:
    """Mark advance *advance_no* and every later one not reversed yet (they moved nobody)
    reversed, audited (``cohort_reversed``). Returns the advances marked."""
    marked = [r[0] for r in conn.execute(
        "UPDATE cohort_advances SET reversed_ms = %s WHERE cohort_id = %s "
        "AND advance_no >= %s AND reversed_ms IS NULL RETURNING advance_no",
        (now_ms, cohort.cohort_id, advance_no))]
    audit.record(conn, "cohort_reversed", cohort.name, actor=actor, now_ms=now_ms,
                 detail={**detail, "advances": sorted(marked)})
    return sorted(marked)


def audit_incomplete(conn: psycopg.Connection, cohort: Cohort, action: str, *, actor: str,
                     now_ms: int, detail: Mapping[str, Any]) -> None:
    """Audit a reverse or cancel that left some members behind (nothing else changes: the
    advances stay unreversed so the same command can be run again)."""
    audit.record(conn, action, cohort.name, actor=actor, now_ms=now_ms,
                 detail={**detail, "complete": False})


def end_cohort(conn: psycopg.Connection, cohort: Cohort, state: str, *, actor: str,
               now_ms: int, detail: Mapping[str, Any] = {}) -> Cohort:  # noqa: B006
    """End an active cohort (*state*: completed or cancelled), audited; its members are free
    to join another cohort. A cancel also marks its advances reversed. ``Conflict`` when
    the cohort is not active any more (nothing written)."""
    if state not in (COMPLETED, CANCELLED):
        raise ValueError(f"a cohort ends completed or cancelled, not {state!r}")
    row = conn.execute(
        "UPDATE cohorts SET state = %s, ended_by = %s, ended_ms = %s "
        f"WHERE cohort_id = %s AND state = 'active' RETURNING {_COHORT_COLS}",
        (state, actor, now_ms, cohort.cohort_id)).fetchone()
    if row is None:
        raise Conflict(f"cohort {cohort.name!r} is not active")
    conn.execute("UPDATE cohort_members SET active = false WHERE cohort_id = %s",
                 (cohort.cohort_id,))
    if state == CANCELLED:
        conn.execute("UPDATE cohort_advances SET reversed_ms = %s WHERE cohort_id = %s "
                     "AND reversed_ms IS NULL", (now_ms, cohort.cohort_id))
    audit.record(conn, f"cohort_{state}", cohort.name, actor=actor, now_ms=now_ms,
                 detail=detail)
    return Cohort(*row)


def try_lock(conn: psycopg.Connection, cohort_id: int) -> bool:
    """Take the cohort's session advisory lock on *conn* (autocommit) without waiting: one
    command at a time changes a cohort."""
    return conn.execute("SELECT pg_try_advisory_lock(%s::int, %s::int)",
                        (LOCK_CLASS, cohort_id)).fetchone()[0]


def unlock(conn: psycopg.Connection, cohort_id: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s::int, %s::int)", (LOCK_CLASS, cohort_id))
