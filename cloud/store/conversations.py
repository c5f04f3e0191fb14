"""Conversations, their members, and the map of legacy chat ids to conversations.

Membership moves between the stacks as changes, never as a union of lists (issue 16):

- a change made on the cloud (``add_member``, ``remove_member``) is queued for legacy as an
  ``outbox_to_legacy`` row of kind ``members``, in order with the conversation's messages;
- a legacy chat's new member list (a feed's FeedChat) is applied as its difference from the
  list the bridge saw before, ``conversations.legacy_members`` (``apply_legacy_member_lists``),
  and queues nothing back; but a member removed on the cloud (``conversations.cloud_removed``)
  is added back only on the cloud: a legacy list that names one again (a client's stale
  list, sent to a home supernode that forgot the removal in a crash) gets the removal queued
  for legacy once more instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import attrs
import psycopg

from cloud.model import LEGACY_CLIENT_PHASES, MAX_MEMBERS
from cloud.store.errors import Conflict, NotFound, NotMember, TooManyMembers
from cloud.store.outbox import MEMBERS, OUTBOX_CHANNEL

#: How a legacy member list is applied (``apply_legacy_member_lists``):
#: a legacy client changed it (mirror the difference from the list seen before);
CHANGE = "change"
#: the bridge's own change came back (remember it, change nothing: no loops);
ECHO = "echo"
#: a list read at some moment (a repair): only a chat with no list seen yet takes it.
SNAPSHOT = "snapshot"


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
    """The account's conversations with their members, the members' handles (account id ->
    handle, what a client shows and what the member routes take; null for a member with no
    account row) and last seq (for sync)."""
    rows = conn.execute(
        "SELECT c.conversation_id, c.title, c.next_seq - 1, "
        "       array(SELECT m2.account_id FROM members m2 "
        "             WHERE m2.conversation_id = c.conversation_id ORDER BY m2.account_id), "
        "       array(SELECT a.handle FROM members m2 LEFT JOIN accounts a USING (account_id) "
        "             WHERE m2.conversation_id = c.conversation_id ORDER BY m2.account_id) "
        "FROM members m JOIN conversations c USING (conversation_id) "
        "WHERE m.account_id = %s ORDER BY c.conversation_id", (account_id,)).fetchall()
    return [{"conversation_id": str(cid), "title": title, "last_seq": last,
             "members": [str(a) for a in members],
             "handles": {str(a): h for a, h in zip(members, handles, strict=True)}}
            for cid, title, last, members, handles in rows]


def legacy_chats(conn: psycopg.Connection) -> dict[str, uuid.UUID]:
    """Every conversation that has a legacy chat id: chat id -> conversation id."""
    return dict(conn.execute(
        "SELECT legacy_chat_id, conversation_id FROM conversation_legacy_ids").fetchall())


def account_legacy_chats(conn: psycopg.Connection,
                         account_id: uuid.UUID) -> dict[str, uuid.UUID]:
    """The conversations with a legacy chat the account is a member of on the cloud:
    chat id -> conversation id."""
    return dict(conn.execute(
        "SELECT c.legacy_chat_id, c.conversation_id FROM members m "
        "JOIN conversations c USING (conversation_id) "
        "WHERE m.account_id = %s AND c.legacy_chat_id IS NOT NULL", (account_id,)).fetchall())


def find_legacy_chat(conn: psycopg.Connection, ref: str) -> tuple[str, uuid.UUID] | None:
    """The conversation *ref* names, by conversation id (a UUID) or by its legacy chat id,
    as (legacy chat id, conversation id); None when no conversation with a legacy chat has
    that id."""
    try:
        row = conn.execute(
            "SELECT legacy_chat_id, conversation_id FROM conversations "
            "WHERE conversation_id = %s AND legacy_chat_id IS NOT NULL",
            (uuid.UUID(ref),)).fetchone()
    except ValueError:  # not a UUID: a legacy chat id
        row = None
    if row is None:
        row = conn.execute("SELECT legacy_chat_id, conversation_id FROM conversation_legacy_ids "
                           "WHERE legacy_chat_id = %s", (ref,)).fetchone()
    return None if row is None else (row[0], row[1])


def member_handles(conn: psycopg.Connection,
                   conversation_id: uuid.UUID) -> tuple[tuple[str, ...], int]:
    """Members' legacy-side handles (sorted) and how many still have legacy clients."""
    rows = conn.execute(
        "SELECT coalesce(a.legacy_handle, a.handle), a.phase = ANY(%s) FROM members m "
        "JOIN accounts a USING (account_id) WHERE m.conversation_id = %s ORDER BY 1",
        (list(LEGACY_CLIENT_PHASES), conversation_id)).fetchall()
    return tuple(h for h, _ in rows), sum(1 for _, legacy in rows if legacy)


