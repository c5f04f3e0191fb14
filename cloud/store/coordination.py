"""Coordination of bridge workers: leases with fencing tokens, workers' heartbeats, and the
feed checkpoints (which a stale fence can not advance).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import psycopg
from psycopg.types.json import Jsonb

from cloud.db import one_statement
from cloud.model import FeedCheckpoint
from cloud.store.errors import StaleFence

#: The second half of a check sent in a pipeline: raises once its result is in, if it failed.
Verdict = Callable[[], None]


@one_statement
def heartbeat_worker(conn: psycopg.Connection, worker_id: str, state: str, now_ms: int,
                     started_ms: int, *, lag_to_cloud_ms: int | None,
                     lag_to_legacy_ms: int | None, mirrored_to_cloud: int,
                     mirrored_to_legacy: int, feeds: int, detail: dict) -> None:
    """A bridge worker reports itself (for status and the migration gates). A report older
    than the row's, from the same process (same ``started_ms``), changes nothing."""
    conn.execute(
        "INSERT INTO bridge_workers (worker_id, started_ms, heartbeat_ms, state, "
        "  lag_to_cloud_ms, lag_to_legacy_ms, mirrored_to_cloud, mirrored_to_legacy, feeds, "
        "  detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (worker_id) DO UPDATE SET started_ms = excluded.started_ms, "
        "  heartbeat_ms = excluded.heartbeat_ms, state = excluded.state, "
        "  lag_to_cloud_ms = excluded.lag_to_cloud_ms, "
        "  lag_to_legacy_ms = excluded.lag_to_legacy_ms, "
        "  mirrored_to_cloud = excluded.mirrored_to_cloud, "
        "  mirrored_to_legacy = excluded.mirrored_to_legacy, feeds = excluded.feeds, "
        "  detail = excluded.detail "
        # reports of one process may commit out of order (pool threads): the older loses
        "WHERE bridge_workers.started_ms <> excluded.started_ms "
        "   OR bridge_workers.heartbeat_ms <= excluded.heartbeat_ms",
        (worker_id, started_ms, now_ms, state, lag_to_cloud_ms, lag_to_legacy_ms,
         mirrored_to_cloud, mirrored_to_legacy, feeds, Jsonb(detail)))


def acquire_lease(conn: psycopg.Connection, name: str, holder: str, now_ms: int,
                  ttl_ms: int) -> int | None:
    """Take *name* if it is free, expired, or held under this holder's own name: returns the
    new fencing token, else None.

    A worker restarted under its ``--worker-id`` (systemd, the demo) takes its feeds back at
    once instead of waiting out the lease of its dead incarnation. Every acquisition
    increases the token, so the previous holder (even one with the same id, paused rather
    than dead) is fenced off: its commits check the token and fail.
    """
    row = conn.execute(
        "INSERT INTO leases (name, holder, fence, expires_ms) VALUES (%s, %s, 1, %s) "
        "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
        "  fence = leases.fence + 1, expires_ms = excluded.expires_ms "
        "WHERE leases.expires_ms <= %s OR leases.holder = excluded.holder RETURNING fence",
        (name, holder, now_ms + ttl_ms, now_ms)).fetchone()
    return None if row is None else row[0]


def renew_lease(conn: psycopg.Connection, name: str, holder: str, fence: int, now_ms: int,
                ttl_ms: int) -> bool:
    """Extend a lease this holder still has under this token; False if it was lost."""
    return name in renew_leases(conn, {name: fence}, holder, now_ms, ttl_ms)


