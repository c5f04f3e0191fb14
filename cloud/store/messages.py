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

from cloud.db import one_statement, pipeline
from cloud.model import (
    CLOUD_CLIENT_PHASES,
    LEGACY_CLIENT_PHASES,
    LEGACY_GUID_SQL,
    PHASES,
    Message,
)
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


def owed_notifications_sql(rows: str, conversations: str, now: str = "%(now)s") -> str:
    """The one rule for who is owed a notification, as an INSERT for the new messages in
    *rows* (a table expression with conversation_id, message_id, seq, sender_account_id) of
    *conversations* (an SQL array of their ids): every member in a phase with cloud devices,
    except the sender. *now*, the rows' creation time, is an SQL expression; it may name
    *rows* as ``r``."""
    # The members owed anything are found once per conversation of the batch (``OFFSET 0``
    # keeps the lateral a probe per conversation, ``MATERIALIZED`` keeps the planner from
    # running it again for every row): from the members primary key, each
    # checked against the index of cloud-capable accounts (migration 0007), a probe per
    # member (the inner ``OFFSET 0`` keeps the EXISTS a subplan: as a semi join the planner
    # could drive it from that index, every cloud-capable account probed against the
    # conversation's members, 1.3 ms a post with 1,738 of them, tested). Never a scan of
    # every account or member (as a join driven by the accounts, a store whose cloud phases
    # were rare scanned them all for every batch), and not a probe per message (checked per
    # row, a small store's few accounts were scanned once for every message). While no
    # account has a cloud phase at all (the shadow-mirroring months, when the bridge drains
    # legacy's backlog), one probe of that index says so for the whole statement (a one-time
    # filter): the member probes cost about 1.4 µs per mirrored message otherwise.
    return ("WITH owed_to AS MATERIALIZED ("
            "  SELECT c.id AS conversation_id, o.account_id "
            f"  FROM unnest({conversations}) AS c(id) CROSS JOIN LATERAL ("
            "    SELECT m.account_id FROM members m WHERE m.conversation_id = c.id "
            "    AND EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = m.account_id "
            f"                AND a.phase IN ({_CLOUD_PHASES_SQL}) OFFSET 0) OFFSET 0) o "
            "  WHERE EXISTS (SELECT 1 FROM accounts a0 "
            f"               WHERE a0.phase IN ({_CLOUD_PHASES_SQL}))) "
            "INSERT INTO notifications (account_id, notification_id, conversation_id, "
            "  message_id, seq, next_attempt_ms, created_ms) "
            "SELECT o.account_id, "
            + NOTIFICATION_ID_SQL.format(account="o.account_id", message="r.message_id")
            + ", r.conversation_id, r.message_id, r.seq, "
            f"       {now}, {now} "
            f"FROM {rows} r JOIN owed_to o ON o.conversation_id = r.conversation_id "
            "WHERE o.account_id <> r.sender_account_id "
            "ON CONFLICT DO NOTHING")


#: A batch's seqs, as every writer of messages takes them: ``counts`` (conversation id
#: ``cid``, new messages ``n``) locked in id order (two writers never deadlock), then each
#: conversation's ``next_seq`` advanced, ``bump`` returning its ``first`` new seq. Shared
#: with the benchmark's raw posts (``bench/bench_bridge.py``), which must take them the same
#: way to be the post's floor.
SEQS_UNDER_LOCK_SQL = (
    "locked AS MATERIALIZED ("
    "  SELECT c.conversation_id FROM conversations c "
    "  WHERE c.conversation_id = ANY (ARRAY(SELECT cid FROM counts)) "
    "  ORDER BY c.conversation_id FOR NO KEY UPDATE), "
    "bump AS ("
    "  UPDATE conversations c SET next_seq = c.next_seq + k.n FROM counts k "
    "  WHERE c.conversation_id = k.cid AND (SELECT count(*) FROM locked) > 0 "
    "  RETURNING c.conversation_id, c.next_seq - k.n AS first), "
)

