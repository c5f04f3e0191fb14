"""The mirror's bulk write path against a real PostgreSQL: idempotent, ordered, gapless,
probed through the unique indexes, deadlock-free.
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid

import psycopg
import pytest

from cloud.model import CLOUD_CLIENT_PHASES, FeedCheckpoint, MirrorBatch
from cloud.store import coordination as coordination_store
from cloud.store import messages as messages_store
from cloud.store import mirror as mirror_store
from cloud.store.errors import NotFound, StaleFence
from tests.cloud.store.storefixture import (
    NOW,
    mirrored,
    numbered,
    prepared_plan,
    table_rows,
)
from tests.dbfixture import make_account, make_conversation, tx


@pytest.fixture(params=["arrays", "staging"])
def mirror_path(request, monkeypatch):
    """Each batch of the test takes one path: its rows as the statement's arrays (every
    batch small) or COPY into the staging table (every batch large)."""
    monkeypatch.setattr(mirror_store, "SMALL_BATCH", 10_000 if request.param == "arrays" else 0)
    return request.param


def test_a_batch_takes_the_arrays_up_to_the_small_size_and_the_staging_table_beyond(conn):
    """Up to SMALL_BATCH rows nothing is staged; one more and the staging table has them
    (it is emptied at commit, so look inside the transaction)."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    n = mirror_store.SMALL_BATCH
    for size, staged in ((n, False), (n + 1, True)):
        with conn.transaction():
            batch = MirrorBatch(tuple(mirrored(cid, a, "alice", f"s{size}-{i}", NOW + i)
                                      for i in range(size)))
            assert len(mirror_store.write_mirrored_batch(conn, batch, NOW).inserted) == size
            (exists,) = conn.execute(
                "SELECT to_regclass('pg_temp.mirror_staging') IS NOT NULL").fetchone()
            assert exists is staged
            if staged:
                assert conn.execute("SELECT count(*) FROM mirror_staging").fetchone()[0] == size
    assert conn.execute("SELECT next_seq FROM conversations").fetchone()[0] == 2 * n + 2


