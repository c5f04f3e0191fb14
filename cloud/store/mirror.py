"""The bridge's bulk write of mirrored messages: COPY into a staging table (a small batch:
its rows as the statement's array parameters), then one statement that numbers and inserts
what is new, owes its notifications and advances the feed checkpoints, all in the caller's
one transaction.

Conversations are locked as ``cloud.store.messages`` explains (``FOR NO KEY UPDATE``), so
``seq`` stays gapless per conversation. The insert's maintained digests and dirty set
(``cloud.store.digests``, migration 0019) are kept by triggers on ``messages``, in the same
statement's transaction: one grouped upsert per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psycopg

from cloud.db import pipeline
from cloud.model import Message, MirrorBatch, MirroredMessage, MirrorResult
from cloud.store.coordination import Verdict, send_checkpoint
from cloud.store.errors import NotFound
from cloud.store.messages import MESSAGE_COLS, owed_notifications_sql

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS mirror_staging (
    ord               integer NOT NULL,
    conversation_id   uuid NOT NULL,
    message_id        uuid NOT NULL,
    legacy_guid       text NOT NULL,
    sender_account_id uuid NOT NULL,
    sender_handle     text NOT NULL,
    sent_ms           bigint NOT NULL,
    body              text NOT NULL,
    origin            text NOT NULL
) ON COMMIT DELETE ROWS"""


_STAGING_TYPES = ("int4", "uuid", "uuid", "text", "uuid", "text", "int8", "text", "text")

#: The conversations of the rows a mirror insert numbered, for the notification rule.
_BATCH_CONVERSATIONS = "ARRAY(SELECT DISTINCT conversation_id FROM numbered)"

#: The tail both mirror inserts share: insert the numbered rows, owe notifications, return
#: (ord, seq, owed) per inserted row in (conversation, seq) order.
_INSERT_NUMBERED = (
    "ins AS ("
    f"  INSERT INTO messages ({MESSAGE_COLS}) "
    "  SELECT conversation_id, seq, message_id, sender_account_id, sender_handle, "
    "         sent_ms, body, origin, legacy_guid, NULL FROM numbered "
    "  RETURNING conversation_id, seq, message_id, sender_account_id), "
    f"owed AS ({owed_notifications_sql('ins', _BATCH_CONVERSATIONS)} RETURNING 1) "
    "SELECT ord, seq, (SELECT count(*) FROM owed) FROM numbered ORDER BY conversation_id, seq")


def _lock_conversations_of(ids: str) -> str:
    """A SELECT locking the conversations whose ids the CTE *ids* lists, in id order (two
    writers never deadlock), ``FOR NO KEY UPDATE`` (see the module docstring)."""
    return ("SELECT c.conversation_id FROM conversations c "
            f"WHERE c.conversation_id = ANY (ARRAY(SELECT conversation_id FROM {ids})) "
            "ORDER BY c.conversation_id FOR NO KEY UPDATE")


#: The usual batch, all new, in one statement: lock its conversations in id order (two
#: writers never deadlock), advance each one's next_seq by its row count, number the rows
#: from the old value in batch order, insert them, owe notifications. A row the store
#: already has fails it on a unique index (message id or legacy GUID), and a conversation
#: that does not exist leaves its rows out (fewer rows come back); both send the batch to
#: the careful path. The UPDATE reads each conversation's latest next_seq, the one it
#: locked, whatever the statement's snapshot saw.
_MIRROR_INSERT_NEW = (
    "WITH counts AS (SELECT conversation_id, count(*) AS n FROM mirror_staging GROUP BY 1), "
    f"locked AS MATERIALIZED ({_lock_conversations_of('counts')}), "
    "bump AS ("
    "  UPDATE conversations c SET next_seq = c.next_seq + k.n FROM counts k "
    "  WHERE c.conversation_id = k.conversation_id "
    "    AND c.conversation_id = ANY (ARRAY(SELECT conversation_id FROM locked)) "
    "  RETURNING c.conversation_id, c.next_seq - k.n AS first), "
    "numbered AS ("
    "  SELECT s.*, b.first - 1 + row_number() OVER "
    "         (PARTITION BY s.conversation_id ORDER BY s.ord) AS seq "
    "  FROM mirror_staging s JOIN bump b USING (conversation_id)), "
    + _INSERT_NUMBERED)

#: Up to this many rows, a new batch goes as arrays in the statement itself
#: (``_MIRROR_INSERT_NEW_ROWS``): no staging table, no COPY, nothing for the commit to
#: truncate: three round trips fewer for the few rows a quiet feed commits at a time.
SMALL_BATCH = 32