#: The NOTIFY of a batch's outbox rows (``queued``: conversation_id, seq, created_ms): one
#: per conversation, unless an earlier row of it still waits for a claim (see ``_POSTS``).
#: Shared with the benchmark's raw posts.
WOKEN_SQL = (
    "woken AS ("
    "  SELECT pg_notify(%(channel)s, q.conversation_id::text) FROM ("
    "    SELECT DISTINCT ON (conversation_id) * FROM queued ORDER BY conversation_id, seq) q "
    "  WHERE NOT EXISTS (SELECT 1 FROM outbox_to_legacy o "
    "    WHERE o.conversation_id = q.conversation_id AND o.state = 'pending' "
    "    AND o.seq < q.seq AND o.claimed_until_ms <= q.created_ms OFFSET 0)) "
)


# The posts of a batch, as one statement (see post_messages), one row of results per post;
# no two of them have the same client message id. Its steps, in order of the CTEs (a post's
# ``ord`` is its place in the batch, from 1):
#   checked   each post with its sender's handle and why it is refused (NULL: it is not;
#             no_account, phase_refused, not_member, not_found, checked in that order;
#             nothing is written for it), and the message already stored under its client
#             message id (a replay, nothing written either: the final step returns it),
#             looked up post by post in the unique index: a subquery in the select list, so
#             the planner can not join it as a whole. Statistics taken while every message
#             came from legacy (client_message_id all NULL) make the partial index look
#             empty, and a join then read all of it, every cloud post so far, for each
#             batch (tested). The sender's account and membership: a probe per post too
#   counts    new posts per conversation
#   locked    their conversations locked, in id order (two writers never deadlock)
#   bump      next_seq advanced by the new posts, read from the row the lock got; a
#             rollback gives the numbers back (seq stays gapless). ``locked`` goes first as
#             a one-time filter (an InitPlan), so each conversation is found by its own key
#             (as ``= ANY(locked)``, every conversation probed the whole locked set: 100
#             posts to 100 conversations read 10,000 index entries, a third of the batch's
#             execution time at 50)
#   numbered  each new post's seq: its conversation's next, in the order of the batch
#   membership, shared, legacy
#             per conversation (its members found by its key), whether a member still has
#             legacy clients, and the members' legacy-side handles. Every member's account
#             row is share-locked, in id order, each found by its key (joined to the
#             members, a plan that took a conversation for a large one read every account,
#             tested), after the conversations (membership reads bump), and read in the
#             version the lock got: a move out of cloud-only that committed while this post
#             waited (its back-fill could not see this post) is seen here, so the post
#             queues its own row
#   guided    each new post's legacy GUID, when it is owed to legacy (``cloud.store.outbox``)
#   posted    the messages
#   owed      their notification rows (the one rule, ``owed_notifications_sql``)
#   queued    the outbox rows, when a member still has legacy clients; the members of this
#             moment go with the row: legacy delivers it to them only
#   woken     NOTIFY per conversation, unless an earlier row of it still waits for a claim
#             (the conversation's first new row is the only one that can be first). OFFSET 0
#             keeps the NOT EXISTS a probe per conversation through its key: as an anti join
#             the planner walked the whole pending index for each conversation (a batch's
#             cost grew with the outbox's backlog: 8,400 index reads for 200 posts over 5,000
#             pending rows)
#   (final)   per post: created or replayed, with the message, or the refusal
# Prepared (``_execute_prepared``): parsing and planning it took about 1 ms of the server's
# time for every post or batch, as long as a single post's execution. The plan is kept, so
# it must not depend on the sizes and statistics of the tables when it was made: a generic
# plan made while they were empty (or had statistics of the legacy-only days) scanned the
# messages in full for every post, a cost growing with the history (tested). So every
# table is read through a key the statement names, and each read that depends on a post
# or a conversation is a subquery of its own (a LATERAL one, kept apart by ``OFFSET 0``, or
# one in the select list), which the planner can only run as a lookup per row; and it is
# planned with sequential scans disabled, which leaves an index probe the only way to run
# each of them (with scans allowed, or with joins it could turn around, it scanned tables
# or whole indexes it took for small).
_POSTS = (
    "WITH checked AS MATERIALIZED ("
    "  SELECT i.*, a.handle, (SELECT s FROM messages s WHERE s.conversation_id = i.cid "
    "    AND s.sender_account_id = i.sender AND s.client_message_id = i.client_id) "
    "    AS stored, CASE "
    "    WHEN a.account_id IS NULL THEN 'no_account' "
    "    WHEN a.phase <> ALL(%(phases)s) THEN 'phase_refused' "
    "    WHEN m.account_id IS NOT NULL THEN NULL "
    "    WHEN EXISTS (SELECT 1 FROM conversations c WHERE c.conversation_id = i.cid) "
    "      THEN 'not_member' ELSE 'not_found' END AS refusal "
    "  FROM unnest(%(cids)b::uuid[], %(senders)b::uuid[], %(client_ids)b::text[], "
    "    %(bodies)b::text[], %(message_ids)b::uuid[], %(nows)b::bigint[]) WITH ORDINALITY "
    "    AS i(cid, sender, client_id, body, message_id, now_ms, ord) "
    "  LEFT JOIN LATERAL (SELECT a.account_id, a.handle, a.phase FROM accounts a "
    "    WHERE a.account_id = i.sender OFFSET 0) a ON true "
    "  LEFT JOIN LATERAL (SELECT m.account_id FROM members m "
    "    WHERE m.conversation_id = i.cid AND m.account_id = i.sender OFFSET 0) m ON true), "
    "counts AS MATERIALIZED ("
    "  SELECT cid, count(*) AS n FROM checked "
    "  WHERE refusal IS NULL AND (stored).seq IS NULL GROUP BY cid), "
    f"{SEQS_UNDER_LOCK_SQL}"
    "numbered AS MATERIALIZED ("
    "  SELECT c.*, b.first - 1 + row_number() OVER (PARTITION BY c.cid ORDER BY c.ord) AS seq "
    "  FROM checked c JOIN bump b ON b.conversation_id = c.cid "
    "  WHERE c.refusal IS NULL AND (c.stored).seq IS NULL), "
    "membership AS MATERIALIZED ("
    "  SELECT mb.conversation_id, mb.account_id FROM bump k CROSS JOIN LATERAL ("
    "    SELECT mb.conversation_id, mb.account_id FROM members mb "
    "    WHERE mb.conversation_id = k.conversation_id OFFSET 0) mb), "
    "shared AS MATERIALIZED ("
    "  SELECT a.account_id, a.phase, coalesce(a.legacy_handle, a.handle) AS handle "
    "  FROM accounts a WHERE a.account_id = ANY (ARRAY(SELECT account_id FROM membership)) "
    "  ORDER BY a.account_id FOR SHARE), "
    "legacy AS MATERIALIZED ("
    "  SELECT m.conversation_id, bool_or(s.phase = ANY(%(legacy_phases)s)) AS owed, "
    "         array_agg(s.handle ORDER BY s.handle) AS handles "
    "  FROM membership m JOIN shared s USING (account_id) GROUP BY 1), "
    "guided AS MATERIALIZED ("
    f"  SELECT n.*, CASE WHEN l.owed THEN {LEGACY_GUID_SQL.format('n.message_id')} END "
    "    AS guid FROM numbered n LEFT JOIN legacy l ON l.conversation_id = n.cid), "
    "posted AS ("
    f"  INSERT INTO messages ({MESSAGE_COLS}) "
    "  SELECT cid, seq, message_id, sender, handle, now_ms, body, 'cloud', guid, client_id "
    "  FROM guided "
    "  RETURNING conversation_id, seq, message_id, sender_account_id, sent_ms), "
    "owed AS ("
    f"{owed_notifications_sql('posted', 'ARRAY(SELECT cid FROM counts)', 'r.sent_ms')}), "
    "queued AS ("
    "  INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, created_ms, "
    "    member_handles) "
    "  SELECT p.conversation_id, p.seq, p.message_id, p.sent_ms, l.handles "
    "  FROM posted p JOIN legacy l USING (conversation_id) WHERE l.owed "
    "  RETURNING conversation_id, seq, created_ms), "
    f"{WOKEN_SQL}"
    # woken modifies nothing, so it runs only if read: the created rows read it
    "SELECT ord, 'created', (SELECT count(*) FROM woken), cid, seq, message_id, sender, "
    "  handle, now_ms, body, 'cloud', guid, client_id FROM guided "
    "UNION ALL SELECT c.ord, 'replayed', 0, "
    f"  {', '.join('(c.stored).' + col for col in MESSAGE_COLS.split(', '))} "
    "FROM checked c WHERE c.refusal IS NULL AND (c.stored).seq IS NOT NULL "
    "UNION ALL SELECT ord, refusal, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    "  NULL FROM checked WHERE refusal IS NOT NULL")


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
    _check_text(post)
    params = _posts_params([post], sender_phases)
    try:
        rows = _execute_atomically(conn, _POSTS, params)
    except psycopg.errors.UniqueViolation as e:
        if e.diag.constraint_name != "messages_client_message_id":
            raise
        rows = _execute_atomically(conn, _POSTS, params)  # the other post committed: a replay
    return _posted(rows[0][1:] if rows else None, post, sender_phases)


@one_statement
def post_messages(conn: psycopg.Connection, posts: Sequence[Post], *,
                  sender_phases: Sequence[str] = PHASES
                  ) -> list[tuple[Message, bool] | StoreError | ValueError]:
    """Several posts in one statement (so in one transaction, the caller's or its own), each
    as ``post_message`` would write it; for each, ``(message, created)`` or the refusal it
    would raise.

    One statement and one commit for many posts: what the API's ``PostBatcher`` uses under
    load. Each conversation's posts are numbered in the order given (a repeated client
    message id replays the first); the conversations are locked in id order, as every
    writer locks them, so two batches never deadlock. If the statement fails (a race on a
    client message id with another transaction), it fails them all: run them one by one
    then.
    """
    results: list = [None] * len(posts)
    unique: list[Post] = []  # the posts sent: the first of each client message id
    first: list[int] = []  # for each, its place in posts
    answered_by: list[tuple[int, int]] = []  # (a post, the sent post that answers it)
    sent_as: dict[tuple, int] = {}
    for i, post in enumerate(posts):
        try:
            _check_text(post)
        except ValueError as e:
            results[i] = e
            continue
        n = sent_as.setdefault(
            (post.conversation_id, post.sender_account_id, post.client_message_id), len(unique))
        if n == len(unique):
            unique.append(post)
            first.append(i)
        answered_by.append((i, n))
    if not unique:
        return results
    rows = {row[0]: row[1:] for row in _execute_prepared(
        conn, _POSTS, _posts_params(unique, sender_phases))}
    for i, n in answered_by:
        try:
            message, created = _posted(rows.get(n + 1), posts[i], sender_phases)  # ord from 1
        except StoreError as e:
            results[i] = e
        else:  # a repeated client message id replays the first post's message
            results[i] = (message, created and i == first[n])
    return results


def _check_text(post: Post) -> None:
    """ValueError for text PostgreSQL can not store."""
    if "\x00" in post.body or "\x00" in post.client_message_id:
        raise ValueError("text must not contain NUL characters")  # PostgreSQL can not store it
    try:
        post.body.encode("utf-8")
        post.client_message_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None


def _posts_params(posts: Sequence[Post], sender_phases: Sequence[str]) -> dict:
    """The statement's parameters for *posts* (their text checked already)."""
    return {"cids": [p.conversation_id for p in posts],
            "senders": [p.sender_account_id for p in posts],
            "client_ids": [p.client_message_id for p in posts],
            "bodies": [p.body for p in posts],
            "message_ids": [p.message_id or uuid.uuid4() for p in posts],
            "nows": [p.now_ms for p in posts], "phases": list(sender_phases),
            "legacy_phases": list(LEGACY_CLIENT_PHASES), "channel": OUTBOX_CHANNEL}


def _posted(row: tuple | None, post: Post, sender_phases: Sequence[str]
            ) -> tuple[Message, bool]:
    """A post's row of the statement as ``(message, created)``, or the refusal it names
    (no row: its conversation was not there to lock)."""
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
                        params: dict) -> list[tuple]:
    """Run one statement (``_execute_prepared``) so that a failure undoes all of it and
    leaves *conn* usable: on its own on an idle autocommit connection, else in a
    (sub)transaction of its own."""
    if _idle_autocommit(conn):
        return _execute_prepared(conn, statement, params)
    with conn.transaction():
        return _execute_prepared(conn, statement, params)


