"""The outbox to legacy against a real PostgreSQL: claims keep order and never split a
conversation.
"""

from __future__ import annotations

import psycopg

from cloud.store import messages as messages_store
from cloud.store import outbox as outbox_store
from tests.cloud.store.storefixture import NOW
from tests.dbfixture import make_account, make_conversation, tx


def test_outbox_claims_hide_rows_keep_order_and_come_due_again(conn):
    """Claimed rows are invisible until the claim runs out; order per conversation holds."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    for i in range(3):
        tx(conn, messages_store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    first = tx(conn, outbox_store.claim_outbox, NOW, 2, 1000)
    assert [(i.seq, i.body, i.member_handles) for i in first] == [
        (1, "m0", ("alice", "carol")), (2, "m1", ("alice", "carol"))]
    assert first[0].legacy_client_members == 2 and first[0].attempts == 1
    # seq 3 waits: an earlier row of its conversation is claimed (order across workers)
    assert tx(conn, outbox_store.claim_outbox, NOW + 10, 10, 1000) == []
    tx(conn, outbox_store.complete_outbox, first[0], "chat-x", "cloud:g1", NOW + 20)
    tx(conn, outbox_store.release_outbox, first[1], "supernode down", NOW + 500)
    again = tx(conn, outbox_store.claim_outbox, NOW + 600, 10, 1000)
    assert [(i.seq, i.attempts) for i in again] == [(2, 2), (3, 1)]
    assert again[0].legacy_chat_id == "chat-x"
    assert conn.execute("SELECT legacy_guid FROM messages WHERE seq = 1").fetchone() == (
        "cloud:g1",)
    # seq 2 was posted at NOW+1
    assert tx(conn, outbox_store.outbox_backlog, NOW + 1000) == (2, 999)


def test_two_workers_never_split_one_conversations_outbox(db_dsn, conn):
    """While one worker's claim is open, another gets none of that conversation's rows, not
    even rows posted after the first claim (they would overtake the first worker's)."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    for i in range(2):
        tx(conn, messages_store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    with psycopg.connect(db_dsn, autocommit=True) as worker_a, \
            psycopg.connect(db_dsn, autocommit=True) as worker_b:
        with worker_a.transaction():
            claimed = outbox_store.claim_outbox(worker_a, NOW + 10, 10, 5000)
            assert [i.seq for i in claimed] == [1, 2]
            tx(conn, messages_store.post_message, cid, a, "c2", "m2", NOW + 11)  # a later row
            assert tx(worker_b, outbox_store.claim_outbox, NOW + 12, 10, 5000) == []
        # committed: the head is claimed, so the conversation stays with worker A
        assert tx(worker_b, outbox_store.claim_outbox, NOW + 13, 10, 5000) == []
        assert [i.seq for i in tx(worker_b, outbox_store.claim_outbox, NOW + 6000, 10, 5000)] == [
            1, 2, 3]
