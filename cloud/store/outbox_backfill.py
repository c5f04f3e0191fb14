"""Back-fill: what legacy missed while nobody in a conversation had legacy clients, queued
in the outbox to legacy (``cloud.store.outbox``) when an account leaves cloud-only."""

from __future__ import annotations

import uuid

import attrs
import psycopg

from cloud.model import LEGACY_GUID_SQL
from cloud.store.outbox import OUTBOX_CHANNEL


@attrs.frozen
class Backfill:
    """What ``backfill_outbox`` did (or, from ``preview_backfill``, would do) for one account
    leaving cloud-only."""

    #: the account's conversations it looked at (each locked while it did)
    conversations: int = 0
    #: cloud messages that never had an outbox row (nobody had legacy clients when they
    #: were posted), now queued
    queued: int = 0
    #: rows skipped because nobody had legacy clients when they were drained, pending again
    requeued: int = 0
    #: messages legacy missed that were sent before the window: not queued (the legacy
    #: network would have dropped them from its history by now, and refuses them)
    too_old: int = 0

    @property
    def total(self) -> int:
        """Messages queued for legacy."""
        return self.queued + self.requeued

    def to_json(self) -> dict[str, int]:
        return {"conversations": self.conversations, "queued": self.queued,
                "requeued": self.requeued, "queued_for_legacy": self.total,
                "older_than_window": self.too_old}


# What legacy never got, in the account's conversations: a cloud message with no legacy
# GUID (it has one while it is queued and once injected) that either has no outbox row or
# whose row was skipped because nobody was on legacy. Rows skipped as refused, failed
# (given up, with a finding), pending or done are left as they are.
_MISSED = (
    "m.conversation_id = ANY(%(cids)s) AND m.origin = 'cloud' AND m.legacy_guid IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM outbox_to_legacy o WHERE o.conversation_id = "
    "  m.conversation_id AND o.seq = m.seq AND o.sub = 0 "
    "  AND o.skip_reason IS DISTINCT FROM 'no_legacy_clients')")


def preview_backfill(conn: psycopg.Connection, account_id: uuid.UUID,
                     since_ms: int) -> Backfill:
    """What ``backfill_outbox`` would do now, read without locking or writing anything (for
    a dry run: posts and drains may change it before the move)."""
    cids = [r[0] for r in conn.execute(
        "SELECT conversation_id FROM members WHERE account_id = %s ORDER BY 1", (account_id,))]
    if not cids:
        return Backfill()
    queued, requeued, too_old = conn.execute(
        "SELECT count(*) FILTER (WHERE m.sent_ms >= %(since)s AND o.seq IS NULL), "
        "       count(*) FILTER (WHERE m.sent_ms >= %(since)s AND o.seq IS NOT NULL), "
        "       count(*) FILTER (WHERE m.sent_ms < %(since)s) "
        "FROM messages m LEFT JOIN outbox_to_legacy o "
        "  ON o.conversation_id = m.conversation_id AND o.seq = m.seq AND o.sub = 0 "
        f"WHERE {_MISSED}", {"cids": cids, "since": since_ms}).fetchone()
    return Backfill(len(cids), queued, requeued, too_old)


def backfill_outbox(conn: psycopg.Connection, account_id: uuid.UUID, since_ms: int,
                    now_ms: int) -> Backfill:
    """Queue for legacy what it missed in *account_id*'s conversations while nobody in them
    had legacy clients: run it in the transaction that moves the account out of cloud-only.

    Messages sent at or after *since_ms* get an outbox row (created at *now_ms*), or their
    skipped row back to pending; older ones are only counted. The conversations are locked
    first, in id order, as ``post_message`` locks them: a post that committed before the
    lock is seen here, and one that waited for it sees the account's new phase and writes
    its own outbox row, so none falls between the two. Safe to run twice: a second run finds
    every row it queued pending already. The claim takes each conversation's rows from its
    lowest pending seq, so the back-filled rows go out in seq order, before later posts.
    """
    cids = [r[0] for r in conn.execute(
        "SELECT c.conversation_id FROM conversations c JOIN members mb USING (conversation_id) "
        "WHERE mb.account_id = %s ORDER BY c.conversation_id FOR NO KEY UPDATE OF c",
        (account_id,))]
    if not cids:
        return Backfill()
    params = {"cids": cids, "since": since_ms, "now": now_ms}
    requeued = conn.execute(
        "UPDATE outbox_to_legacy o SET state = 'pending', skip_reason = NULL, done_ms = NULL, "
        "  claimed_until_ms = 0, claim_token = NULL, attempts = 0, last_error = NULL, "
        "  created_ms = %(now)s "
        "FROM messages m WHERE o.conversation_id = ANY(%(cids)s) AND o.state = 'skipped' "
        "  AND o.skip_reason = 'no_legacy_clients' AND m.conversation_id = o.conversation_id "
        "  AND m.seq = o.seq AND o.sub = 0 AND m.sent_ms >= %(since)s "
        "RETURNING o.conversation_id, o.seq", params).fetchall()
    queued = conn.execute(
        "INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, created_ms) "
        "SELECT m.conversation_id, m.seq, m.message_id, %(now)s FROM messages m "
        f"WHERE {_MISSED} AND m.sent_ms >= %(since)s "
        "ORDER BY m.conversation_id, m.seq ON CONFLICT DO NOTHING "
        "RETURNING conversation_id, seq", params).fetchall()
    too_old = conn.execute(
        f"SELECT count(*) FROM messages m WHERE {_MISSED} AND m.sent_ms < %(since)s",
        params).fetchone()[0]
    if queued or requeued:
        # what is queued for legacy has its legacy GUID (cloud.store.outbox): these rows
        # only, given in key order
        keys = sorted(queued + requeued)
        conn.execute(
            "UPDATE messages m SET legacy_guid = "
            f"{LEGACY_GUID_SQL.format('m.message_id')} FROM unnest(%s::uuid[], %s::bigint[]) "
            "AS k(conversation_id, seq) WHERE m.conversation_id = k.conversation_id "
            "AND m.seq = k.seq AND m.legacy_guid IS NULL",
            ([k[0] for k in keys], [k[1] for k in keys]))
        conn.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, str(account_id)))
    return Backfill(len(cids), len(queued), len(requeued), too_old)