#: The batch's rows from the statement's own array parameters, shaped as the staging table.
_ROWS = (
    "staged AS (SELECT * FROM unnest(%(ord)b::int4[], %(cid)b::uuid[], %(mid)b::uuid[], "
    "  %(guid)b::text[], %(sender)b::uuid[], %(handle)b::text[], %(sent)b::int8[], "
    "  %(body)b::text[], %(origin)b::text[]) AS s(ord, conversation_id, message_id, "
    "  legacy_guid, sender_account_id, sender_handle, sent_ms, body, origin)), ")

#: ``_MIRROR_INSERT_NEW`` for a small batch given as arrays (``_ROWS``).
_MIRROR_INSERT_NEW_ROWS = ("WITH " + _ROWS + _MIRROR_INSERT_NEW.removeprefix("WITH ")
                           .replace("mirror_staging", "staged"))

#: The careful path, after the conversations are locked (``_LOCK_STAGED``): leave out rows
#: the store already has, number the rest from next_seq, advance it by what was inserted.
#: Every lookup is an index probe per staged row, whatever the planner thinks of the sizes:
#: ``OFFSET 0`` keeps each NOT EXISTS a per-row subplan and the scalar subquery can not become
#: a join. (As joins, a plan made while ``messages`` was small, and kept by a prepared
#: statement, hashed the whole table for every batch: cost growing with the history.) That
#: each probe uses the unique index it names relies on migration 0005's statistics setting.
_MIRROR_INSERT = (
    "WITH fresh AS ("
    "  SELECT s.* FROM mirror_staging s"
    "  WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = "
    "          s.conversation_id AND m.message_id = s.message_id OFFSET 0)"
    "    AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = "
    "          s.conversation_id AND m.legacy_guid = s.legacy_guid OFFSET 0)), "
    "numbered AS ("
    "  SELECT f.*, (SELECT c.next_seq FROM conversations c "
    "                WHERE c.conversation_id = f.conversation_id) - 1 + row_number() OVER "
    "         (PARTITION BY f.conversation_id ORDER BY f.ord) AS seq "
    "  FROM fresh f), "
    "tops AS (SELECT conversation_id, max(seq) AS top FROM numbered GROUP BY 1), "
    "bump AS ("
    "  UPDATE conversations c SET next_seq = t.top + 1 FROM tops t "
    "  WHERE c.conversation_id = t.conversation_id "
    "    AND c.conversation_id = ANY (ARRAY(SELECT conversation_id FROM tops))), "
    + _INSERT_NUMBERED)

#: Lock the staged rows' conversations in id order; returns the ones that do not exist.
#: The ids come from the staging table, so a large batch sends no array of them.
_LOCK_STAGED = (
    "WITH wanted AS (SELECT DISTINCT conversation_id FROM mirror_staging), "
    f"locked AS MATERIALIZED ({_lock_conversations_of('wanted')}) "
    "SELECT conversation_id FROM wanted "
    "WHERE conversation_id NOT IN (SELECT conversation_id FROM locked)")


#: The savepoint before the fast insert, rolled back to when it meets a replayed row.
_SAVEPOINT = "mirror_new"


#: The unique indexes a replayed row violates (the same message id or legacy GUID).
_STORED_ALREADY = ("messages_conversation_id_message_id_key",
                   "messages_conversation_id_legacy_guid_key")


