"""Messages of cloud clients: post and sync, and the rule for who is owed a notification
(shared with the mirror's bulk writes, ``cloud.store.mirror``).

Sequence numbers: ``conversations.next_seq`` is the next ``seq`` to hand out. A writer locks
the conversation row first (``FOR NO KEY UPDATE``: the mode its UPDATE of next_seq takes,
and one that lets a transaction adding members, whose foreign key check takes ``FOR KEY
SHARE``, go on), so writers to one conversation take turns and a rolled-back transaction
gives its numbers back: ``seq`` is gapless per conversation.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg

from cloud.model import CLOUD_CLIENT_PHASES, LEGACY_CLIENT_PHASES, Message
from cloud.store.conversations import check_member
from cloud.store.errors import NotFound
from cloud.store.outbox import OUTBOX_CHANNEL

MESSAGE_COLS = ("conversation_id, seq, message_id, sender_account_id, sender_handle, "
                 "sent_ms, body, origin, legacy_guid, client_message_id")


def _message(row: tuple) -> Message:
    return Message(*row)


def _lock_conversation(conn: psycopg.Connection, conversation_id: uuid.UUID) -> int:
    row = conn.execute("SELECT next_seq FROM conversations WHERE conversation_id = %s "
                       "FOR NO KEY UPDATE", (conversation_id,)).fetchone()
    if row is None:
        raise NotFound(f"no conversation {conversation_id}")
    return row[0]


#: CLOUD_CLIENT_PHASES as an SQL list, written out so that the planner can match migration
#: 0007's partial index (it can not see into a parameter).
_CLOUD_PHASES_SQL = ", ".join(f"'{phase}'" for phase in CLOUD_CLIENT_PHASES)


def owed_notifications_sql(rows: str, conversations: str) -> str:
    """The one rule for who is owed a notification, as an INSERT for the new messages in
    *rows* (a table expression with conversation_id, message_id, seq, sender_account_id) of
    *conversations* (an SQL array of their ids): every member in a phase with cloud devices,
    except the sender."""
    # The members owed anything are found once per conversation of the batch (``OFFSET 0``
    # keeps the lateral a probe per conversation, ``MATERIALIZED`` keeps the planner from
    # running it again for every row): from the members primary key, each
    # checked against the index of cloud-capable accounts (migration 0007). Never a scan of
    # every account or member (as a join driven by the accounts, a store whose cloud phases
    # were rare scanned them all for every batch), and not a probe per message (checked per
    # row, a small store's few accounts were scanned once for every message).
    return ("WITH owed_to AS MATERIALIZED ("
            "  SELECT c.id AS conversation_id, o.account_id "
            f"  FROM unnest({conversations}) AS c(id) CROSS JOIN LATERAL ("
            "    SELECT m.account_id FROM members m WHERE m.conversation_id = c.id "
            "    AND EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = m.account_id "
            f"                AND a.phase IN ({_CLOUD_PHASES_SQL})) OFFSET 0) o) "
            "INSERT INTO notifications (account_id, notification_id, conversation_id, "
            "  message_id, seq, next_attempt_ms, created_ms) "
            "SELECT o.account_id, gen_random_uuid(), r.conversation_id, r.message_id, r.seq, "
            "       %(now)s, %(now)s "
            f"FROM {rows} r JOIN owed_to o ON o.conversation_id = r.conversation_id "
            "WHERE o.account_id <> r.sender_account_id "
            "ON CONFLICT DO NOTHING")


def _owe_notifications(conn: psycopg.Connection, conversation_id: uuid.UUID,
                       seqs: Sequence[int], now_ms: int) -> int:
    """Notification rows for new messages of one conversation (see the rule above)."""
    cur = conn.execute(
        owed_notifications_sql("(SELECT * FROM messages WHERE conversation_id = %(cid)s "
                                "AND seq = ANY(%(seqs)s))", "ARRAY[%(cid)s]::uuid[]"),
        {"now": now_ms, "cid": conversation_id, "seqs": list(seqs)})
    return cur.rowcount


def post_message(conn: psycopg.Connection, conversation_id: uuid.UUID,
                 sender_account_id: uuid.UUID, client_message_id: str, body: str,
                 now_ms: int) -> tuple[Message, bool]:
    """A cloud client's message; the same client message id returns the same message.

    Returns ``(message, created)``. In the same transaction: notification rows for
    cloud-capable members, and an ``outbox_to_legacy`` row, with the members of this moment,
    when any member still has legacy clients (the bridge is woken by NOTIFY when this
    commits).
    """
    if "\x00" in body or "\x00" in client_message_id:
        raise ValueError("text must not contain NUL characters")  # PostgreSQL can not store it
    try:
        body.encode("utf-8")
        client_message_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    check_member(conn, conversation_id, sender_account_id)
    next_seq = _lock_conversation(conn, conversation_id)
    existing = conn.execute(
        f"SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = %s "
        "AND sender_account_id = %s AND client_message_id = %s",
        (conversation_id, sender_account_id, client_message_id)).fetchone()
    if existing is not None:
        return _message(existing), False
    handle = conn.execute("SELECT handle FROM accounts WHERE account_id = %s",
                          (sender_account_id,)).fetchone()[0]
    message = Message(conversation_id, next_seq, uuid.uuid4(), sender_account_id, handle,
                      now_ms, body, "cloud", None, client_message_id)
    conn.execute(
        f"INSERT INTO messages ({MESSAGE_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
        _message_row(message))
    conn.execute("UPDATE conversations SET next_seq = %s WHERE conversation_id = %s",
                 (next_seq + 1, conversation_id))
    _owe_notifications(conn, conversation_id, [next_seq], now_ms)
    legacy_members = conn.execute(
        "SELECT 1 FROM members mb JOIN accounts a USING (account_id) "
        "WHERE mb.conversation_id = %s AND a.phase = ANY(%s) LIMIT 1",
        (conversation_id, list(LEGACY_CLIENT_PHASES))).fetchone()
    if legacy_members is not None:
        # The members now are the ones it is delivered to on legacy too (not whoever is a
        # member when the bridge gets to it): their handles go with the row.
        conn.execute(
            "INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, created_ms, "
            "  member_handles) "
            "SELECT %(cid)s, %(seq)s, %(mid)s, %(now)s, "
            "  array(SELECT coalesce(a.legacy_handle, a.handle) FROM members mb "
            "        JOIN accounts a USING (account_id) "
            "        WHERE mb.conversation_id = %(cid)s ORDER BY 1)",
            {"cid": conversation_id, "seq": next_seq, "mid": message.message_id,
             "now": now_ms})
        conn.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, str(conversation_id)))
    return message, True


def _message_row(message: Message) -> tuple:
    return (message.conversation_id, message.seq, message.message_id,
            message.sender_account_id, message.sender_handle, message.sent_ms, message.body,
            message.origin, message.legacy_guid, message.client_message_id)


def sync_messages(conn: psycopg.Connection, conversation_id: uuid.UUID, after_seq: int,
                  limit: int) -> list[Message]:
    """Messages with ``seq > after_seq`` in seq order, at most *limit*."""
    rows = conn.execute(
        f"SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = %s AND seq > %s "
        "ORDER BY seq LIMIT %s", (conversation_id, after_seq, limit)).fetchall()
    return [_message(r) for r in rows]


def sync_for_member(conn: psycopg.Connection, conversation_id: uuid.UUID,
                    account_id: uuid.UUID, after_seq: int, limit: int) -> list[Message]:
    """``sync_messages`` for a member only (NotFound / NotMember otherwise)."""
    check_member(conn, conversation_id, account_id)
    return sync_messages(conn, conversation_id, after_seq, limit)
