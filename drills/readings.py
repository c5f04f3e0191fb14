"""What the drills read from the cloud store while they run: the status line's and the
summary's figures, the leases a worker holds, the accounts that moved to a cloud phase."""

from __future__ import annotations

from typing import Any

import psycopg

from cloud import admin
from cloud.store import notifications as notifications_store
from cloud.store import outbox as outbox_store


def figures(conn: psycopg.Connection, now_ms: int) -> dict[str, Any]:
    """The live status line's and the summary's figures, in one read transaction."""
    from_legacy, from_cloud, to_legacy = conn.execute(
        "SELECT count(*) FILTER (WHERE origin = 'legacy'), "
        "       count(*) FILTER (WHERE origin = 'cloud'), "
        "       count(*) FILTER (WHERE origin = 'cloud' AND legacy_guid IS NOT NULL) "
        "FROM messages").fetchone()
    by_kind = admin.findings_by_state(conn).values()
    findings = {state: sum(n[state] for n in by_kind) for state in admin.FINDING_STATES}
    workers = admin.live_workers(conn, now_ms)
    lags = [w.lag_to_cloud_ms for w in workers if w.lag_to_cloud_ms is not None]
    pending, _oldest = outbox_store.outbox_backlog(conn, now_ms)
    leased = len(_feed_leases(conn, now_ms))
    return {
        "messages_cloud": from_legacy + from_cloud,
        "mirrored_to_cloud": from_legacy, "cloud_posts": from_cloud,
        "mirrored_to_legacy": to_legacy, "outbox_pending": pending,
        "lag_to_cloud_ms": max(lags) if lags else None,
        "live_workers": len(workers),
        "feeds_leased": leased,
        "feeds_streaming": sum(w.feeds or 0 for w in workers),
        "findings_open": findings["open"],
        "findings_repaired": findings["repaired"],
        "findings_failed": findings["failed"],
        "findings_unrecoverable": findings["unrecoverable"],
        "accounts_by_phase": admin.accounts_per_phase(conn),
        "notifications": notifications_store.notification_counts(conn),
    }


def _feed_leases(conn: psycopg.Connection, now_ms: int) -> list[admin.Lease]:
    """The feed leases that have not expired."""
    return [lease for lease in admin.leases(conn)
            if lease.name.startswith("feed:") and lease.expires_ms > now_ms]


def leases_held(conn: psycopg.Connection, holder: str, now_ms: int) -> list[tuple[str, int]]:
    """The live feed leases *holder* holds, with their fences."""
    return [(lease.name, lease.fence) for lease in _feed_leases(conn, now_ms)
            if lease.holder == holder]


def migrated_devices(conn: psycopg.Connection) -> list[tuple[str, str, list[Any]]]:
    """(login handle, legacy handle, conversations) of linked accounts in a cloud phase."""
    return [(h, lh, [c for c in convs if c is not None]) for h, lh, convs in conn.execute(
        "SELECT a.handle, a.legacy_handle, array_agg(m.conversation_id) "
        "FROM accounts a LEFT JOIN members m ON m.account_id = a.account_id "
        "WHERE a.legacy_handle IS NOT NULL AND a.phase IN ('dual', 'cloud', 'cloud-only') "
        "GROUP BY 1, 2 ORDER BY 1")]
