"""Conversations and members against a real PostgreSQL: legacy chats in bulk, the member limit."""

from __future__ import annotations

import uuid

import pytest

from cloud.store import conversations as conversations_store
from cloud.store.errors import Conflict, NotFound, TooManyMembers
from tests.dbfixture import make_account, make_conversation, tx


def test_ensure_legacy_conversations_creates_maps_and_adds_members_idempotently(conn):
    """Many chats in one call: created with their legacy ids and members; a second call
    with more members adds only those; a chat over MAX_MEMBERS is refused (nothing added to
    it) while the others go ahead; a chat id mapped elsewhere or an unknown member rolls
    the whole call back."""
    from cloud.model import MAX_MEMBERS

    people = [make_account(conn, f"p{i:03d}", "legacy") for i in range(MAX_MEMBERS + 1)]
    c1, c2, big = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    refused = tx(conn, conversations_store.ensure_legacy_conversations, {
        "chat-1": (c1, people[:2]), "chat-2": (c2, people[2:3])})
    assert refused == {}
    members = "SELECT count(*) FROM members WHERE conversation_id = %s"
    assert [conn.execute(members, (c,)).fetchone()[0] for c in (c1, c2)] == [2, 1]
    assert dict(conn.execute("SELECT legacy_chat_id, conversation_id "
                             "FROM conversation_legacy_ids").fetchall()) == {
        "chat-1": c1, "chat-2": c2}
    refused = tx(conn, conversations_store.ensure_legacy_conversations, {
        "chat-1": (c1, people[:3]), "chat-big": (big, people)})
    assert list(refused) == ["chat-big"] and f"at most {MAX_MEMBERS}" in refused["chat-big"]
    assert conn.execute(members, (c1,)).fetchone()[0] == 3
    assert conn.execute(members, (big,)).fetchone()[0] == 0  # exists, nobody added
    before = conn.execute("SELECT count(*) FROM members").fetchone()[0]
    with pytest.raises(Conflict):
        tx(conn, conversations_store.ensure_legacy_conversations, {
            "chat-3": (uuid.uuid4(), people[:1]), "chat-1": (uuid.uuid4(), people[:1])})
    with pytest.raises(NotFound):
        tx(conn, conversations_store.ensure_legacy_conversations,
           {"chat-4": (uuid.uuid4(), [uuid.uuid4()])})
    assert conn.execute("SELECT count(*) FROM members").fetchone()[0] == before
    assert conn.execute("SELECT count(*) FROM conversation_legacy_ids").fetchone()[0] == 3


def test_add_members_stops_at_max_members_and_adds_nothing_past_it(conn):
    """A conversation fills up to MAX_MEMBERS; adding anyone else raises TooManyMembers and
    adds no one of that call, while re-adding members it already has is fine."""
    from cloud.model import MAX_MEMBERS

    people = [make_account(conn, f"m{i:03d}", "legacy") for i in range(MAX_MEMBERS + 2)]
    cid = make_conversation(conn, *people[:2])
    assert tx(conn, conversations_store.add_members, cid, people[:MAX_MEMBERS]) == MAX_MEMBERS - 2
    # all there already
    assert tx(conn, conversations_store.add_members, cid, people[:MAX_MEMBERS]) == 0
    with pytest.raises(TooManyMembers, match=f"at most {MAX_MEMBERS} members; this one "
                                                   f"would have {MAX_MEMBERS + 2}"):
        tx(conn, conversations_store.add_members, cid, people[MAX_MEMBERS - 1:])
    assert conn.execute("SELECT count(*) FROM members WHERE conversation_id = %s",
                        (cid,)).fetchone()[0] == MAX_MEMBERS


def test_ensure_legacy_conversations_counts_the_members_already_there(conn):
    """The limit counts existing members: a conversation one short of MAX_MEMBERS takes one
    more new member but not two; a refused chat's conversation still exists."""
    from cloud.model import MAX_MEMBERS

    people = [make_account(conn, f"q{i:03d}", "legacy") for i in range(MAX_MEMBERS + 1)]
    full, other = uuid.uuid4(), uuid.uuid4()
    tx(conn, conversations_store.ensure_legacy_conversations, {
        "almost": (full, people[:MAX_MEMBERS - 1]), "other": (other, people[:1])})
    refused = tx(conn, conversations_store.ensure_legacy_conversations, {
        "almost": (full, people[:MAX_MEMBERS + 1])})  # two new: one too many
    assert f"would have {MAX_MEMBERS + 1}" in refused["almost"]
    assert tx(conn, conversations_store.ensure_legacy_conversations, {
        "almost": (full, people[:MAX_MEMBERS])}) == {}  # one new: fits
    assert conn.execute("SELECT count(*) FROM members WHERE conversation_id = %s",
                        (full,)).fetchone()[0] == MAX_MEMBERS
    refused = tx(conn, conversations_store.ensure_legacy_conversations, {
        "refused-new": (uuid.uuid4(), people)})
    assert list(refused) == ["refused-new"]
    assert conn.execute("SELECT count(*) FROM conversations WHERE legacy_chat_id = "
                        "'refused-new'").fetchone()[0] == 1
