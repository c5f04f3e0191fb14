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

import attrs
import psycopg

from cloud.db import one_statement
from cloud.model import CLOUD_CLIENT_PHASES, LEGACY_CLIENT_PHASES, PHASES, Message
from cloud.store.conversations import check_member
from cloud.store.errors import (
    NotFound,
    NotMember,
    PhaseRefused,
    StoreError,
    UnknownAccount,
)
from cloud.store.notifications import NOTIFICATION_ID_SQL
from cloud.store.outbox import OUTBOX_CHANNEL

MESSAGE_COLS = ("conversation_id, seq, message_id, sender_account_id, sender_handle, "
                 "sent_ms, body, origin, legacy_guid, client_message_id")


def _message(row: tuple) -> Message:
    return Message(*row)


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
            "SELECT o.account_id, "
            + NOTIFICATION_ID_SQL.format(account="o.account_id", message="r.message_id")
            + ", r.conversation_id, r.message_id, r.seq, "
            "       %(now)s, %(now)s "
            f"FROM {rows} r JOIN owed_to o ON o.conversation_id = r.conversation_id "
            "WHERE o.account_id <> r.sender_account_id "
            "ON CONFLICT DO NOTHING")


# The post, as one statement (see post_message). Its steps, in order of the CTEs:
#   sender    the sender's handle, if the sender is a member in one of the phases allowed
#             (else nothing is written)
#   existing  the message already posted under this client message id (a replay)
#   numbered  the next seq, taken with the conversation row's lock by the UPDATE, unless a
#             replay or a refusal; a rollback gives it back (seq stays gapless)
#   posted    the message
#   owed      its notification rows (the one rule, ``owed_notifications_sql``)
#   queued    its outbox row, when a member still has legacy clients
#   woken     NOTIFY, unless an earlier row of the conversation still waits for a claim
#   (final)   one row: created or replayed, with the message; or why nothing was written
#             (no_account, phase_refused, not_found, not_member: checked in that order)
_POST = (
    "WITH sender AS ("
    "  SELECT a.handle FROM accounts a WHERE a.account_id = %(sender)s "
    "  AND a.phase = ANY(%(phases)s) AND EXISTS ("
    "    SELECT 1 FROM members m WHERE m.conversation_id = %(cid)s "
    "    AND m.account_id = %(sender)s)), "
    "existing AS ("
    f"  SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = %(cid)s "
    "  AND sender_account_id = %(sender)s AND client_message_id = %(client_id)s "
    "  AND EXISTS (SELECT 1 FROM sender)), "
    "numbered AS ("
    "  UPDATE conversations SET next_seq = next_seq + 1 WHERE conversation_id = %(cid)s "
    "  AND EXISTS (SELECT 1 FROM sender) AND NOT EXISTS (SELECT 1 FROM existing) "
    "  RETURNING next_seq - 1 AS seq), "
    "posted AS ("
    f"  INSERT INTO messages ({MESSAGE_COLS}) "
    "  SELECT %(cid)s, n.seq, %(message_id)s, %(sender)s, s.handle, %(now)s, %(body)s, "
    "         'cloud', NULL, %(client_id)s FROM numbered n, sender s "
    f"  RETURNING {MESSAGE_COLS}), "
    f"owed AS ({owed_notifications_sql('posted', 'ARRAY[%(cid)s]::uuid[]')}), "
    "queued AS ("
    # the members of this moment go with the row: legacy delivers it to them only
    "  INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, created_ms, "
    "    member_handles) "
    "  SELECT p.conversation_id, p.seq, p.message_id, %(now)s, "
    "    array(SELECT coalesce(a.legacy_handle, a.handle) FROM members mb "
    "          JOIN accounts a USING (account_id) "
    "          WHERE mb.conversation_id = p.conversation_id ORDER BY 1) FROM posted p "
    # Every member's account row is share-locked and its phase read from the version the
    # lock got: a move out of cloud-only that committed while this post waited (its
    # back-fill could not see this post) is seen here, so the post queues its own row.
    "  WHERE (SELECT coalesce(bool_or(l.phase = ANY(%(legacy_phases)s)), false) "
    "         FROM (SELECT a.phase FROM members mb JOIN accounts a USING (account_id) "
    "               WHERE mb.conversation_id = %(cid)s FOR SHARE OF a) l) "
    "  RETURNING conversation_id, seq), "
    "woken AS ("
    "  SELECT pg_notify(%(channel)s, q.conversation_id::text) FROM queued q "
    "  WHERE NOT EXISTS (SELECT 1 FROM outbox_to_legacy o "
    "    WHERE o.conversation_id = q.conversation_id AND o.state = 'pending' "
    "    AND o.seq < q.seq AND o.claimed_until_ms <= %(now)s)) "
    "SELECT 'created', (SELECT count(*) FROM woken), p.* FROM posted p "
    "UNION ALL SELECT 'replayed', 0, e.* FROM existing e "
    "UNION ALL SELECT CASE "
    "    WHEN NOT EXISTS (SELECT 1 FROM accounts WHERE account_id = %(sender)s) "
    "      THEN 'no_account' "
    "    WHEN NOT EXISTS (SELECT 1 FROM accounts WHERE account_id = %(sender)s "
    "                     AND phase = ANY(%(phases)s)) THEN 'phase_refused' "
    "    WHEN EXISTS (SELECT 1 FROM conversations WHERE conversation_id = %(cid)s) "
    "      THEN 'not_member' ELSE 'not_found' END, 0, "
    "       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL "
    "WHERE NOT EXISTS (SELECT 1 FROM sender)")


