"""Two feed commits whose member lists and messages cross conversations never deadlock."""

from __future__ import annotations

import threading
import uuid

import psycopg

from bridge.mirror import ConversationPlan, MirrorPlan, commit_plan
from cloud.model import MirrorBatch
from cloud.store.conversations import CHANGE
from tests.cloud.store.storefixture import NOW, mirrored
from tests.dbfixture import make_account, make_conversation


def test_commits_crossing_member_lists_and_messages_wait_instead_of_deadlocking(db_dsn, conn):
    """Worker A's commit applies a member list of one conversation and writes a message to
    another; worker B's does the opposite. Both apply their list before their messages, and
    each waits at its messages for the other to get there (a barrier, given up after 3 s).
    Locked as each step came (the list's conversation, then the messages' in id order),
    they crossed: each held what the other wanted, and PostgreSQL killed one after
    deadlock_timeout. With every conversation of a commit locked in id order before any list
    is applied, B waits for A from its first lock on; A gives up the barrier and commits,
    then B: no error, no deadlock recorded."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    make_account(conn, "carol")
    low, high = sorted([make_conversation(conn, a, b, chat="chat-x"),
                        make_conversation(conn, a, b, chat="chat-y")])
    chat = dict(conn.execute("SELECT conversation_id, legacy_chat_id FROM conversations")
                .fetchall())
    (before,) = conn.execute("SELECT deadlocks FROM pg_stat_database "
                             "WHERE datname = current_database()").fetchone()

    def plan(listed: uuid.UUID, written: uuid.UUID, guid: str) -> MirrorPlan:
        lists = ((("alice", "bob", "carol"), CHANGE),)
        return MirrorPlan((ConversationPlan(chat[listed], listed, lists),), (),
                          MirrorBatch((mirrored(written, a, "alice", guid, NOW),)), (), ())

    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(p: MirrorPlan) -> None:
        def step(name: str) -> None:
            if name == "messages":
                try:
                    barrier.wait(timeout=3.0)
                except threading.BrokenBarrierError:
                    pass  # the other is waiting for a lock this one holds: go on

        try:
            with psycopg.connect(db_dsn, autocommit=True) as c, c.transaction():
                commit_plan(c, p, NOW, step=step)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(plan(high, low, "g-a"),)),
               threading.Thread(target=worker, args=(plan(low, high, "g-b"),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    conn.execute("SELECT pg_stat_clear_snapshot()")
    (after,) = conn.execute("SELECT deadlocks FROM pg_stat_database "
                            "WHERE datname = current_database()").fetchone()
    assert after == before
    assert sorted(r[0] for r in conn.execute("SELECT legacy_guid FROM messages")) == [
        "g-a", "g-b"]
    assert conn.execute("SELECT count(*) FROM members").fetchone() == (6,)