# ---------------------------------------------------------------- legacy lists as changes

@attrs.frozen
class MemberListsApplied:
    """What ``apply_legacy_member_lists`` did."""

    #: conversation id -> why it got no adds (they would pass ``MAX_MEMBERS``)
    refused: Mapping[uuid.UUID, str]
    #: memberships added and removed
    added: int = 0
    removed: int = 0


def apply_legacy_member_lists(
        conn: psycopg.Connection,
        lists: Mapping[uuid.UUID, Sequence[tuple[Sequence[str], str]]],
        now_ms: int, *, lock_also: Iterable[uuid.UUID] = ()) -> MemberListsApplied:
    """Mirror legacy chats' member lists as changes: conversation id -> the lists its chat
    announced, in feed order, each with how to apply it (``CHANGE``, ``ECHO``,
    ``SNAPSHOT``). The conversations must exist and every handle named have an account.

    Each ``CHANGE`` removes the members its list dropped and adds the ones it gained, against
    the list before it (``conversations.legacy_members``, durable, so a restart between two
    lists still sees the right difference); the first list a chat ever shows only adds. A
    member a change does not name is left alone: one added or removed on the cloud since
    stays so. The conversations whose adds would pass ``MAX_MEMBERS`` get no adds and are
    returned with why, in ``refused`` (their removals and list still apply). Nothing is
    queued for legacy, but for an add of a member removed on the cloud: not made, its
    removal is queued again.
    """
    if not lists:
        return MemberListsApplied({})
    cids = sorted(lists)
    # The lists' conversations and *lock_also* (the rest its transaction writes: the feed
    # batch's messages) are locked first, together, in id order, as every writer of several
    # locks them: a list applied before the batch locked its own conversations in id order
    # could cross another worker's transaction doing the same (a deadlock, which PostgreSQL
    # broke after deadlock_timeout by killing one).
    rows = [r for r in conn.execute(
        "SELECT conversation_id, legacy_members, cloud_removed FROM conversations "
        "WHERE conversation_id = ANY(%s) ORDER BY conversation_id FOR NO KEY UPDATE",
        (sorted({*cids, *lock_also}),)).fetchall() if r[0] in lists]
    before = {cid: seen for cid, seen, _ in rows}
    banned = {cid: set(removed) for cid, _, removed in rows}
    adds: list[tuple[uuid.UUID, str]] = []
    removes: list[tuple[uuid.UUID, str]] = []
    latest: list[tuple[uuid.UUID, list[str]]] = []
    seeded: list[tuple[uuid.UUID, list[str]]] = []  # lists only a SNAPSHOT gave
    again: list[tuple[uuid.UUID, str]] = []
    for cid in cids:
        seen = before.get(cid)
        known: tuple[str, ...] | None = None if seen is None else tuple(seen)
        net: dict[str, bool] = {}  # handle -> added (True) or removed (False): last one wins
        for members, how in lists[cid]:
            members = tuple(members)
            if how == SNAPSHOT:
                if known is None:
                    net.update(dict.fromkeys(members, True))
                    known = members
                continue
            if how == CHANGE:
                old, new = set(known or ()), set(members)
                net.update({h: True for h in members if h not in old})
                net.update({h: False for h in (known or ()) if h not in new})
            elif how != ECHO:
                raise ValueError(f"unknown way to apply a member list: {how!r}")
            known = members
        adds += [(cid, h) for h, added in net.items()
                 if added and h not in banned.get(cid, ())]
        again += [(cid, h) for h, added in net.items() if added and h in banned.get(cid, ())]
        removes += [(cid, h) for h, added in net.items() if not added]
        if known is not None and (seen is None or tuple(seen) != known):
            only_seeded = all(how == SNAPSHOT for _, how in lists[cid])
            (seeded if only_seeded else latest).append((cid, list(known)))
    removed = added = 0
    if removes:
        removed = conn.execute(
            "DELETE FROM members m USING unnest(%s::uuid[], %s::text[]) AS r(c, h) "
            "JOIN account_handles ah ON ah.handle = r.h "
            "WHERE m.conversation_id = r.c AND m.account_id = ah.account_id",
            ([c for c, _ in removes], [h for _, h in removes])).rowcount
    refused: dict[uuid.UUID, str] = {}
    if adds:
        found = dict(conn.execute("SELECT handle, account_id FROM account_handles "
                                  "WHERE handle = ANY(%s)",
                                  (sorted({h for _, h in adds}),)).fetchall())
        missing = sorted({h for _, h in adds} - set(found))
        if missing:
            raise NotFound(f"no account for legacy handle {missing[0]!r}")
        pairs = sorted({(c, found[h]) for c, h in adds})
        too_big = _over_member_limit(conn, pairs)
        keep = [(c, a) for c, a in pairs if c not in too_big]
        added = conn.execute(
            "INSERT INTO members (conversation_id, account_id) "
            "SELECT * FROM unnest(%s::uuid[], %s::uuid[]) ON CONFLICT DO NOTHING",
            ([c for c, _a in keep], [a for _c, a in keep])).rowcount
        refused = {c: _too_many_members(total) for c, total in too_big.items()}
    if latest:
        conn.cursor().executemany(
            "UPDATE conversations SET legacy_members = %s WHERE conversation_id = %s",
            [(members, cid) for cid, members in latest])
    if seeded:
        # A repair's list read earlier must not overwrite one a follower committed meanwhile.
        conn.cursor().executemany(
            "UPDATE conversations SET legacy_members = %s "
            "WHERE conversation_id = %s AND legacy_members IS NULL",
            [(members, cid) for cid, members in seeded])
    for cid, handle in again:
        queue_membership_change(conn, cid, (), (handle,), now_ms)
    return MemberListsApplied(refused, added, removed)