@one_statement
def renew_leases(conn: psycopg.Connection, fences: Mapping[str, int], holder: str,
                 now_ms: int, ttl_ms: int) -> set[str]:
    """Extend every lease of *fences* (name -> the token it was taken under) that this holder
    still has under that token and that has not run out, in one statement: a worker
    following many feeds renews them in one round trip. Returns the names renewed; the
    others were lost (taken over, or expired)."""
    if not fences:
        return set()
    names = sorted(fences)
    rows = conn.execute(
        "UPDATE leases l SET expires_ms = %s "
        "FROM unnest(%s::text[], %s::bigint[]) AS r(name, fence) "
        "WHERE l.name = r.name AND l.holder = %s AND l.fence = r.fence AND l.expires_ms > %s "
        "RETURNING l.name",
        (now_ms + ttl_ms, names, [fences[n] for n in names], holder, now_ms)).fetchall()
    return {r[0] for r in rows}


def release_lease(conn: psycopg.Connection, name: str, holder: str, fence: int) -> None:
    """Give a lease up at once (a clean stop or a rebalance), so another worker need not wait."""
    conn.execute("UPDATE leases SET expires_ms = 0 WHERE name = %s AND holder = %s "
                 "AND fence = %s", (name, holder, fence))


def check_lease(conn: psycopg.Connection, name: str, holder: str, fence: int) -> None:
    """Fencing: raise StaleFence unless this holder still has the lease under this token.

    ``FOR SHARE`` keeps a competing acquisition waiting until this transaction ends, so a
    commit that passed the check can not interleave with a takeover.
    """
    send_lease_check(conn, name, holder, fence)()


def send_lease_check(conn: psycopg.Connection, name: str, holder: str,
                     fence: int) -> Verdict:
    """``check_lease`` in two halves, for a pipeline: send the query now and return the
    verdict, which raises StaleFence once the result is in. The lock is taken where the
    query runs, in order with what is sent after it; the verdict must be read before the
    transaction commits (a stale holder's writes then roll back with it)."""
    cur = conn.execute("SELECT holder, fence FROM leases WHERE name = %s FOR SHARE", (name,))

    def verdict() -> None:
        row = cur.fetchone()
        if row is None or row[0] != holder or row[1] != fence:
            raise StaleFence(
                f"lease {name!r} is no longer held by {holder!r} under fence {fence}")

    return verdict


def load_checkpoint(conn: psycopg.Connection, source: str) -> FeedCheckpoint | None:
    row = conn.execute('SELECT source, epoch, "offset", fence FROM bridge_checkpoints '
                       "WHERE source = %s", (source,)).fetchone()
    return None if row is None else FeedCheckpoint(*row)


def save_checkpoint(conn: psycopg.Connection, checkpoint: FeedCheckpoint, now_ms: int) -> None:
    """Advance a feed checkpoint unless a higher fence holds it (then: ``StaleFence``)."""
    send_checkpoint(conn, checkpoint, now_ms)()


def send_checkpoint(conn: psycopg.Connection, checkpoint: FeedCheckpoint,
                    now_ms: int) -> Verdict:
    """``save_checkpoint`` in two halves, for a pipeline: send the upsert now and return the
    verdict, which raises ``StaleFence`` once the result is in (to be read before the
    transaction commits)."""
    cur = conn.execute(
        'INSERT INTO bridge_checkpoints (source, epoch, "offset", fence, updated_ms) '
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (source) DO UPDATE SET "
        'epoch = excluded.epoch, "offset" = excluded."offset", fence = excluded.fence, '
        "updated_ms = excluded.updated_ms, updated_at = now() "
        "WHERE bridge_checkpoints.fence <= excluded.fence RETURNING 1",
        (checkpoint.source, checkpoint.epoch, checkpoint.offset, checkpoint.fence, now_ms))

    def verdict() -> None:
        # a row, not rowcount: in a pipeline, fetching waits for the result if it is not
        # in yet, where rowcount would read -1
        if cur.fetchone() is None:
            raise StaleFence(f"checkpoint {checkpoint.source!r} is held under a newer fence")

    return verdict


def load_checkpoints(conn: psycopg.Connection) -> dict[str, FeedCheckpoint]:
    rows = conn.execute(
        'SELECT source, epoch, "offset", fence FROM bridge_checkpoints').fetchall()
    return {r[0]: FeedCheckpoint(*r) for r in rows}