def test_replaying_a_mirrored_batch_changes_nothing(conn, mirror_path):
    """The same batch twice: the second write inserts nothing and owes nothing new."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    batch = MirrorBatch(tuple(mirrored(cid, a, "alice", f"g{i}", NOW + i) for i in range(50)),
                        (FeedCheckpoint("sn-1", "e1", 50),))
    first = tx(conn, mirror_store.write_mirrored_batch, batch, NOW)
    assert len(first.inserted) == 50 and first.duplicates == 0 and first.notifications == 50
    snapshot = conn.execute("SELECT seq, message_id FROM messages ORDER BY seq").fetchall()
    again = tx(conn, mirror_store.write_mirrored_batch, batch, NOW + 5)
    assert again.inserted == () and again.duplicates == 50 and again.notifications == 0
    assert conn.execute("SELECT seq, message_id FROM messages ORDER BY seq").fetchall() \
        == snapshot
    assert table_rows(conn, "notifications") == 50
    assert [m.seq for m in first.inserted] == list(range(1, 51))


def test_duplicate_probes_use_the_unique_indexes_after_an_analyze_of_one_message_each(conn):
    """A first ANALYZE that sees one message per conversation must not make the planner
    believe conversation_id is unique in messages (migration 0005): otherwise a generic plan
    may probe duplicates through an index on conversation_id alone, reading the history."""
    a = make_account(conn, "alice")
    for i in range(60):
        cid = make_conversation(conn, a)
        tx(conn, mirror_store.write_mirrored_batch,
           MirrorBatch((mirrored(cid, a, "alice", f"one-{i}", NOW + i),), ()), NOW)
    conn.execute("ANALYZE messages")
    (n_distinct,) = conn.execute(
        "SELECT n_distinct FROM pg_stats WHERE tablename = 'messages' "
        "AND attname = 'conversation_id'").fetchone()
    assert n_distinct == -0.01  # 100 messages per conversation, not -1 (unique)
    # the history grows (300 more per conversation) before the next ANALYZE
    conn.execute(
        "INSERT INTO messages (conversation_id, seq, message_id, sender_account_id, "
        "  sender_handle, sent_ms, body, origin, legacy_guid) "
        "SELECT c.conversation_id, 1 + g, gen_random_uuid(), %s, 'alice', g, 'x', 'legacy', "
        "       'bulk-' || c.conversation_id || '-' || g "
        "FROM conversations c, generate_series(1, 300) g", (a,))
    conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        for column, value, index in (
                ("message_id", uuid.uuid4(), "messages_conversation_id_message_id_key"),
                ("legacy_guid", "g", "messages_conversation_id_legacy_guid_key")):
            conn.execute(f"PREPARE probe_{column} AS SELECT 1 FROM messages "
                         f"WHERE conversation_id = $1 AND {column} = $2")
            # EXECUTE takes no server-side parameters: bind on the client
            plan = "\n".join(r[0] for r in psycopg.ClientCursor(conn).execute(
                f"EXPLAIN EXECUTE probe_{column}(%s, %s)", (uuid.uuid4(), value)))
            assert index in plan, plan
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE ALL")


def test_a_mirrored_batch_reads_nothing_in_proportion_to_the_store(conn):
    """Every table the mirror insert reads besides the batch's staging rows (messages,
    conversations, members, accounts) is read by index probes keyed by the batch: with
    thousands of accounts and conversations, none is scanned, in a custom or a generic plan
    (as joins, the notification rule scanned every account and the seq bump every
    conversation, for each batch)."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    conn.execute(
        "WITH acc AS (INSERT INTO accounts (account_id, handle) "
        "  SELECT gen_random_uuid(), 'bulk-' || g FROM generate_series(1, 3000) g "
        "  RETURNING account_id), "
        "conv AS (INSERT INTO conversations (conversation_id) "
        "  SELECT gen_random_uuid() FROM generate_series(1, 3000) RETURNING conversation_id), "
        "pairs AS (SELECT c.conversation_id, a.account_id FROM "
        "  (SELECT conversation_id, row_number() OVER () AS n FROM conv) c JOIN "
        "  (SELECT account_id, row_number() OVER () AS n FROM acc) a USING (n)) "
        "INSERT INTO members (conversation_id, account_id) SELECT * FROM pairs")
    conn.execute(
        "INSERT INTO messages (conversation_id, seq, message_id, sender_account_id, "
        "  sender_handle, sent_ms, body, origin, legacy_guid) "
        "SELECT m.conversation_id, g, gen_random_uuid(), m.account_id, 'bulk', g, 'x', "
        "       'legacy', 'bulk-' || m.conversation_id || '-' || g "
        "FROM members m, generate_series(1, 5) g")
    conn.execute("ANALYZE")
    batch = [mirrored(cid, a, "alice", f"probe-{i}", NOW + i) for i in range(3)]
    # the rule's phases are the model's, and the partial index's (migration 0007)
    (predicate,) = conn.execute(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
        "WHERE indexrelid = 'accounts_cloud_capable'::regclass").fetchone()
    assert sorted(re.findall(r"'([^']+)'", predicate)) == sorted(CLOUD_CLIENT_PHASES)

    def probes_only(plan: str, mode: str) -> None:
        scanned = [t for t in ("messages", "conversations", "members", "accounts")
                   if f"Seq Scan on {t} " in plan]
        assert scanned == [], f"{mode}: {scanned}\n{plan}"
        # a member's phase is an index-only probe of the cloud-capable accounts (0007)
        assert "Index Only Scan using accounts_cloud_capable" in plan, plan

    for mode, statement in itertools.product(
            ("force_custom_plan", "force_generic_plan"),
            (mirror_store._MIRROR_INSERT, mirror_store._MIRROR_INSERT_NEW)):
        with conn.transaction():
            conn.execute(mirror_store._STAGING)
            for i, m in enumerate(batch):
                conn.execute(
                    "INSERT INTO mirror_staging VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (i, m.conversation_id, m.message_id, m.legacy_guid, m.sender_account_id,
                     m.sender_handle, m.sent_ms, m.body, m.origin))
            plan = prepared_plan(conn, _numbered(statement), (NOW,), mode)
            probes_only(plan, mode)
            assert "Seq Scan on mirror_staging" in plan  # the plan printed is the statement's
            raise psycopg.Rollback()  # the staged rows go
    # the small batch's statement, its rows as arrays in the statement itself
    rows = mirror_store._as_arrays(batch)
    for mode in ("force_custom_plan", "force_generic_plan"):
        plan = prepared_plan(conn, _numbered(mirror_store._MIRROR_INSERT_NEW_ROWS),
                             (NOW, *(rows[k] for k in _ARRAYS)), mode)
        probes_only(plan, mode)
        assert "Function Scan on unnest" in plan and "mirror_staging" not in plan