#: Until the end of the transaction: sequential scans off, and the generic plan used from
#: the first execution on; returns the two settings as they were.
_PLAN_BY_KEYS = ("SELECT current_setting('enable_seqscan'), current_setting('plan_cache_mode'), "
                 "set_config('enable_seqscan', 'off', true), "
                 "set_config('plan_cache_mode', 'force_generic_plan', true)")


def _execute_prepared(conn: psycopg.Connection, statement: str,
                      params: dict) -> list[tuple]:
    """Run *statement* prepared, with one generic plan kept per connection (planned once,
    not for every batch), made without sequential scans; *conn*'s settings are as they were
    afterwards. (Left to choose, PostgreSQL kept planning every execution: the generic
    plan, made for arrays of unknown length, looked dearer than the custom ones.) On an
    idle autocommit connection the settings and the statement go in one round trip, as
    one implicit transaction (up to the pipeline's Sync), whose end resets them: still a
    single transaction, no BEGIN or COMMIT. In a transaction, they are put back after the
    statement (if it fails, the rollback of the transaction or savepoint puts them back)."""
    if _idle_autocommit(conn):
        with pipeline(conn):
            conn.execute(_PLAN_BY_KEYS)
            cur = conn.execute(statement, params, prepare=True)
        return cur.fetchall()
    (seqscan, mode, _, _) = conn.execute(_PLAN_BY_KEYS).fetchone()
    rows = conn.execute(statement, params, prepare=True).fetchall()
    conn.execute("SELECT set_config('enable_seqscan', %s, true), "
                 "set_config('plan_cache_mode', %s, true)", [seqscan, mode])
    return rows