def _stage(conn: psycopg.Connection, messages: Sequence[MirroredMessage]) -> None:
    """COPY *messages* into the session's staging table (emptied at every commit)."""
    conn.execute(_STAGING)
    with conn.cursor().copy(
            "COPY mirror_staging (ord, conversation_id, message_id, legacy_guid, "
            "sender_account_id, sender_handle, sent_ms, body, origin) "
            "FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_STAGING_TYPES)
        for i, m in enumerate(messages):
            copy.write_row((i, m.conversation_id, m.message_id, m.legacy_guid,
                            m.sender_account_id, m.sender_handle, m.sent_ms, m.body,
                            m.origin))


def _as_arrays(messages: Sequence[MirroredMessage]) -> dict:
    """*messages* as the array parameters of ``_ROWS``."""
    return {"ord": list(range(len(messages))),
            "cid": [m.conversation_id for m in messages],
            "mid": [m.message_id for m in messages],
            "guid": [m.legacy_guid for m in messages],
            "sender": [m.sender_account_id for m in messages],
            "handle": [m.sender_handle for m in messages],
            "sent": [m.sent_ms for m in messages],
            "body": [m.body for m in messages],
            "origin": [m.origin for m in messages]}


def _mirror_carefully(conn: psycopg.Connection, messages: Sequence[MirroredMessage],
                      now_ms: int, *, staged: bool) -> list[tuple]:
    """Lock the batch's conversations, then insert the rows the store does not have (from
    the staging table, filled here first unless it was for the fast statement)."""
    if not staged:
        _stage(conn, messages)
    missing = conn.execute(_LOCK_STAGED).fetchall()
    if missing:
        raise NotFound(f"no conversation {min(r[0] for r in missing)} (create it first)")
    return conn.execute(_MIRROR_INSERT, {"now": now_ms}).fetchall()


def _dedupe(messages: Sequence[MirroredMessage]) -> list[MirroredMessage]:
    """First occurrence of each (conversation, message id) and (conversation, GUID)."""
    seen_ids: set = set()
    seen_guids: set = set()
    out = []
    for m in messages:
        # keyed by the UUIDs' ints: hashing a UUID object is a Python-level call
        cid = m.conversation_id.int
        kid, kguid = (cid, m.message_id.int), (cid, m.legacy_guid)
        if kid in seen_ids or kguid in seen_guids:
            continue
        seen_ids.add(kid)
        seen_guids.add(kguid)
        out.append(m)
    return out


def write_mirrored_batch(conn: psycopg.Connection, batch: MirrorBatch, now_ms: int, *,
                         first: Callable[[psycopg.Connection], Verdict] | None = None,
                         then: Callable[[psycopg.Connection], object] | None = None
                         ) -> MirrorResult:
    """The bridge's idempotent bulk write: messages, their notifications, the checkpoints.

    COPY into a session-private staging table (up to ``SMALL_BATCH`` rows: the rows go as
    array parameters instead); lock the batch's conversations (in id order,
    so two writers never deadlock); drop rows the store already has; number the rest per
    conversation in batch order, so source order is kept; insert them; owe notifications;
    advance the feed checkpoints. All in the caller's one transaction: replaying a batch, or
    a crash anywhere before commit, changes nothing.

    A new batch takes one statement without duplicate probes (``_MIRROR_INSERT_NEW``), in a
    savepoint, sent in one pipeline with the checkpoints, whatever *first* sends before it
    (a check, whose verdict it returns: judged before anything else is decided) and *then*
    writes after it: one round trip for all of them. A replay (or a conversation that does
    not exist) rolls back to that savepoint and takes the careful path, then writes the
    checkpoints and *then* again.
    """
    messages = _dedupe(batch.messages)
    for m in messages:
        if m.origin not in ("cloud", "legacy"):
            raise ValueError(f"unknown origin {m.origin!r}")
    small = len(messages) <= SMALL_BATCH
    params: dict = {"now": now_ms}
    if messages and small:
        params.update(_as_arrays(messages))
    elif messages:
        _stage(conn, messages)  # COPY: not in a pipeline

    def tail() -> list[Verdict]:
        """Send the checkpoints and what *then* writes; their verdicts."""
        verdicts = [send_checkpoint(conn, c, now_ms) for c in batch.checkpoints]
        if then is not None:
            then(conn)
        return verdicts

    replayed = False
    verdict: Verdict | None = None
    fast: psycopg.Cursor | None = None
    saved: list[Verdict] = []
    try:
        with pipeline(conn):
            verdict = first(conn) if first is not None else None
            if messages:
                # A batch is new unless it is a replay (after a reconnect, a restart, a
                # lease takeover): one statement, without the duplicate probes.
                conn.execute(f"SAVEPOINT {_SAVEPOINT}")
                fast = conn.execute(_MIRROR_INSERT_NEW_ROWS if small else _MIRROR_INSERT_NEW,
                                    params)
            saved = tail()
    except psycopg.errors.UniqueViolation as e:
        # (the statements after it in the pipeline did not run)
        if e.diag.constraint_name not in _STORED_ALREADY:
            raise  # not a replayed row: a numbering bug must not hide in the careful path
        replayed = True
    if verdict is not None:
        verdict()
    rows: list[tuple] = []
    if messages:
        if not replayed:
            rows = fast.fetchall()  # sent: a batch with messages always sends it
        if replayed or len(rows) != len(messages):
            conn.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")  # the checkpoints and *then* too
            rows = _mirror_carefully(conn, messages, now_ms, staged=not small)
            saved = tail()
    for judge in saved:
        judge()
    inserted: list[Message] = []
    notified = 0
    for ord_, seq, owed in rows:
        m = messages[ord_]
        inserted.append(Message(m.conversation_id, seq, m.message_id, m.sender_account_id,
                                m.sender_handle, m.sent_ms, m.body, m.origin,
                                m.legacy_guid, None))
        notified = owed
    return MirrorResult(tuple(inserted), len(batch.messages) - len(inserted), notified)
