"""The outbox to legacy: cloud messages and membership changes the bridge must inject into
the legacy network, claimed per conversation in order. A message's row is written with the
message (``cloud.store.messages``), a membership change's with the change
(``cloud.store.conversations``).

A conversation's rows are ordered by ``(seq, sub)``: a message's row has its message's seq
and sub 0; a membership change made after message N has seq N and sub 1, 2, ... (migration
0009), so it is injected after message N and before message N + 1.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import attrs
import psycopg

from cloud.model import LEGACY_CLIENT_PHASES

#: LISTEN/NOTIFY channel the bridge waits on for new outbox_to_legacy rows.
OUTBOX_CHANNEL = "outbox_to_legacy"


#: The kinds of outbox row.
MESSAGE = "message"
MEMBERS = "members"


@attrs.frozen
class OutboxItem:
    """One cloud message, or membership change, the bridge must inject into the legacy
    network."""

    conversation_id: uuid.UUID
    seq: int
    #: None for a membership change
    message_id: uuid.UUID | None
    legacy_chat_id: str | None
    sender_handle: str
    #: when the message was sent (or the membership change made)
    sent_ms: int
    body: str
    #: the members' legacy-side handles (legacy_handle, else the cloud handle), sorted: as
    #: they were when the message was posted (for rows queued before migration 0009, and
    #: for membership changes, as they are now)
    member_handles: tuple[str, ...]
    #: how many members are in a phase with legacy clients (legacy, dual, cloud); for a
    #: membership change, counting the members it removes
    legacy_client_members: int
    attempts: int
    #: the claim this row is held under; complete and release take effect only under it
    claim_token: uuid.UUID | None = None
    #: 0 for a message; 1, 2, ... for membership changes made after message *seq*
    sub: int = 0
    kind: str = MESSAGE
    #: a membership change: the legacy-side handles it adds and removes
    add_handles: tuple[str, ...] = ()
    remove_handles: tuple[str, ...] = ()


@attrs.frozen
class Injected:
    """An outbox row the home supernode acknowledged, with the legacy ids it got."""

    item: OutboxItem
    legacy_chat_id: str
    #: None only through ``complete_outbox(..., None)``, which records no GUID
    legacy_guid: str | None


#: At most this many rows of one conversation per claim by default: a claim then locks little
#: and spreads over conversations (which are injected concurrently, each in seq order).
OUTBOX_CLAIM_PER_CONVERSATION = 50

# The claim, in steps whose locks follow the rows it claims (one pass over the pending rows
# finds each conversation's head and size; nothing else is read per conversation):
#   heads   each conversation's lowest pending seq and count; its head (a claim always starts
#           there) is the row of that seq with the lowest sub;
#   ready   the conversations whose head is not claimed, oldest first, with how many rows
#           the ones before each would take (*per_conversation* at most each);
#   owned   their heads, locked in that order without waiting, skipping heads another
#           claimer holds, until as many conversations as *limit* rows need are held;
#   wanted  the owned conversations' first pending rows in seq order, cut to *limit* rows,
#           each with its rank from the head (1 = the head);
#   due     the rows locked (skipping any another claimer holds), per conversation only the
#           unbroken run from the head: one conversation's rows are never split between
#           claims and each claim starts at the head.
_CLAIM = (
    "WITH heads AS ("
    "  SELECT conversation_id, min(seq) AS head, count(*) AS pending "
    "  FROM outbox_to_legacy WHERE state = 'pending' GROUP BY conversation_id), "
    "ready AS ("
    "  SELECT h.conversation_id, h.head, o.sub AS head_sub, o.created_ms, "
    "         sum(least(h.pending, %(per_conversation)s)) OVER ("
    "           ORDER BY o.created_ms, h.conversation_id ROWS UNBOUNDED PRECEDING) "
    "         - least(h.pending, %(per_conversation)s) AS before "
    "  FROM heads h CROSS JOIN LATERAL ("
    "    SELECT o.sub, o.created_ms, o.claimed_until_ms FROM outbox_to_legacy o "
    "    WHERE o.conversation_id = h.conversation_id AND o.seq = h.head "
    "      AND o.state = 'pending' ORDER BY o.sub LIMIT 1) o "
    "  WHERE o.claimed_until_ms <= %(now)s), "
    "owned AS ("
    "  SELECT o.conversation_id, r.created_ms FROM ready r JOIN outbox_to_legacy o "
    "    ON o.conversation_id = r.conversation_id AND o.seq = r.head "
    "    AND o.sub = r.head_sub "
    "  WHERE o.state = 'pending' AND o.claimed_until_ms <= %(now)s "
    "  ORDER BY r.created_ms, r.conversation_id "
    "  LIMIT (SELECT count(*) FROM ready WHERE before < %(limit)s) "
    "  FOR UPDATE OF o SKIP LOCKED), "
    "wanted AS ("
    "  SELECT r.conversation_id, w.seq, w.sub, w.rank FROM owned r, LATERAL ("
    "    SELECT o.seq, o.sub, row_number() OVER (ORDER BY o.seq, o.sub) AS rank "
    "    FROM outbox_to_legacy o "
    "    WHERE o.conversation_id = r.conversation_id AND o.state = 'pending' "
    "    ORDER BY o.seq, o.sub LIMIT %(per_conversation)s) w "
    "  ORDER BY r.created_ms, r.conversation_id, w.seq, w.sub LIMIT %(limit)s), "
    "locked AS ("
    "  SELECT o.conversation_id, o.seq, o.sub, w.rank FROM outbox_to_legacy o "
    "  JOIN wanted w ON o.conversation_id = w.conversation_id AND o.seq = w.seq "
    "    AND o.sub = w.sub "
    "  WHERE o.state = 'pending' FOR UPDATE OF o SKIP LOCKED), "
    "due AS ("
    "  SELECT conversation_id, seq, sub FROM ("
    "    SELECT conversation_id, seq, sub, rank, "
    "           row_number() OVER (PARTITION BY conversation_id ORDER BY seq, sub) AS got "
    "    FROM locked) l WHERE rank = got), "
    "claimed AS ("
    "  UPDATE outbox_to_legacy o SET claimed_until_ms = %(until)s, "
    "    attempts = o.attempts + 1, claim_token = %(token)s FROM due "
    "  WHERE o.conversation_id = due.conversation_id AND o.seq = due.seq "
    "    AND o.sub = due.sub "
    "  RETURNING o.conversation_id, o.seq, o.sub, o.kind, o.message_id, o.attempts, "
    "    o.created_ms, o.member_handles, o.add_handles, o.remove_handles) "
    "SELECT c.conversation_id, c.seq, c.message_id, cv.legacy_chat_id, "
    "       coalesce((SELECT coalesce(s.legacy_handle, s.handle) FROM accounts s "
    "                 WHERE s.account_id = m.sender_account_id), ''), "
    "       coalesce(m.sent_ms, c.created_ms), coalesce(m.body, ''), "
    "       coalesce(c.member_handles, array(SELECT coalesce(a.legacy_handle, a.handle) "
    "             FROM members mb JOIN accounts a USING (account_id) "
    "             WHERE mb.conversation_id = c.conversation_id ORDER BY 1)), "
    "       (SELECT count(*) FROM members mb JOIN accounts a USING (account_id) "
    "        WHERE mb.conversation_id = c.conversation_id "
    "          AND a.phase = ANY(%(phases)s)) "
    "       + (SELECT count(*) FROM account_handles h JOIN accounts a USING (account_id) "
    "          WHERE h.handle = ANY(c.remove_handles) AND a.phase = ANY(%(phases)s)), "
    "       c.attempts, c.sub, c.kind, coalesce(c.add_handles, '{}'), "
    "       coalesce(c.remove_handles, '{}') "
    "FROM claimed c LEFT JOIN messages m ON c.kind = 'message' "
    "  AND m.conversation_id = c.conversation_id AND m.seq = c.seq "
    "JOIN conversations cv ON cv.conversation_id = c.conversation_id "
    "ORDER BY c.conversation_id, c.seq, c.sub")


def claim_outbox(conn: psycopg.Connection, now_ms: int, limit: int, claim_ms: int,
                 per_conversation: int = OUTBOX_CLAIM_PER_CONVERSATION,
                 token: uuid.UUID | None = None) -> list[OutboxItem]:
    """Claim up to *limit* due rows for *claim_ms*, oldest first, in seq order per conversation.

    A claimed row is invisible to other workers until its claim runs out; a worker that
    dies mid-injection therefore leaves it to come due again. Claims start at each
    conversation's lowest pending row and rows come back in seq order, so injection order
    per conversation is kept across workers. The rows are held under *token* (a new random
    one when None), which the returned items carry.
    """
    token = token if token is not None else uuid.uuid4()
    rows = conn.execute(
        _CLAIM,
        {"now": now_ms, "limit": limit, "until": now_ms + claim_ms,
         "per_conversation": max(1, per_conversation), "token": token,
         "phases": list(LEGACY_CLIENT_PHASES)}).fetchall()
    return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(r[7]), r[8], r[9],
                       token, r[10], r[11], tuple(r[12]), tuple(r[13])) for r in rows]


def complete_outbox(conn: psycopg.Connection, item: OutboxItem, legacy_chat_id: str,
                    legacy_guid: str | None, now_ms: int, *, skipped: bool = False) -> bool:
    """Mark an outbox row done (injected) or skipped, recording the legacy ids it got.

    The message keeps the GUID it has on the legacy side, so digests of both stacks agree;
    the conversation keeps its legacy chat id (made up by the bridge for cloud-born ones).
    False, and nothing written, when the row is no longer pending under *item*'s claim (a
    late call from a claim that ran out and was taken again).
    """
    if not skipped:
        return bool(complete_outbox_batch(
            conn, [Injected(item, legacy_chat_id, legacy_guid)], now_ms))
    return conn.execute(
        "UPDATE outbox_to_legacy SET state = 'skipped', done_ms = %s, last_error = NULL "
        "WHERE conversation_id = %s AND seq = %s AND sub = %s AND state = 'pending' "
        "AND claim_token = %s",
        (now_ms, item.conversation_id, item.seq, item.sub, item.claim_token)).rowcount == 1


def complete_outbox_batch(conn: psycopg.Connection, rows: Sequence[Injected],
                          now_ms: int) -> list[OutboxItem]:
    """Mark injected rows done in one transaction, with each message's legacy GUID and each
    cloud-born conversation's legacy chat id; the rows it completed (those still pending
    under their item's claim), in the order given."""
    if not rows:
        return []
    done = conn.execute(
        "WITH batch AS ("
        "  SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::int[], %s::uuid[], %s::text[]) "
        "  AS b(conversation_id, seq, sub, token, guid)), "
        "done AS ("
        "  UPDATE outbox_to_legacy o SET state = 'done', done_ms = %s, last_error = NULL "
        "  FROM batch b WHERE o.conversation_id = b.conversation_id AND o.seq = b.seq "
        "    AND o.sub = b.sub AND o.state = 'pending' AND o.claim_token = b.token "
        "  RETURNING o.conversation_id, o.seq, o.sub, o.kind, b.guid), "
        "guids AS ("
        "  UPDATE messages m SET legacy_guid = d.guid FROM done d "
        "  WHERE d.kind = 'message' AND m.conversation_id = d.conversation_id "
        "    AND m.seq = d.seq AND m.legacy_guid IS DISTINCT FROM d.guid) "
        "SELECT conversation_id, seq, sub FROM done",
        ([r.item.conversation_id for r in rows], [r.item.seq for r in rows],
         [r.item.sub for r in rows], [r.item.claim_token for r in rows],
         [r.legacy_guid for r in rows], now_ms)
    ).fetchall()
    completed = set(done)
    # cloud-born conversations keep the chat id the bridge made up for them
    chats = {r.item.conversation_id: r.legacy_chat_id for r in rows
             if r.item.legacy_chat_id is None
             and (r.item.conversation_id, r.item.seq, r.item.sub) in completed}
    if chats:
        conn.execute(
            "WITH new AS (SELECT * FROM unnest(%s::text[], %s::uuid[]) "
            "  AS n(legacy_chat_id, conversation_id)), "
            "ids AS (INSERT INTO conversation_legacy_ids (legacy_chat_id, conversation_id) "
            "  SELECT legacy_chat_id, conversation_id FROM new ON CONFLICT DO NOTHING) "
            "UPDATE conversations c SET legacy_chat_id = new.legacy_chat_id FROM new "
            "WHERE c.conversation_id = new.conversation_id AND c.legacy_chat_id IS NULL",
            (list(chats.values()), list(chats)))
    return [r.item for r in rows
            if (r.item.conversation_id, r.item.seq, r.item.sub) in completed]