@attrs.frozen
class Post:
    """One cloud client's message to post (see ``post_message``)."""

    conversation_id: uuid.UUID
    sender_account_id: uuid.UUID
    client_message_id: str
    body: str
    now_ms: int
    #: the new message's id; None draws a random one (a simulation passes its own, from
    #: its seed, so that a run replays exactly)
    message_id: uuid.UUID | None = None


@one_statement
def post_message(conn: psycopg.Connection, conversation_id: uuid.UUID,
                 sender_account_id: uuid.UUID, client_message_id: str, body: str,
                 now_ms: int, *, sender_phases: Sequence[str] = PHASES,
                 message_id: uuid.UUID | None = None) -> tuple[Message, bool]:
    """A cloud client's message; the same client message id returns the same message.

    Returns ``(message, created)``. In the same transaction: notification rows for
    cloud-capable members, and an ``outbox_to_legacy`` row when any member still has legacy
    clients, with a NOTIFY that wakes the bridge when this commits (only when the row is the
    first of its conversation waiting for a claim: a row behind an unclaimed one is claimed
    with it, so one wake serves a burst).

    All of it is one statement, so on an autocommit connection it needs no BEGIN and COMMIT
    (``one_statement``). A post that raced another with the same client message id fails
    on the unique index; run again, it finds that message and returns it.

    Refusals, nothing written: ``ValueError`` (text PostgreSQL can not store),
    ``UnknownAccount`` (no such sender), ``PhaseRefused`` (the sender's phase is not in
    *sender_phases*: the cloud API checks its token's account here, in the post's own
    statement, instead of with a query of its own), ``NotFound``, ``NotMember``.
    """
    post = Post(conversation_id, sender_account_id, client_message_id, body, now_ms,
                message_id)
    params = _post_params(post, sender_phases)
    try:
        row = _execute_atomically(conn, _POST, params)
    except psycopg.errors.UniqueViolation as e:
        if e.diag.constraint_name != "messages_client_message_id":
            raise
        row = _execute_atomically(conn, _POST, params)  # the other post committed: a replay
    return _posted(row, post, sender_phases)


def post_messages(conn: psycopg.Connection, posts: Sequence[Post], *,
                  sender_phases: Sequence[str] = PHASES
                  ) -> list[tuple[Message, bool] | StoreError | ValueError]:
    """Several posts in the caller's one transaction, each as ``post_message`` would write
    it; for each, ``(message, created)`` or the refusal it would raise.

    One commit for many posts, and their statements go out in one pipeline (one round
    trip): what the API's ``PostBatcher`` uses under load. They run in conversation id order
    (stable, so one conversation's posts keep theirs), the order every writer locks
    conversations in, so two batches never deadlock. A statement that fails (a race on a
    client message id with another transaction) fails them all: run them one by one then.
    """
    results: list = [None] * len(posts)
    order = sorted(range(len(posts)), key=lambda i: posts[i].conversation_id)
    params = {}
    for i in order:
        try:
            params[i] = _post_params(posts[i], sender_phases)
        except ValueError as e:
            results[i] = e
    sent = [i for i in order if i in params]
    if not sent:
        return results
    cursor = conn.cursor()
    # executemany pipelines the statements and converts the query once, not once a post
    cursor.executemany(_POST, [params[i] for i in sent], returning=True)
    for n, i in enumerate(sent):
        if n:
            cursor.nextset()
        try:
            results[i] = _posted(cursor.fetchone(), posts[i], sender_phases)
        except StoreError as e:
            results[i] = e
    return results


def _post_params(post: Post, sender_phases: Sequence[str]) -> dict:
    """The statement's parameters; ValueError for text PostgreSQL can not store."""
    if "\x00" in post.body or "\x00" in post.client_message_id:
        raise ValueError("text must not contain NUL characters")  # PostgreSQL can not store it
    try:
        post.body.encode("utf-8")
        post.client_message_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return {"cid": post.conversation_id, "sender": post.sender_account_id,
            "client_id": post.client_message_id, "body": post.body, "now": post.now_ms,
            "message_id": post.message_id or uuid.uuid4(),
            "legacy_phases": list(LEGACY_CLIENT_PHASES),
            "channel": OUTBOX_CHANNEL, "phases": list(sender_phases)}


def _posted(row: tuple | None, post: Post, sender_phases: Sequence[str]) -> tuple[Message, bool]:
    """The statement's one row as ``(message, created)``, or the refusal it names."""
    status = row[0] if row is not None else "not_found"
    if status == "no_account":
        raise UnknownAccount(f"no account {post.sender_account_id}")
    if status == "phase_refused":
        raise PhaseRefused(f"account {post.sender_account_id} is not in phase "
                           f"{' or '.join(sender_phases)}")
    if status == "not_found":
        raise NotFound(f"no conversation {post.conversation_id}")
    if status == "not_member":
        raise NotMember("you are not a member of this conversation")
    return _message(row[2:]), status == "created"


def _execute_atomically(conn: psycopg.Connection, statement: str,
                        params: dict) -> tuple | None:
    """Run one statement so that a failure undoes all of it and leaves *conn* usable: on its
    own on an idle autocommit connection, else in a (sub)transaction of its own."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return conn.execute(statement, params).fetchone()
    with conn.transaction():
        return conn.execute(statement, params).fetchone()


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