def legacy_members(conn: psycopg.Connection,
                   conversation_id: uuid.UUID) -> tuple[str, ...] | None:
    """The legacy chat's member list as the bridge last saw it (None: never seen)."""
    row = conn.execute("SELECT legacy_members FROM conversations WHERE conversation_id = %s",
                       (conversation_id,)).fetchone()
    return None if row is None or row[0] is None else tuple(row[0])


# ---------------------------------------------------------------- cloud changes

def _accounts_by_handle(conn: psycopg.Connection, handles: Sequence[str]) -> dict[str, uuid.UUID]:
    """handle -> account id for every one of *handles*; ``NotFound`` naming the first
    unknown one."""
    found = dict(conn.execute("SELECT handle, account_id FROM account_handles "
                              "WHERE handle = ANY(%s)", (list(handles),)).fetchall())
    for handle in handles:
        if handle not in found:
            raise NotFound(f"no account with handle {handle!r}")
    return found


def create_conversation_with(conn: psycopg.Connection, conversation_id: uuid.UUID,
                             creator: uuid.UUID, handles: Sequence[str],
                             title: str = "") -> tuple[uuid.UUID, ...]:
    """A cloud client's new conversation: the creator and the accounts *handles* name.

    Returns the members (sorted). ``NotFound`` for an unknown handle, ``ValueError`` for
    fewer than 2 distinct members, ``TooManyMembers`` past ``MAX_MEMBERS``; nothing is
    written then. Nothing is queued for legacy: the chat is made there by the first
    message injected, with that message's members.
    """
    members = {creator, *_accounts_by_handle(conn, handles).values()}
    if len(members) < 2:
        raise ValueError("a conversation needs 2 or more distinct members")
    if len(members) > MAX_MEMBERS:
        raise TooManyMembers(_too_many_members(len(members)))
    create_conversation(conn, conversation_id, sorted(members), title=title)
    return tuple(sorted(members))


def _lock_for_change(conn: psycopg.Connection, conversation_id: uuid.UUID,
                     actor: uuid.UUID) -> None:
    """Check *actor* is a member, then lock the conversation as a message post does (so a
    change and the posts around it take turns and are queued in that order)."""
    check_member(conn, conversation_id, actor)
    conn.execute("SELECT 1 FROM conversations WHERE conversation_id = %s FOR NO KEY UPDATE",
                 (conversation_id,))