#: The array parameters of the small batch's statement, in their PREPARE order ($2...).
_ARRAYS = ("ord", "cid", "mid", "guid", "sender", "handle", "sent", "body", "origin")


def _numbered(sql: str) -> str:
    """A psycopg query with %(now)s and the arrays as a PREPARE body ($1, $2...)."""
    return numbered(sql, _ARRAYS, start=2).replace("%(now)s", "$1::bigint")


def test_mirrored_batch_keeps_source_order_and_drops_in_batch_duplicates(conn, mirror_path):
    """Seqs follow batch order per conversation; a GUID repeated in the batch is kept once."""
    a = make_account(conn, "alice")
    c1, c2 = make_conversation(conn, a), make_conversation(conn, a)
    msgs = [mirrored(c1, a, "alice", "x1", NOW + 9), mirrored(c2, a, "alice", "y1", NOW),
            mirrored(c1, a, "alice", "x2", NOW + 1), mirrored(c1, a, "alice", "x1", NOW + 9),
            mirrored(c2, a, "alice", "y2", NOW - 5)]
    result = tx(conn, mirror_store.write_mirrored_batch, MirrorBatch(tuple(msgs)), NOW)
    assert result.duplicates == 1
    order = {cid: [r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %s ORDER BY seq", (cid,))]
        for cid in (c1, c2)}
    assert order == {c1: ["x1", "x2"], c2: ["y1", "y2"]}


def test_a_partly_stored_batch_inserts_only_the_new_rows_after_the_stored_ones(conn, mirror_path):
    """Stored g1, g2; the batch g2, g3, g1, g4: the one-statement insert meets a stored row
    and rolls back to its savepoint, consuming no seq; the careful path inserts g3, g4 as 3
    and 4."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    tx(conn, mirror_store.write_mirrored_batch, MirrorBatch(
        (mirrored(cid, a, "alice", "g1", NOW), mirrored(cid, a, "alice", "g2", NOW + 1))), NOW)
    result = tx(conn, mirror_store.write_mirrored_batch, MirrorBatch(tuple(
        mirrored(cid, a, "alice", g, NOW + i) for i, g in enumerate(("g2", "g3", "g1", "g4")))),
        NOW)
    assert [(m.legacy_guid, m.seq) for m in result.inserted] == [("g3", 3), ("g4", 4)]
    assert result.duplicates == 2
    assert conn.execute("SELECT seq, legacy_guid FROM messages ORDER BY seq").fetchall() == [
        (1, "g1"), (2, "g2"), (3, "g3"), (4, "g4")]
    assert conn.execute("SELECT next_seq FROM conversations").fetchone()[0] == 5
    # the fall-back is taken for exactly these violations: they must name real constraints
    names = {r[0] for r in conn.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'messages'::regclass")}
    assert set(mirror_store._STORED_ALREADY) <= names


def test_mirror_writers_locking_many_conversations_in_any_order_never_deadlock(db_dsn, conn,
                                                                             mirror_path):
    """Two writers, each batch spanning 20 conversations, listed in opposite orders, new
    batches and replays (both paths): their locks never cross, so PostgreSQL records no
    deadlock (a variant locking in batch order deadlocked here)."""
    a = make_account(conn, "alice")
    cids = [make_conversation(conn, a) for _ in range(20)]
    (before,) = conn.execute("SELECT deadlocks FROM pg_stat_database "
                             "WHERE datname = current_database()").fetchone()
    errors = []

    def writer(w):
        order = cids if w == 0 else cids[::-1]
        try:
            with psycopg.connect(db_dsn, autocommit=True) as c:
                for k in range(30):
                    msgs = tuple(mirrored(cid, a, "alice", f"w{w}-{k}-{i}", NOW + i)
                                 for i, cid in enumerate(order))
                    tx(c, mirror_store.write_mirrored_batch, MirrorBatch(msgs), NOW)
                    tx(c, mirror_store.write_mirrored_batch, MirrorBatch(msgs[5:]), NOW)  # replay
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn.execute("SELECT pg_stat_clear_snapshot()")
    (after,) = conn.execute("SELECT deadlocks FROM pg_stat_database "
                            "WHERE datname = current_database()").fetchone()
    assert after == before
    assert table_rows(conn, "messages") == 2 * 30 * 20
    assert conn.execute("SELECT sum(next_seq - 1) FROM conversations").fetchone()[0] == 1200


def test_mirrored_batch_for_unknown_conversation_writes_nothing(conn, mirror_path):
    """A batch naming a conversation that does not exist fails whole, checkpoint included."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    batch = MirrorBatch((mirrored(cid, a, "alice", "g1", NOW),
                         mirrored(uuid.uuid4(), a, "alice", "g2", NOW)),
                        (FeedCheckpoint("sn-1", "e1", 2),))
    with pytest.raises(NotFound):
        tx(conn, mirror_store.write_mirrored_batch, batch, NOW)
    assert table_rows(conn, "messages") == 0 and table_rows(conn, "bridge_checkpoints") == 0


