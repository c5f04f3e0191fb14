"""The cloud store's transactions: one function per transaction, each safe to run twice.

Every function takes a psycopg connection that is already inside a transaction (see
``cloud.db``) and the current time in milliseconds from the caller's injected clock. SQL is
always parameterised.

Sequence numbers: ``conversations.next_seq`` is the next ``seq`` to hand out. A writer locks
the conversation row first (``FOR NO KEY UPDATE``: the mode its UPDATE of next_seq takes,
and one that lets a transaction adding members, whose foreign key check takes ``FOR KEY
SHARE``, go on), so writers to one conversation take turns and a rolled-back transaction
gives its numbers back: ``seq`` is gapless per conversation.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import attrs
import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from cloud.model import (
    CLOUD_CLIENT_PHASES,
    LEGACY_CLIENT_PHASES,
    MAX_MEMBERS,
    PHASES,
    PRESENCE_STATUSES,
    Account,
    Digest,
    FeedCheckpoint,
    Message,
    MirrorBatch,
    MirroredMessage,
    MirrorResult,
    Notification,
    Presence,
)

#: LISTEN/NOTIFY channel the bridge waits on for new outbox_to_legacy rows.
OUTBOX_CHANNEL = "outbox_to_legacy"

_U64 = 1 << 64


class StoreError(Exception):
    """A request the store refuses; ``code`` is stable for APIs and tests."""

    code = "store_error"


class NotFound(StoreError):
    code = "not_found"


class NotMember(StoreError):
    code = "not_member"


class Conflict(StoreError):
    code = "conflict"


class TooManyMembers(StoreError, ValueError):
    """A conversation would have more than ``MAX_MEMBERS`` members; nothing was added."""

    code = "too_many_members"


class StaleFence(StoreError):
    """A checkpoint from a worker whose lease was taken over; the whole batch rolls back."""

    code = "stale_fence"


# ---------------------------------------------------------------- accounts and conversations

def create_account(conn: psycopg.Connection, account: Account,
                   password_hash: str | None) -> bool:
    """Create *account* unless its id or handle exists; True if this call created it."""
    if account.phase not in PHASES:
        raise ValueError(f"unknown phase {account.phase!r}")
    cur = conn.execute(
        "INSERT INTO account_handles (handle, account_id) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING", (account.handle, account.account_id))
    if cur.rowcount == 0:
        owner = conn.execute("SELECT account_id FROM account_handles WHERE handle = %s",
                             (account.handle,)).fetchone()[0]
        if owner != account.account_id:
            raise Conflict(f"handle {account.handle!r} belongs to another account")
    cur = conn.execute(
        "INSERT INTO accounts (account_id, handle, legacy_handle, display_name, "
        "password_hash, phase) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (account.account_id, account.handle, account.legacy_handle, account.display_name,
         password_hash, account.phase))
    return cur.rowcount == 1


_ACCOUNT_COLS = "account_id, handle, phase, legacy_handle, display_name"


def _account(row: tuple) -> Account:
    return Account(row[0], row[1], row[2], row[3], row[4])


def ensure_linked_accounts(conn: psycopg.Connection,
                           new_ids: dict[str, uuid.UUID]) -> tuple[dict[str, uuid.UUID], int]:
    """Find or create the accounts of legacy handles; ``(handle -> account id, created)``.

    *new_ids* gives, per handle, the id a new linked account gets (phase ``legacy``, no
    password until accounts are imported). A handle that already names an account (linked
    earlier, or a cloud-native account) keeps it.
    """
    handles = sorted(new_ids)
    if not handles:
        return {}, 0
    cur = conn.execute(
        "INSERT INTO account_handles (handle, account_id) "
        "SELECT * FROM unnest(%s::text[], %s::uuid[]) ON CONFLICT DO NOTHING "
        "RETURNING handle, account_id", (handles, [new_ids[h] for h in handles]))
    fresh = cur.fetchall()
    if fresh:
        conn.execute(
            "INSERT INTO accounts (account_id, handle, legacy_handle, phase) "
            "SELECT a, h, h, 'legacy' FROM unnest(%s::text[], %s::uuid[]) AS t(h, a) "
            "ON CONFLICT DO NOTHING", ([h for h, _ in fresh], [a for _, a in fresh]))
    rows = conn.execute("SELECT handle, account_id FROM account_handles WHERE handle = ANY(%s)",
                        (handles,)).fetchall()
    return dict(rows), len(fresh)


def record_finding(conn: psycopg.Connection, kind: str, detail: dict, now_ms: int, *,
                   conversation_id: uuid.UUID | None = None,
                   account_id: uuid.UUID | None = None, run_id: int | None = None) -> int:
    """Open a finding for the reconcilers (a feed gap, a refused injection, ...)."""
    return conn.execute(
        "INSERT INTO reconcile_findings (run_id, kind, state, conversation_id, account_id, "
        "detail, created_ms) VALUES (%s, %s, 'open', %s, %s, %s, %s) RETURNING finding_id",
        (run_id, kind, conversation_id, account_id, Jsonb(detail), now_ms)).fetchone()[0]


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


# ---------------------------------------------------------------- leases (scale-out)

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
    cur = conn.execute(
        "UPDATE leases SET expires_ms = %s WHERE name = %s AND holder = %s AND fence = %s "
        "AND expires_ms > %s", (now_ms + ttl_ms, name, holder, fence, now_ms))
    return cur.rowcount == 1


def release_lease(conn: psycopg.Connection, name: str, holder: str, fence: int) -> None:
    """Give a lease up at once (a clean stop or a rebalance), so another worker need not wait."""
    conn.execute("UPDATE leases SET expires_ms = 0 WHERE name = %s AND holder = %s "
                 "AND fence = %s", (name, holder, fence))


def check_lease(conn: psycopg.Connection, name: str, holder: str, fence: int) -> None:
    """Fencing: raise StaleFence unless this holder still has the lease under this token.

    ``FOR SHARE`` keeps a competing acquisition waiting until this transaction ends, so a
    commit that passed the check can not interleave with a takeover.
    """
    row = conn.execute("SELECT holder, fence FROM leases WHERE name = %s FOR SHARE",
                       (name,)).fetchone()
    if row is None or row[0] != holder or row[1] != fence:
        raise StaleFence(f"lease {name!r} is no longer held by {holder!r} under fence {fence}")


def load_checkpoint(conn: psycopg.Connection, source: str) -> FeedCheckpoint | None:
    row = conn.execute('SELECT source, epoch, "offset", fence FROM bridge_checkpoints '
                       "WHERE source = %s", (source,)).fetchone()
    return None if row is None else FeedCheckpoint(*row)


def accounts_by_phase(conn: psycopg.Connection) -> dict[str, int]:
    """How many accounts are in each phase (every phase present, zero if none)."""
    counts = dict.fromkeys(PHASES, 0)
    for phase, n in conn.execute("SELECT phase, count(*) FROM accounts GROUP BY 1"):
        counts[phase] = n
    return counts


def get_account(conn: psycopg.Connection, account_id: uuid.UUID) -> Account | None:
    row = conn.execute(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE account_id = %s",
                       (account_id,)).fetchone()
    return None if row is None else _account(row)


def account_for_login(conn: psycopg.Connection,
                      handle_or_id: str) -> tuple[Account, str | None] | None:
    """The account a login names (by handle, or by account id) and its password hash."""
    try:
        account_id = uuid.UUID(handle_or_id)
    except ValueError:
        row = conn.execute("SELECT account_id FROM account_handles WHERE handle = %s",
                           (handle_or_id,)).fetchone()
        if row is None:
            return None
        account_id = row[0]
    row = conn.execute(
        f"SELECT {_ACCOUNT_COLS}, password_hash FROM accounts WHERE account_id = %s",
        (account_id,)).fetchone()
    return None if row is None else (_account(row[:5]), row[5])


def set_phase(conn: psycopg.Connection, account_id: uuid.UUID, phase: str) -> str:
    """Move an account to *phase*; return the phase it had. Gates belong to the caller."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    row = conn.execute("SELECT phase FROM accounts WHERE account_id = %s FOR UPDATE",
                       (account_id,)).fetchone()
    if row is None:
        raise NotFound(f"no account {account_id}")
    conn.execute("UPDATE accounts SET phase = %s, phase_changed_at = now() "
                 "WHERE account_id = %s", (phase, account_id))
    return row[0]