def _idle_autocommit(conn: psycopg.Connection) -> bool:
    return conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def latest_from_legacy(conn: psycopg.Connection, account_id: uuid.UUID,
                       limit: int) -> list[dict]:
    """The *limit* messages mirrored from legacy (origin ``legacy``) most recently into the
    account's conversations, newest first (bodies left out): each conversation's newest by
    seq through its primary key, then merged by when they were written."""
    rows = conn.execute(
        "SELECT x.conversation_id, c.legacy_chat_id, x.seq, x.message_id, x.legacy_guid, "
        "  x.sender_handle, x.sent_ms, x.written_ms "
        "FROM members mb JOIN conversations c USING (conversation_id) "
        "CROSS JOIN LATERAL (SELECT m.conversation_id, m.seq, m.message_id, m.legacy_guid, "
        "  m.sender_handle, m.sent_ms, (extract(epoch FROM m.created_at) * 1000)::bigint "
        "  AS written_ms, m.created_at FROM messages m "
        "  WHERE m.conversation_id = mb.conversation_id AND m.origin = 'legacy' "
        "  ORDER BY m.seq DESC LIMIT %(limit)s) x "
        "WHERE mb.account_id = %(account)s "
        "ORDER BY x.created_at DESC, x.conversation_id, x.seq DESC LIMIT %(limit)s",
        {"account": account_id, "limit": limit}).fetchall()
    return [{"conversation_id": str(r[0]), "legacy_chat_id": r[1], "seq": r[2],
             "message_id": str(r[3]), "legacy_guid": r[4], "sender": r[5], "sent_ms": r[6],
             "mirrored_ms": r[7]} for r in rows]


