"""Conversations, their members, and the map of legacy chat ids to conversations."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import psycopg

from cloud.model import LEGACY_CLIENT_PHASES, MAX_MEMBERS
from cloud.store.errors import Conflict, NotFound, NotMember, TooManyMembers


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
