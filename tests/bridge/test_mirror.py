"""legacy -> cloud, the write path: translate, then one transaction (bridge/mirror.py)."""

from __future__ import annotations

import uuid

import pytest

from bridge import ids
from bridge.mirror import KnownIds, LegacyChanges, mirror_changes, translate
from cloud.model import MAX_MEMBERS
from cloud.store.conversations import CHANGE
from legacy import wire


def changed(*members: str) -> tuple:
    """A chat's member lists as one legacy client's change."""
    return ((members, CHANGE),)


def test_a_body_the_store_can_not_hold_is_set_aside_not_retried_forever(conn):
    """A message with NUL in its body (older supernodes let it through) becomes a
    mirror_refused finding; the rest of the batch is written."""
    def msg(guid: str, body: str) -> wire.ChatMessage:
        return wire.ChatMessage(chat_id="c1", guid=guid, legacy_seq=1, sender="alice",
                                ts_ms=1_700_000_000_000, body=body, origin="legacy")

    with conn.transaction():
        result = mirror_changes(conn, LegacyChanges({"c1": changed("alice", "bob")},
                                                    [msg("g1", "fine"), msg("g2", "bad\x00")]),
                                1).result
    assert [m.legacy_guid for m in result.inserted] == ["g1"]
    assert conn.execute("SELECT kind, detail->>'guid' FROM reconcile_findings").fetchall() == [
        ("mirror_refused", "g2")]


def test_a_chat_over_the_member_limit_is_set_aside_and_the_batch_goes_on(conn):
    """A legacy chat whose member list adds more than MAX_MEMBERS becomes a mirror_refused
    finding; the other chats of the batch and their messages are
    written."""

    crowd = tuple(f"u{i:03d}" for i in range(MAX_MEMBERS + 1))
    msg = wire.ChatMessage(chat_id="small", guid="g1", legacy_seq=1, sender="u000",
                           ts_ms=1_700_000_000_000, body="hello", origin="legacy")
    with conn.transaction():
        outcome = mirror_changes(
            conn, LegacyChanges({"small": changed(*crowd[:2]), "crowd": changed(*crowd)}, [msg]), 1)
    result, ensured = outcome.result, outcome.chats
    assert [m.legacy_guid for m in result.inserted] == ["g1"]
    assert set(ensured) == {"small"}  # the refused chat is tried again next time
    assert conn.execute("SELECT kind, detail->>'chat_id' FROM reconcile_findings"
                        ).fetchall() == [("mirror_refused", "crowd")]


def test_translate_needs_no_database_and_passes_every_member_list_to_the_commit():
    """translate is pure: cloud ids from the known accounts; every chat's lists go to the
    commit (only the store knows the list before them); a chat first seen through a message
    is created with its sender only and not taught to KnownIds."""
    alice, bob = uuid.uuid4(), uuid.uuid4()
    known = KnownIds({"alice": alice, "bob": bob}, {"old": ("alice", "bob")})

    def msg(chat_id: str, guid: str) -> wire.ChatMessage:
        return wire.ChatMessage(chat_id=chat_id, guid=guid, legacy_seq=1, sender="alice",
                                ts_ms=1_700_000_000_000, body="hi", origin="legacy")

    changes = LegacyChanges({"c1": changed("alice", "bob"), "old": changed("alice", "bob")},
                            [msg("c1", "g1"), msg("c2", "g2"), msg("old", "g3")])
    plan = translate(changes, known)
    assert [(c.chat_id, c.lists, c.member_ids, c.complete) for c in plan.conversations] == [
        ("c1", changed("alice", "bob"), (), True), ("old", changed("alice", "bob"), (), True),
        ("c2", (), (alice,), False)]
    assert [(m.conversation_id, m.message_id, m.sender_account_id)
            for m in plan.batch.messages] == [
        (ids.conversation_id("c1"), ids.message_id("g1"), alice),
        (ids.conversation_id("c2"), ids.message_id("g2"), alice),
        (ids.conversation_id("old"), ids.message_id("g3"), alice)]
    assert translate(changes, known) == plan  # same input, same plan


def test_translate_refuses_changes_whose_accounts_were_not_ensured():
    """Every handle must have its account first: translate says which are missing."""
    changes = LegacyChanges({"c1": changed("alice", "carol")})
    with pytest.raises(ValueError, match="carol"):
        translate(changes, KnownIds({"alice": uuid.uuid4()}))