def sync_messages(conn: psycopg.Connection, conversation_id: uuid.UUID, after_seq: int,
                  limit: int) -> list[Message]:
    """Messages with ``seq > after_seq`` in seq order, at most *limit*."""
    rows = conn.execute(
        f"SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = %s AND seq > %s "
        "ORDER BY seq LIMIT %s", (conversation_id, after_seq, limit)).fetchall()
    return [_message(r) for r in rows]


def sync_before(conn: psycopg.Connection, conversation_id: uuid.UUID, after_seq: int,
                before_seq: int, limit: int) -> list[Message]:
    """The newest *limit* messages with ``after_seq < seq < before_seq``, in seq order: a
    page of older history, read backwards from a cursor."""
    rows = conn.execute(
        f"SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = %s AND seq > %s "
        "AND seq < %s ORDER BY seq DESC LIMIT %s",
        (conversation_id, after_seq, before_seq, limit)).fetchall()
    return [_message(r) for r in reversed(rows)]


def sync_for_member(conn: psycopg.Connection, conversation_id: uuid.UUID,
                    account_id: uuid.UUID, after_seq: int, limit: int,
                    before_seq: int | None = None) -> list[Message]:
    """``sync_messages`` (or with *before_seq* ``sync_before``) for a member only
    (NotFound / NotMember otherwise)."""
    check_member(conn, conversation_id, account_id)
    if before_seq is not None:
        return sync_before(conn, conversation_id, after_seq, before_seq, limit)
    return sync_messages(conn, conversation_id, after_seq, limit)