def test_stale_fence_rolls_back_the_whole_batch(conn):
    """A checkpoint under an older fence than the stored one refuses, and its data too."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    tx(conn, coordination_store.save_checkpoint, FeedCheckpoint("sn-1", "e1", 10, fence=7), NOW)
    batch = MirrorBatch((mirrored(cid, a, "alice", "g1", NOW),),
                        (FeedCheckpoint("sn-1", "e1", 11, fence=6),))
    with pytest.raises(StaleFence):
        tx(conn, mirror_store.write_mirrored_batch, batch, NOW)
    assert table_rows(conn, "messages") == 0
    assert (tx(conn, coordination_store.load_checkpoints)["sn-1"]
            == FeedCheckpoint("sn-1", "e1", 10, 7))


def test_notifications_are_owed_to_cloud_capable_members_but_not_the_sender(conn):
    """Members in phase legacy have no cloud devices, and nobody is notified of their own."""
    a = make_account(conn, "alice", "dual")
    b = make_account(conn, "bob", "legacy")
    c = make_account(conn, "carol", "cloud-only")
    cid = make_conversation(conn, a, b, c)
    tx(conn, mirror_store.write_mirrored_batch, MirrorBatch((mirrored(cid, a, "alice", "g", NOW),)),
       NOW)
    owed = [r[0] for r in conn.execute("SELECT account_id FROM notifications")]
    assert owed == [c]


def test_concurrent_writers_keep_seq_gapless(db_dsn, conn):
    """Four writers (mirror batches and API posts) on one conversation: seq is 1..N, no gap."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    errors = []

    def mirror_writer(w):
        try:
            with psycopg.connect(db_dsn, autocommit=True) as c:
                for k in range(10):
                    msgs = tuple(mirrored(cid, a, "alice", f"w{w}-{k}-{i}", NOW + i)
                                 for i in range(5))
                    # every other batch repeats the previous one: replays race with writes
                    tx(c, mirror_store.write_mirrored_batch, MirrorBatch(msgs), NOW)
                    tx(c, mirror_store.write_mirrored_batch, MirrorBatch(msgs[:3]), NOW)
        except Exception as e:
            errors.append(e)

    def api_writer(w):
        try:
            with psycopg.connect(db_dsn, autocommit=True) as c:
                for k in range(25):
                    tx(c, messages_store.post_message, cid, b, f"c{w}-{k}", "hello", NOW)
                    tx(c, messages_store.post_message, cid, b, f"c{w}-{k}", "hello", NOW)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=mirror_writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=api_writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    seqs = [r[0] for r in conn.execute(
        "SELECT seq FROM messages WHERE conversation_id = %s ORDER BY seq", (cid,))]
    assert seqs == list(range(1, 2 * 50 + 2 * 25 + 1))
    assert conn.execute("SELECT next_seq FROM conversations").fetchone()[0] == len(seqs) + 1
