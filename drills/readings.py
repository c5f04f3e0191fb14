"""What the drills read from the cloud store while they run: the status line's and the
summary's figures, the leases a worker holds, the accounts that moved to a cloud phase."""

from __future__ import annotations

from typing import Any

import psycopg

from bridge.ops import status
from cloud import admin
from cloud.model import LEGACY_CLIENT_PHASES
from cloud.store import messages as messages_store
from cloud.store import notifications as notifications_store
from cloud.store import outbox as outbox_store


def figures(conn: psycopg.Connection, now_ms: int) -> dict[str, Any]:
    """The live status line's and the summary's figures, in one read transaction."""
    # a cloud message has its legacy GUID from when it is queued for legacy: on legacy are
    # those with one that are not still queued
    from_legacy, from_cloud, to_legacy = conn.execute(
        "SELECT count(*) FILTER (WHERE origin = 'legacy'), "
        "       count(*) FILTER (WHERE origin = 'cloud'), "
        "       count(*) FILTER (WHERE origin = 'cloud' AND legacy_guid IS NOT NULL "
        "         AND NOT EXISTS (SELECT 1 FROM outbox_to_legacy o WHERE o.conversation_id "
        "           = m.conversation_id AND o.seq = m.seq AND o.sub = 0 "
        "           AND o.state = 'pending')) "
        "FROM messages m").fetchone()
    by_kind = admin.findings_by_state(conn).values()
    findings = {state: sum(n[state] for n in by_kind) for state in admin.FINDING_STATES}
    workers = admin.live_workers(conn, now_ms)
    lags = [w.lag_to_cloud_ms for w in workers if w.lag_to_cloud_ms is not None]
    legacy_lags = [w.lag_to_legacy_ms for w in workers if w.lag_to_legacy_ms is not None]
    pending, _oldest = outbox_store.outbox_backlog(conn, now_ms)
    leased = len(_feed_leases(conn, now_ms))
    return {
        "messages_cloud": from_legacy + from_cloud,
        "mirrored_to_cloud": from_legacy, "cloud_posts": from_cloud,
        "mirrored_to_legacy": to_legacy, "outbox_pending": pending,
        "lag_to_cloud_ms": max(lags) if lags else None,
        "lag_to_legacy_ms": max(legacy_lags) if legacy_lags else None,
        "lag_outside_faults": {d: status.lag_outside_faults(workers, d)
                               for d in ("to_cloud", "to_legacy")},
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


def post_burst(conn: psycopg.Connection, count: int, now_ms: int, tag: str) -> int:
    """Post *count* cloud messages through the store's own path, round robin over up to 20
    conversations that legacy is owed messages of (a legacy chat and a member with legacy
    clients), in one transaction: a burst for the outbox injectors to drain. How many."""
    targets = conn.execute(
        "SELECT c.conversation_id, min(mb.account_id::text)::uuid "
        "FROM conversations c JOIN members mb USING (conversation_id) "
        "WHERE c.legacy_chat_id IS NOT NULL AND EXISTS ("
        "  SELECT 1 FROM members m2 JOIN accounts a USING (account_id) "
        "  WHERE m2.conversation_id = c.conversation_id AND a.phase = ANY(%s)) "
        "GROUP BY 1 ORDER BY 1 LIMIT 20", (list(LEGACY_CLIENT_PHASES),)).fetchall()
    if not targets:
        return 0
    # the batched path (post_message in a loop would put each post in a savepoint)
    results = messages_store.post_messages(conn, [
        messages_store.Post(*targets[i % len(targets)], f"{tag}-{i}", f"{tag} #{i}", now_ms)
        for i in range(count)])
    refused = [r for r in results if not isinstance(r, tuple)]
    if refused:
        raise RuntimeError(f"posting the burst failed: {refused[0]!r}")
    return count


def rows_under_claim(conn: psycopg.Connection, now_ms: int) -> int:
    """Outbox rows held under a live claim: an injection batch in flight somewhere."""
    return conn.execute(
        "SELECT count(*) FROM outbox_to_legacy WHERE state = 'pending' "
        "AND claim_token IS NOT NULL AND claimed_until_ms > %s", (now_ms,)).fetchone()[0]