def release_outbox(conn: psycopg.Connection, item: OutboxItem, error: str,
                   retry_at_ms: int, *, tried: bool = True) -> bool:
    """Injection failed: keep the row pending, due again at *retry_at_ms*. False, and nothing
    written, when the row is no longer pending under *item*'s claim.

    The claim counted an attempt; a row handed back without being *tried* (it waited behind
    its conversation's failed row, or the claim ended first) gets it back, so ``attempts``
    counts injections actually tried and a give-up after N attempts means N failures."""
    return conn.execute(
        "UPDATE outbox_to_legacy SET claimed_until_ms = %s, last_error = %s, "
        "  attempts = greatest(attempts - %s, 0) "
        "WHERE conversation_id = %s AND seq = %s AND sub = %s AND state = 'pending' "
        "AND claim_token = %s",
        (retry_at_ms, error[:500], 0 if tried else 1, item.conversation_id, item.seq,
         item.sub, item.claim_token)).rowcount == 1


def outbox_backlog(conn: psycopg.Connection, now_ms: int) -> tuple[int, int | None]:
    """Pending outbox rows and the age in ms of the oldest (None when empty)."""
    count, oldest = conn.execute(
        "SELECT count(*), min(created_ms) FROM outbox_to_legacy WHERE state = 'pending'"
    ).fetchone()
    return count, (None if oldest is None else now_ms - oldest)