def create_conversation(conn: psycopg.Connection, conversation_id: uuid.UUID,
                        members: Iterable[uuid.UUID], *, title: str = "",
                        legacy_chat_id: str | None = None) -> bool:
    """Create a conversation (or find it) and make sure *members* belong to it.

    True if this call created the conversation. Idempotent: a second call adds only
    members that are missing.
    """
    if legacy_chat_id is not None:
        _map_legacy_chats(conn, {legacy_chat_id: conversation_id})
    cur = conn.execute(
        "INSERT INTO conversations (conversation_id, legacy_chat_id, title) "
        "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (conversation_id, legacy_chat_id, title))
    created = cur.rowcount == 1
    add_members(conn, conversation_id, members)
    return created


def ensure_legacy_conversations(conn: psycopg.Connection,
                                chats: Mapping[str, tuple[uuid.UUID, Sequence[uuid.UUID]]]
                                ) -> dict[str, str]:
    """``create_conversation`` for many legacy chats at once (chat id -> (conversation id,
    members)), in a fixed number of statements: the bridge's first batches meet thousands.

    Returns the chats refused, with why: a conversation that would have more than
    ``MAX_MEMBERS`` members gets nothing added (as ``add_members`` would raise
    ``TooManyMembers``). ``Conflict`` when a chat id maps to another conversation,
    ``NotFound`` when a member is not a known account; both roll back with the caller.
    """
    if not chats:
        return {}
    chat_ids = sorted(chats)
    cids = [chats[c][0] for c in chat_ids]
    _map_legacy_chats(conn, {c: chats[c][0] for c in chat_ids})
    conn.execute(
        "INSERT INTO conversations (conversation_id, legacy_chat_id, title) "
        "SELECT c, l, '' FROM unnest(%s::uuid[], %s::text[]) AS u(c, l) "
        "ON CONFLICT DO NOTHING", (cids, chat_ids))
    pairs = sorted({(chats[c][0], a) for c in chat_ids for a in chats[c][1]})
    if not pairs:
        return {}
    _require_accounts(conn, sorted({a for _c, a in pairs}))
    too_big = _over_member_limit(conn, pairs)
    keep = [(c, a) for c, a in pairs if c not in too_big]
    conn.execute(
        "INSERT INTO members (conversation_id, account_id) "
        "SELECT * FROM unnest(%s::uuid[], %s::uuid[]) ON CONFLICT DO NOTHING",
        ([c for c, _a in keep], [a for _c, a in keep]))
    return {c: _too_many_members(too_big[chats[c][0]])
            for c in chat_ids if chats[c][0] in too_big}


def add_members(conn: psycopg.Connection, conversation_id: uuid.UUID,
                members: Iterable[uuid.UUID]) -> int:
    """Add accounts to a conversation; return how many were not members yet.

    Raises ``TooManyMembers`` (adding nothing) when the conversation would have more than
    ``MAX_MEMBERS`` members. The count is checked in this transaction: two transactions
    adding different members at once could pass it together.
    """
    ids = sorted(set(members))
    if not ids:
        return 0
    _require_accounts(conn, ids)
    over = _over_member_limit(conn, [(conversation_id, a) for a in ids])
    if over:
        raise TooManyMembers(_too_many_members(over[conversation_id]))
    cur = conn.execute(
        "INSERT INTO members (conversation_id, account_id) SELECT %s, unnest(%s::uuid[]) "
        "ON CONFLICT DO NOTHING", (conversation_id, ids))
    return cur.rowcount


def _map_legacy_chats(conn: psycopg.Connection, chats: Mapping[str, uuid.UUID]) -> None:
    """Record which conversation each legacy chat id is (chat id -> conversation id);
    ``Conflict`` when one already maps to another conversation."""
    chat_ids = sorted(chats)
    conn.execute(
        "INSERT INTO conversation_legacy_ids (legacy_chat_id, conversation_id) "
        "SELECT * FROM unnest(%s::text[], %s::uuid[]) ON CONFLICT DO NOTHING",
        (chat_ids, [chats[c] for c in chat_ids]))
    owners = dict(conn.execute(
        "SELECT legacy_chat_id, conversation_id FROM conversation_legacy_ids "
        "WHERE legacy_chat_id = ANY(%s)", (chat_ids,)).fetchall())
    for chat_id in chat_ids:
        if owners.get(chat_id) != chats[chat_id]:
            raise Conflict(f"legacy chat {chat_id!r} maps to another conversation")


def _require_accounts(conn: psycopg.Connection, account_ids: Sequence[uuid.UUID]) -> None:
    """``NotFound`` unless every one of *account_ids* (distinct) is a known account."""
    (known,) = conn.execute("SELECT count(*) FROM accounts WHERE account_id = ANY(%s)",
                            (list(account_ids),)).fetchone()
    if known != len(account_ids):
        raise NotFound("a member is not a known account")


def _over_member_limit(conn: psycopg.Connection,
                       pairs: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> dict[uuid.UUID, int]:
    """The conversations that adding the distinct (conversation, account) *pairs* would take
    past ``MAX_MEMBERS``, with the number of members each would have."""
    return dict(conn.execute(
        "WITH want AS (SELECT * FROM unnest(%s::uuid[], %s::uuid[]) AS w(c, a)), "
        "totals AS ("
        "  SELECT w.c, count(*) FILTER (WHERE m.account_id IS NULL) "
        "         + (SELECT count(*) FROM members x WHERE x.conversation_id = w.c) AS total "
        "  FROM want w LEFT JOIN members m ON m.conversation_id = w.c AND m.account_id = w.a "
        "  GROUP BY w.c) "
        "SELECT c, total FROM totals WHERE total > %s",
        ([c for c, _a in pairs], [a for _c, a in pairs], MAX_MEMBERS)).fetchall())


def _too_many_members(total: int) -> str:
    return f"a conversation has at most {MAX_MEMBERS} members; this one would have {total}"


def is_member(conn: psycopg.Connection, conversation_id: uuid.UUID,
              account_id: uuid.UUID) -> bool:
    return conn.execute("SELECT 1 FROM members WHERE conversation_id = %s AND account_id = %s",
                        (conversation_id, account_id)).fetchone() is not None


def conversation_exists(conn: psycopg.Connection, conversation_id: uuid.UUID) -> bool:
    return conn.execute("SELECT 1 FROM conversations WHERE conversation_id = %s",
                        (conversation_id,)).fetchone() is not None


def check_member(conn: psycopg.Connection, conversation_id: uuid.UUID,
                 account_id: uuid.UUID) -> None:
    """NotFound for an unknown conversation, NotMember for an outsider, else nothing."""
    if not is_member(conn, conversation_id, account_id):
        if not conversation_exists(conn, conversation_id):
            raise NotFound(f"no conversation {conversation_id}")
        raise NotMember("you are not a member of this conversation")


def list_conversations(conn: psycopg.Connection, account_id: uuid.UUID) -> list[dict]:
    """The account's conversations with their members and last seq (for sync)."""
    rows = conn.execute(
        "SELECT c.conversation_id, c.title, c.next_seq - 1, "
        "       array(SELECT m2.account_id FROM members m2 "
        "             WHERE m2.conversation_id = c.conversation_id ORDER BY m2.account_id) "
        "FROM members m JOIN conversations c USING (conversation_id) "
        "WHERE m.account_id = %s ORDER BY c.conversation_id", (account_id,)).fetchall()
    return [{"conversation_id": str(cid), "title": title, "last_seq": last,
             "members": [str(a) for a in members]} for cid, title, last, members in rows]


# ---------------------------------------------------------------- messages

_MESSAGE_COLS = ("conversation_id, seq, message_id, sender_account_id, sender_handle, "
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


def _owed_notifications_sql(rows: str, conversations: str) -> str:
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
        _owed_notifications_sql("(SELECT * FROM messages WHERE conversation_id = %(cid)s "
                                "AND seq = ANY(%(seqs)s))", "ARRAY[%(cid)s]::uuid[]"),
        {"now": now_ms, "cid": conversation_id, "seqs": list(seqs)})
    return cur.rowcount


def post_message(conn: psycopg.Connection, conversation_id: uuid.UUID,
                 sender_account_id: uuid.UUID, client_message_id: str, body: str,
                 now_ms: int) -> tuple[Message, bool]:
    """A cloud client's message; the same client message id returns the same message.

    Returns ``(message, created)``. In the same transaction: notification rows for
    cloud-capable members, and an ``outbox_to_legacy`` row when any member still has legacy
    clients (the bridge is woken by NOTIFY when this commits).
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
        f"SELECT {_MESSAGE_COLS} FROM messages WHERE conversation_id = %s "
        "AND sender_account_id = %s AND client_message_id = %s",
        (conversation_id, sender_account_id, client_message_id)).fetchone()
    if existing is not None:
        return _message(existing), False
    handle = conn.execute("SELECT handle FROM accounts WHERE account_id = %s",
                          (sender_account_id,)).fetchone()[0]
    message = Message(conversation_id, next_seq, uuid.uuid4(), sender_account_id, handle,
                      now_ms, body, "cloud", None, client_message_id)
    conn.execute(
        f"INSERT INTO messages ({_MESSAGE_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
        _message_row(message))
    conn.execute("UPDATE conversations SET next_seq = %s WHERE conversation_id = %s",
                 (next_seq + 1, conversation_id))
    _owe_notifications(conn, conversation_id, [next_seq], now_ms)
    legacy_members = conn.execute(
        "SELECT 1 FROM members mb JOIN accounts a USING (account_id) "
        "WHERE mb.conversation_id = %s AND a.phase = ANY(%s) LIMIT 1",
        (conversation_id, list(LEGACY_CLIENT_PHASES))).fetchone()
    if legacy_members is not None:
        conn.execute(
            "INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, created_ms) "
            "VALUES (%s, %s, %s, %s)", (conversation_id, next_seq, message.message_id, now_ms))
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
        f"SELECT {_MESSAGE_COLS} FROM messages WHERE conversation_id = %s AND seq > %s "
        "ORDER BY seq LIMIT %s", (conversation_id, after_seq, limit)).fetchall()
    return [_message(r) for r in rows]


def sync_for_member(conn: psycopg.Connection, conversation_id: uuid.UUID,
                    account_id: uuid.UUID, after_seq: int, limit: int) -> list[Message]:
    """``sync_messages`` for a member only (NotFound / NotMember otherwise)."""
    check_member(conn, conversation_id, account_id)
    return sync_messages(conn, conversation_id, after_seq, limit)


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
    f"  INSERT INTO messages ({_MESSAGE_COLS}) "
    "  SELECT conversation_id, seq, message_id, sender_account_id, sender_handle, "
    "         sent_ms, body, origin, legacy_guid, NULL FROM numbered "
    "  RETURNING conversation_id, seq, message_id, sender_account_id), "
    f"owed AS ({_owed_notifications_sql('ins', _BATCH_CONVERSATIONS)} RETURNING 1) "
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


class _NotAllNew(Exception):
    """The fast mirror insert met a conversation that does not exist: roll it back."""


#: The unique indexes a replayed row violates (the same message id or legacy GUID).
_STORED_ALREADY = ("messages_conversation_id_message_id_key",
                   "messages_conversation_id_legacy_guid_key")


def _mirror_carefully(conn: psycopg.Connection, params: dict) -> list[tuple]:
    """Lock the staged rows' conversations, then insert the rows the store does not have."""
    missing = conn.execute(_LOCK_STAGED).fetchall()
    if missing:
        raise NotFound(f"no conversation {min(r[0] for r in missing)} (create it first)")
    return conn.execute(_MIRROR_INSERT, params).fetchall()


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


def write_mirrored_batch(conn: psycopg.Connection, batch: MirrorBatch,
                         now_ms: int) -> MirrorResult:
    """The bridge's idempotent bulk write: messages, their notifications, the checkpoints.

    COPY into a session-private staging table; lock the batch's conversations (in id order,
    so two writers never deadlock); drop rows the store already has; number the rest per
    conversation in batch order, so source order is kept; insert them; owe notifications;
    advance the feed checkpoints. All in the caller's one transaction: replaying a batch, or
    a crash anywhere before commit, changes nothing. A new batch takes one statement without
    duplicate probes (``_MIRROR_INSERT_NEW``); anything else rolls that back to its savepoint
    and takes the careful path.
    """
    messages = _dedupe(batch.messages)
    inserted: list[Message] = []
    notified = 0
    if messages:
        for m in messages:
            if m.origin not in ("cloud", "legacy"):
                raise ValueError(f"unknown origin {m.origin!r}")
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
        params = {"now": now_ms}
        try:
            # A batch is new unless it is a replay (after a reconnect, a restart, a lease
            # takeover): one statement, in a savepoint, without the duplicate probes.
            with conn.transaction():
                rows = conn.execute(_MIRROR_INSERT_NEW, params).fetchall()
                if len(rows) != len(messages):
                    raise _NotAllNew
        except psycopg.errors.UniqueViolation as e:
            if e.diag.constraint_name not in _STORED_ALREADY:
                raise  # not a replayed row: a numbering bug must not hide in the careful path
            rows = _mirror_carefully(conn, params)
        except _NotAllNew:
            rows = _mirror_carefully(conn, params)
        for ord_, seq, owed in rows:
            m = messages[ord_]
            inserted.append(Message(m.conversation_id, seq, m.message_id, m.sender_account_id,
                                    m.sender_handle, m.sent_ms, m.body, m.origin,
                                    m.legacy_guid, None))
            notified = owed
    for checkpoint in batch.checkpoints:
        save_checkpoint(conn, checkpoint, now_ms)
    return MirrorResult(tuple(inserted), len(batch.messages) - len(inserted), notified)


def save_checkpoint(conn: psycopg.Connection, checkpoint: FeedCheckpoint, now_ms: int) -> None:
    """Advance a feed checkpoint unless a higher fence holds it (then: ``StaleFence``)."""
    cur = conn.execute(
        'INSERT INTO bridge_checkpoints (source, epoch, "offset", fence, updated_ms) '
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (source) DO UPDATE SET "
        'epoch = excluded.epoch, "offset" = excluded."offset", fence = excluded.fence, '
        "updated_ms = excluded.updated_ms, updated_at = now() "
        "WHERE bridge_checkpoints.fence <= excluded.fence",
        (checkpoint.source, checkpoint.epoch, checkpoint.offset, checkpoint.fence, now_ms))
    if cur.rowcount == 0:
        raise StaleFence(f"checkpoint {checkpoint.source!r} is held under a newer fence")


def load_checkpoints(conn: psycopg.Connection) -> dict[str, FeedCheckpoint]:
    rows = conn.execute(
        'SELECT source, epoch, "offset", fence FROM bridge_checkpoints').fetchall()
    return {r[0]: FeedCheckpoint(*r) for r in rows}


# ---------------------------------------------------------------- digests

def range_digest(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                 end_ms: int, prefix_bits: int = 0, prefix: int = 0) -> Digest:
    """The docs/digest.md digest of one range, computed in SQL from stored columns.

    Only messages with a legacy GUID take part (a cloud message gets its GUID when the
    bridge injects it into the legacy network).
    """
    return range_digests(conn, conversation_id, start_ms, end_ms, prefix_bits, prefix, 0)[0]


def range_digests(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                  end_ms: int, prefix_bits: int, prefix: int, split_bits: int) -> list[Digest]:
    """Digests of the ``2**split_bits`` bucket-prefix children of a range, in child order."""
    if not 0 <= prefix_bits <= 32 or not 0 <= split_bits <= 8 or prefix_bits + split_bits > 32:
        raise ValueError("prefix_bits + split_bits must be within 0..32 (split at most 8)")
    if not 0 <= prefix < (1 << prefix_bits) or (prefix_bits == 0 and prefix != 0):
        raise ValueError("prefix must be below 2**prefix_bits")
    bits = prefix_bits + split_bits
    shift = 32 - bits
    rows = conn.execute(
        "SELECT (digest_bucket >> %(shift)s) & %(mask)s AS child, count(*), "
        "       sum(digest_hash::numeric) "
        "FROM messages WHERE conversation_id = %(cid)s AND legacy_guid IS NOT NULL "
        "  AND sent_ms >= %(start)s AND sent_ms < %(end)s "
        "  AND (%(pbits)s = 0 OR digest_bucket >> (32 - %(pbits)s) = %(prefix)s) "
        "GROUP BY 1",
        {"shift": shift, "mask": (1 << split_bits) - 1, "cid": conversation_id,
         "start": start_ms, "end": end_ms, "pbits": prefix_bits, "prefix": prefix}).fetchall()
    out = [Digest(0, 0) for _ in range(1 << split_bits)]
    for child, count, total in rows:
        out[int(child)] = Digest(int(count), int(total) % _U64)
    return out


def range_guids(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                end_ms: int, prefix_bits: int, prefix: int) -> list[str]:
    """The legacy GUIDs of the cloud messages in one digest range (for a leaf comparison)."""
    return [r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %(cid)s "
        "  AND legacy_guid IS NOT NULL AND sent_ms >= %(start)s AND sent_ms < %(end)s "
        "  AND (%(pbits)s = 0 OR digest_bucket >> (32 - %(pbits)s) = %(prefix)s) "
        "ORDER BY sent_ms, legacy_guid",
        {"cid": conversation_id, "start": start_ms, "end": end_ms, "pbits": prefix_bits,
         "prefix": prefix})]


def messages_by_guid(conn: psycopg.Connection, conversation_id: uuid.UUID,
                     guids: Sequence[str]) -> list[tuple[str, str, int, str]]:
    """(guid, sender's legacy-side handle, sent_ms, body) of the cloud messages named."""
    return conn.execute(
        "SELECT m.legacy_guid, coalesce(a.legacy_handle, a.handle), m.sent_ms, m.body "
        "FROM messages m JOIN accounts a ON a.account_id = m.sender_account_id "
        "WHERE m.conversation_id = %s AND m.legacy_guid = ANY(%s) ORDER BY m.seq",
        (conversation_id, list(guids))).fetchall()


def legacy_chats(conn: psycopg.Connection) -> dict[str, uuid.UUID]:
    """Every conversation that has a legacy chat id: chat id -> conversation id."""
    return dict(conn.execute(
        "SELECT legacy_chat_id, conversation_id FROM conversation_legacy_ids").fetchall())


def member_handles(conn: psycopg.Connection,
                   conversation_id: uuid.UUID) -> tuple[tuple[str, ...], int]:
    """Members' legacy-side handles (sorted) and how many still have legacy clients."""
    rows = conn.execute(
        "SELECT coalesce(a.legacy_handle, a.handle), a.phase = ANY(%s) FROM members m "
        "JOIN accounts a USING (account_id) WHERE m.conversation_id = %s ORDER BY 1",
        (list(LEGACY_CLIENT_PHASES), conversation_id)).fetchall()
    return tuple(h for h, _ in rows), sum(1 for _, legacy in rows if legacy)


# ---------------------------------------------------------------- presence

def set_presence(conn: psycopg.Connection, presence: Presence) -> bool:
    """Record one source's presence; an older version than the stored one is ignored."""
    if presence.status not in PRESENCE_STATUSES:
        raise ValueError(f"unknown presence status {presence.status!r}")
    cur = conn.execute(
        "INSERT INTO presence (account_id, source, status, version, expires_ms) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account_id, source) DO UPDATE SET "
        "status = excluded.status, version = excluded.version, "
        "expires_ms = excluded.expires_ms, updated_at = now() "
        "WHERE presence.version <= excluded.version",
        (presence.account_id, presence.source, presence.status, presence.version,
         presence.expires_ms))
    return cur.rowcount == 1


def read_presence(conn: psycopg.Connection, account_ids: Sequence[uuid.UUID],
                  now_ms: int) -> dict[uuid.UUID, list[Presence]]:
    """Every unexpired source's presence for each account (missing: no live source)."""
    rows = conn.execute(
        "SELECT account_id, source, status, version, expires_ms FROM presence "
        "WHERE account_id = ANY(%s) AND expires_ms > %s ORDER BY account_id, source",
        (list(account_ids), now_ms)).fetchall()
    out: dict[uuid.UUID, list[Presence]] = {}
    for r in rows:
        out.setdefault(r[0], []).append(Presence(*r))
    return out


def cloud_presence_changes(conn: psycopg.Connection, after: tuple[int, uuid.UUID],
                           limit: int) -> list[tuple[int, uuid.UUID, str, str, int]]:
    """Cloud-source presence set after *after* = (version, account id), for accounts that
    still have legacy clients and a legacy handle: (version, account, handle, status,
    expires_ms), in (version, account) order so the caller can resume from the last one."""
    return conn.execute(
        "SELECT p.version, p.account_id, a.legacy_handle, p.status, p.expires_ms "
        "FROM presence p JOIN accounts a USING (account_id) "
        "WHERE p.source = 'cloud' AND (p.version, p.account_id) > (%s, %s) "
        "  AND a.legacy_handle IS NOT NULL AND a.phase = ANY(%s) "
        "ORDER BY p.version, p.account_id LIMIT %s",
        (after[0], after[1], list(LEGACY_CLIENT_PHASES), limit)).fetchall()


# ---------------------------------------------------------------- notifications

_NOTIFICATION_COLS = ("account_id, notification_id, conversation_id, message_id, seq, state, "
                      "attempts")


def claim_due_notifications(conn: psycopg.Connection, now_ms: int, limit: int,
                            resend_after_ms: int, max_attempts: int
                            ) -> tuple[list[Notification], list[Notification]]:
    """Take up to *limit* notifications that are due: ``(to_push, now_failed)``.

    A due notification is pending, or sent but not acknowledged by its resend time. Each one
    taken counts an attempt and is rescheduled *resend_after_ms* ahead before it is pushed,
    so a dispatcher that dies mid-push loses nothing: the row comes due again. One that has
    used *max_attempts* becomes ``failed`` with an open finding instead.
    """
    rows = conn.execute(
        f"SELECT {_NOTIFICATION_COLS} FROM notifications "
        "WHERE state IN ('pending', 'sent') AND next_attempt_ms <= %s "
        "ORDER BY next_attempt_ms LIMIT %s FOR UPDATE SKIP LOCKED",
        (now_ms, limit)).fetchall()
    to_push, failed = [], []
    for r in rows:
        n = Notification(*r)
        if n.attempts >= max_attempts:
            conn.execute(
                "UPDATE notifications SET state = 'failed', "
                "last_error = coalesce(last_error, 'never acknowledged') "
                "WHERE account_id = %s AND notification_id = %s",
                (n.account_id, n.notification_id))
            conn.execute(
                "INSERT INTO reconcile_findings (kind, state, conversation_id, account_id, "
                "detail, created_ms) VALUES ('notification_failed', 'open', %s, %s, "
                "jsonb_build_object('notification_id', %s::text, 'attempts', %s::int), %s)",
                (n.conversation_id, n.account_id, str(n.notification_id), n.attempts, now_ms))
            failed.append(n)
        else:
            conn.execute(
                "UPDATE notifications SET attempts = attempts + 1, next_attempt_ms = %s "
                "WHERE account_id = %s AND notification_id = %s",
                (now_ms + resend_after_ms, n.account_id, n.notification_id))
            to_push.append(attrs.evolve(n, attempts=n.attempts + 1))
    return to_push, failed


def mark_notification_sent(conn: psycopg.Connection, account_id: uuid.UUID,
                           notification_id: uuid.UUID, now_ms: int,
                           resend_at_ms: int | None = None) -> None:
    """The gateway accepted the push (which is not proof of delivery: wait for the ack).

    *resend_at_ms* restarts the acknowledgement window from now (the claim set one from the
    claim time, which a slow gateway would otherwise eat into).
    """
    conn.execute(
        "UPDATE notifications SET state = 'sent', sent_ms = %s, last_error = NULL, "
        "next_attempt_ms = coalesce(%s, next_attempt_ms) "
        "WHERE account_id = %s AND notification_id = %s AND state IN ('pending', 'sent')",
        (now_ms, resend_at_ms, account_id, notification_id))


def mark_notification_error(conn: psycopg.Connection, account_id: uuid.UUID,
                            notification_id: uuid.UUID, error: str, retry_at_ms: int) -> None:
    """The gateway refused the push; try again at *retry_at_ms*."""
    conn.execute(
        "UPDATE notifications SET last_error = %s, next_attempt_ms = %s "
        "WHERE account_id = %s AND notification_id = %s AND state IN ('pending', 'sent')",
        (error[:500], retry_at_ms, account_id, notification_id))


def ack_notification(conn: psycopg.Connection, account_id: uuid.UUID,
                     notification_id: uuid.UUID, now_ms: int) -> bool:
    """A device acknowledged; idempotent. False if the account has no such notification.

    A late ack of a notification already marked failed still counts: it was delivered.
    """
    row = conn.execute(
        "SELECT state FROM notifications WHERE account_id = %s AND notification_id = %s "
        "FOR UPDATE", (account_id, notification_id)).fetchone()
    if row is None:
        return False
    if row[0] != "acked":
        conn.execute(
            "UPDATE notifications SET state = 'acked', acked_ms = %s "
            "WHERE account_id = %s AND notification_id = %s",
            (now_ms, account_id, notification_id))
    if row[0] == "failed":
        # the finding that recorded the failure is answered: the device did get it
        conn.execute(
            "UPDATE reconcile_findings SET state = 'repaired', resolved_ms = %s "
            "WHERE kind = 'notification_failed' AND state = 'open' AND account_id = %s "
            "AND detail->>'notification_id' = %s", (now_ms, account_id, str(notification_id)))
    return True


def notification_counts(conn: psycopg.Connection) -> dict[str, int]:
    """How many notifications are in each state (all states present, zero if none)."""
    counts = dict.fromkeys(("pending", "sent", "acked", "failed"), 0)
    cur = conn.cursor(row_factory=tuple_row)
    for state, n in cur.execute("SELECT state, count(*) FROM notifications GROUP BY 1"):
        counts[state] = n
    return counts


# ---------------------------------------------------------------- outbox to legacy

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