def latest_to_legacy(conn: psycopg.Connection, account_id: uuid.UUID,
                     limit: int) -> list[dict]:
    """The *limit* newest message rows of the outbox to legacy (``cloud.store.outbox``) in
    the account's conversations, whatever their state (pending, done, skipped, failed),
    newest first (bodies left out): each conversation's newest by seq through its primary
    key, then merged by when they were queued."""
    rows = conn.execute(
        "SELECT x.conversation_id, c.legacy_chat_id, x.seq, x.message_id, m.legacy_guid, "
        "  m.sender_handle, m.sent_ms, x.state, x.attempts, x.created_ms, x.done_ms, "
        "  x.skip_reason, x.last_error "
        "FROM members mb JOIN conversations c USING (conversation_id) "
        "CROSS JOIN LATERAL (SELECT o.conversation_id, o.seq, o.message_id, o.state, "
        "  o.attempts, o.created_ms, o.done_ms, o.skip_reason, o.last_error "
        "  FROM outbox_to_legacy o WHERE o.conversation_id = mb.conversation_id "
        "  AND o.kind = 'message' ORDER BY o.seq DESC, o.sub DESC LIMIT %(limit)s) x "
        "LEFT JOIN messages m ON m.conversation_id = x.conversation_id "
        "  AND m.message_id = x.message_id "
        "WHERE mb.account_id = %(account)s "
        "ORDER BY x.created_ms DESC, x.conversation_id, x.seq DESC LIMIT %(limit)s",
        {"account": account_id, "limit": limit}).fetchall()
    return [{"conversation_id": str(r[0]), "legacy_chat_id": r[1], "seq": r[2],
             "message_id": str(r[3]), "legacy_guid": r[4], "sender": r[5], "sent_ms": r[6],
             "state": r[7], "attempts": r[8], "queued_ms": r[9], "done_ms": r[10],
             "skip_reason": r[11], "last_error": r[12]} for r in rows]