def _legacy_handle(conn: psycopg.Connection, account_id: uuid.UUID) -> str:
    return conn.execute("SELECT coalesce(legacy_handle, handle) FROM accounts "
                        "WHERE account_id = %s", (account_id,)).fetchone()[0]


def queue_membership_change(conn: psycopg.Connection, conversation_id: uuid.UUID,
                            add: Sequence[str], remove: Sequence[str], now_ms: int) -> bool:
    """Queue a membership change (legacy-side handles) for legacy, after the conversation's
    last message; only when a member, or one it removes, still has legacy clients. Locks
    the conversation as a post does, so it takes its place among the posts. True if queued.
    """
    next_seq = conn.execute("SELECT next_seq FROM conversations WHERE conversation_id = %s "
                            "FOR NO KEY UPDATE", (conversation_id,)).fetchone()[0]
    legacy = conn.execute(
        "SELECT 1 FROM accounts a WHERE a.phase = ANY(%s) AND ("
        "  a.account_id IN (SELECT account_id FROM members WHERE conversation_id = %s) "
        "  OR a.account_id IN (SELECT account_id FROM account_handles "
        "                      WHERE handle = ANY(%s))) "
        "LIMIT 1", (list(LEGACY_CLIENT_PHASES), conversation_id, list(remove))).fetchone()
    if legacy is None:
        return False
    conn.execute(
        "INSERT INTO outbox_to_legacy (conversation_id, seq, sub, kind, message_id, "
        "  created_ms, add_handles, remove_handles) "
        "SELECT %(cid)s, %(seq)s, coalesce(max(sub), 0) + 1, %(kind)s, NULL, %(now)s, "
        "  %(add)s, %(remove)s "
        "FROM outbox_to_legacy WHERE conversation_id = %(cid)s AND seq = %(seq)s",
        {"cid": conversation_id, "seq": next_seq - 1, "kind": MEMBERS, "now": now_ms,
         "add": list(add), "remove": list(remove)})
    conn.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, str(conversation_id)))
    return True


def add_member(conn: psycopg.Connection, conversation_id: uuid.UUID, actor: uuid.UUID,
               handle: str, now_ms: int) -> bool:
    """A member (*actor*) adds the account *handle* names; False if it was a member
    already (nothing changes). Queued for legacy in order with the messages.

    ``NotFound`` (unknown conversation or handle), ``NotMember`` (the actor is not one),
    ``TooManyMembers``: nothing written."""
    _lock_for_change(conn, conversation_id, actor)
    account_id = _accounts_by_handle(conn, [handle])[handle]
    if not add_members(conn, conversation_id, [account_id]):
        return False
    legacy_handle = _legacy_handle(conn, account_id)
    conn.execute("UPDATE conversations SET cloud_removed = array_remove(cloud_removed, %s) "
                 "WHERE conversation_id = %s", (legacy_handle, conversation_id))
    queue_membership_change(conn, conversation_id, (legacy_handle,), (), now_ms)
    return True


def remove_member(conn: psycopg.Connection, conversation_id: uuid.UUID, actor: uuid.UUID,
                  handle: str, now_ms: int) -> None:
    """A member (*actor*, possibly leaving) removes the account *handle* names. Queued for
    legacy in order with the messages; messages posted after it are not delivered to it on
    either stack.

    ``NotFound`` (unknown conversation or handle, or not a member), ``NotMember`` (the
    actor is not one): nothing written."""
    _lock_for_change(conn, conversation_id, actor)
    account_id = _accounts_by_handle(conn, [handle])[handle]
    gone = conn.execute("DELETE FROM members WHERE conversation_id = %s AND account_id = %s",
                        (conversation_id, account_id)).rowcount
    if not gone:
        raise NotFound(f"{handle!r} is not a member of this conversation")
    legacy_handle = _legacy_handle(conn, account_id)
    conn.execute("UPDATE conversations SET cloud_removed = "
                 "array_append(array_remove(cloud_removed, %s), %s) "
                 "WHERE conversation_id = %s", (legacy_handle, legacy_handle, conversation_id))
    queue_membership_change(conn, conversation_id, (), (legacy_handle,), now_ms)
