"""The outbox to legacy: cloud messages the bridge must inject into the legacy network,
claimed per conversation in seq order. The rows are written with their message
(``cloud.store.messages``).
"""

from __future__ import annotations

import uuid

import attrs
import psycopg

from cloud.model import LEGACY_CLIENT_PHASES

#: LISTEN/NOTIFY channel the bridge waits on for new outbox_to_legacy rows.
OUTBOX_CHANNEL = "outbox_to_legacy"


@attrs.frozen
class OutboxItem:
    """One cloud message the bridge must inject into the legacy network."""

    conversation_id: uuid.UUID
    seq: int
    message_id: uuid.UUID
    legacy_chat_id: str | None
    sender_handle: str
    sent_ms: int
    body: str
    #: every member's legacy-side handle (legacy_handle, else the cloud handle), sorted
    member_handles: tuple[str, ...]
    #: how many members are in a phase with legacy clients (legacy, dual, cloud)
    legacy_client_members: int
    attempts: int


#: At most this many rows of one conversation per claim by default: a claim then locks little
#: and spreads over conversations (which are injected concurrently, each in seq order).
OUTBOX_CLAIM_PER_CONVERSATION = 50


def claim_outbox(conn: psycopg.Connection, now_ms: int, limit: int, claim_ms: int,
                 per_conversation: int = OUTBOX_CLAIM_PER_CONVERSATION) -> list[OutboxItem]:
    """Claim up to *limit* due rows for *claim_ms*, oldest first, in seq order per conversation.

    A claimed row is invisible to other workers until its claim runs out; a worker that
    dies mid-injection therefore leaves it to come due again. Claims start at each
    conversation's lowest pending row and rows come back in seq order, so injection order
    per conversation is kept across workers.
    """
    rows = conn.execute(
        # heads: each conversation's lowest pending row. A conversation is claimable only when
        # its head is not claimed, and a claim always starts at the head: rows of one
        # conversation are therefore never split between two workers, whatever the timing.
        "WITH heads AS ("
        "  SELECT DISTINCT ON (conversation_id) conversation_id, seq AS head, "
        "         claimed_until_ms, created_ms "
        "  FROM outbox_to_legacy WHERE state = 'pending' ORDER BY conversation_id, seq), "
        "ready AS ("
        "  SELECT conversation_id, head, created_ms FROM heads "
        "  WHERE claimed_until_ms <= %(now)s ORDER BY created_ms, conversation_id "
        "  LIMIT %(limit)s), "
        "locked AS ("
        "  SELECT r.conversation_id, l.seq FROM ready r, LATERAL ("
        "    SELECT o.seq FROM outbox_to_legacy o "
        "    WHERE o.conversation_id = r.conversation_id AND o.state = 'pending' "
        "    ORDER BY o.seq LIMIT %(per_conversation)s FOR UPDATE SKIP LOCKED) l), "
        "due AS ("
        "  SELECT l.conversation_id, l.seq, r.created_ms FROM locked l "
        "  JOIN ready r USING (conversation_id) "
        "  WHERE (SELECT min(l2.seq) FROM locked l2 "
        "         WHERE l2.conversation_id = l.conversation_id) = r.head "
        "  ORDER BY r.created_ms, l.conversation_id, l.seq LIMIT %(limit)s), "
        "claimed AS ("
        "  UPDATE outbox_to_legacy o SET claimed_until_ms = %(until)s, "
        "    attempts = o.attempts + 1 FROM due "
        "  WHERE o.conversation_id = due.conversation_id AND o.seq = due.seq "
        "  RETURNING o.conversation_id, o.seq, o.message_id, o.attempts) "
        "SELECT c.conversation_id, c.seq, c.message_id, cv.legacy_chat_id, "
        "       (SELECT coalesce(s.legacy_handle, s.handle) FROM accounts s "
        "        WHERE s.account_id = m.sender_account_id), "
        "       m.sent_ms, m.body, "
        "       array(SELECT coalesce(a.legacy_handle, a.handle) FROM members mb "
        "             JOIN accounts a USING (account_id) "
        "             WHERE mb.conversation_id = c.conversation_id ORDER BY 1), "
        "       (SELECT count(*) FROM members mb JOIN accounts a USING (account_id) "
        "        WHERE mb.conversation_id = c.conversation_id "
        "          AND a.phase = ANY(%(phases)s)), "
        "       c.attempts "
        "FROM claimed c JOIN messages m ON m.conversation_id = c.conversation_id "
        "  AND m.seq = c.seq "
        "JOIN conversations cv ON cv.conversation_id = c.conversation_id "
        "ORDER BY c.conversation_id, c.seq",
        {"now": now_ms, "limit": limit, "until": now_ms + claim_ms,
         "per_conversation": max(1, per_conversation),
         "phases": list(LEGACY_CLIENT_PHASES)}).fetchall()
    return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(r[7]), r[8], r[9])
            for r in rows]


def complete_outbox(conn: psycopg.Connection, item: OutboxItem, legacy_chat_id: str,
                    legacy_guid: str | None, now_ms: int, *, skipped: bool = False) -> None:
    """Mark an outbox row done (injected) or skipped, recording the legacy ids it got.

    The message keeps the GUID it has on the legacy side, so digests of both stacks agree;
    the conversation keeps its legacy chat id (made up by the bridge for cloud-born ones).
    """
    conn.execute(
        "UPDATE outbox_to_legacy SET state = %s, done_ms = %s, last_error = NULL "
        "WHERE conversation_id = %s AND seq = %s AND state = 'pending'",
        ("skipped" if skipped else "done", now_ms, item.conversation_id, item.seq))
    if skipped:
        return
    conn.execute(
        "UPDATE messages SET legacy_guid = %s WHERE conversation_id = %s AND seq = %s "
        "AND legacy_guid IS DISTINCT FROM %s",
        (legacy_guid, item.conversation_id, item.seq, legacy_guid))
    if item.legacy_chat_id is None:
        conn.execute("INSERT INTO conversation_legacy_ids (legacy_chat_id, conversation_id) "
                     "VALUES (%s, %s) ON CONFLICT DO NOTHING",
                     (legacy_chat_id, item.conversation_id))
        conn.execute("UPDATE conversations SET legacy_chat_id = %s "
                     "WHERE conversation_id = %s AND legacy_chat_id IS NULL",
                     (legacy_chat_id, item.conversation_id))


def release_outbox(conn: psycopg.Connection, item: OutboxItem, error: str,
                   retry_at_ms: int) -> None:
    """Injection failed: keep the row pending, due again at *retry_at_ms*."""
    conn.execute(
        "UPDATE outbox_to_legacy SET claimed_until_ms = %s, last_error = %s "
        "WHERE conversation_id = %s AND seq = %s AND state = 'pending'",
        (retry_at_ms, error[:500], item.conversation_id, item.seq))


def outbox_backlog(conn: psycopg.Connection, now_ms: int) -> tuple[int, int | None]:
    """Pending outbox rows and the age in ms of the oldest (None when empty)."""
    count, oldest = conn.execute(
        "SELECT count(*), min(created_ms) FROM outbox_to_legacy WHERE state = 'pending'"
    ).fetchone()
    return count, (None if oldest is None else now_ms - oldest)
