"""Presence per account and source (cloud, legacy), each with a version and an expiry.

The rule that merges the sources into one status is ``cloud.presence``'s, not the store's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg

from cloud.db import one_statement
from cloud.model import LEGACY_CLIENT_PHASES, PRESENCE_STATUSES, Presence


def set_presence(conn: psycopg.Connection, presence: Presence) -> bool:
    """Record one source's presence; an older version than the stored one is ignored."""
    if presence.status not in PRESENCE_STATUSES:
        raise ValueError(f"unknown presence status {presence.status!r}")
    cur = conn.execute(
        "INSERT INTO presence (account_id, source, status, version, expires_ms) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account_id, source) DO UPDATE SET "
        "status = excluded.status, version = excluded.version, "
        "expires_ms = excluded.expires_ms, updated_at = now() "
        "WHERE presence.version <= excluded.version",
        (presence.account_id, presence.source, presence.status, presence.version,
         presence.expires_ms))
    return cur.rowcount == 1


def set_presences(conn: psycopg.Connection, presences: Sequence[Presence]) -> int:
    """Record many sources' presence in one statement, as ``set_presence`` of each in turn
    would (an older version than the stored one is ignored; of one account and source in
    *presences*, the highest version wins, the later of equal ones); returns how many rows
    changed (-1 in a pipeline, where the count is not in yet). A feed batch carries several
    presence changes: one round trip, not one each."""
    latest: dict[tuple[uuid.UUID, str], Presence] = {}
    for p in presences:
        if p.status not in PRESENCE_STATUSES:
            raise ValueError(f"unknown presence status {p.status!r}")
        key = (p.account_id, p.source)
        if key not in latest or latest[key].version <= p.version:
            latest[key] = p
    if not latest:
        return 0
    rows = list(latest.values())
    cur = conn.execute(
        "INSERT INTO presence (account_id, source, status, version, expires_ms) "
        "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::bigint[], "
        "%s::bigint[]) "
        "ON CONFLICT (account_id, source) DO UPDATE SET "
        "status = excluded.status, version = excluded.version, "
        "expires_ms = excluded.expires_ms, updated_at = now() "
        "WHERE presence.version <= excluded.version",
        ([p.account_id for p in rows], [p.source for p in rows], [p.status for p in rows],
         [p.version for p in rows], [p.expires_ms for p in rows]))
    return cur.rowcount


def read_presence(conn: psycopg.Connection, account_ids: Sequence[uuid.UUID],
                  now_ms: int) -> dict[uuid.UUID, list[Presence]]:
    """Every unexpired source's presence for each account (missing: no live source)."""
    rows = conn.execute(
        "SELECT account_id, source, status, version, expires_ms FROM presence "
        "WHERE account_id = ANY(%s) AND expires_ms > %s ORDER BY account_id, source",
        (list(account_ids), now_ms)).fetchall()
    out: dict[uuid.UUID, list[Presence]] = {}
    for r in rows:
        out.setdefault(r[0], []).append(Presence(*r))
    return out


@one_statement
def cloud_presence_changes(conn: psycopg.Connection, after: tuple[int, uuid.UUID],
                           limit: int) -> list[tuple[int, uuid.UUID, str, str, int]]:
    """Cloud-source presence set after *after* = (version, account id), for accounts that
    still have legacy clients and a legacy handle: (version, account, handle, status,
    expires_ms), in (version, account) order so the caller can resume from the last one."""
    return conn.execute(
        "SELECT p.version, p.account_id, a.legacy_handle, p.status, p.expires_ms "
        "FROM presence p JOIN accounts a USING (account_id) "
        "WHERE p.source = 'cloud' AND (p.version, p.account_id) > (%s, %s) "
        "  AND a.legacy_handle IS NOT NULL AND a.phase = ANY(%s) "
        "ORDER BY p.version, p.account_id LIMIT %s",
        (after[0], after[1], list(LEGACY_CLIENT_PHASES), limit)).fetchall()
