"""The cloud store against a real PostgreSQL: migrations, the write paths, digests."""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from pathlib import Path

import psycopg
import pytest

from cloud import schema, store
from cloud.model import Account, FeedCheckpoint, MirrorBatch, MirroredMessage, Presence
from tests.dbfixture import make_account, make_conversation, tx

VECTORS = json.loads((Path(__file__).parents[2] / "docs" / "digest-vectors.json").read_text())
NOW = 1_700_000_000_000


def mirrored(cid, sender, handle, guid, ts, body="hi") -> MirroredMessage:
    return MirroredMessage(cid, uuid.uuid5(uuid.NAMESPACE_URL, guid), guid, sender, handle,
                           ts, body)


def table_rows(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ---------------------------------------------------------------- migrations

def test_upgrade_from_empty_applies_every_version_then_nothing(empty_dsn):
    """Upgrading an empty database applies all shipped versions once; a rerun applies none."""
    shipped = [m.version for m in schema.shipped_migrations()]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert schema.status(conn).pending == tuple(
            (m.version, m.name) for m in schema.shipped_migrations())
        assert schema.upgrade(conn) == shipped
        assert schema.upgrade(conn) == []
        st = schema.status(conn)
        assert st.pending == () and [v for v, _ in st.applied] == shipped
        assert conn.execute("SELECT to_regclass('messages')").fetchone()[0] == "messages"


def test_concurrent_upgrades_apply_each_version_exactly_once(empty_dsn):
    """Two processes upgrading at once: the advisory lock makes one apply, the other wait."""
    results, errors = [], []

    def run():
        try:
            with psycopg.connect(empty_dsn, autocommit=True) as conn:
                results.append(schema.upgrade(conn))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    shipped = [m.version for m in schema.shipped_migrations()]
    assert sorted(results, key=len) == [[], [], shipped]
    with psycopg.connect(empty_dsn) as conn:
        assert table_rows(conn, "schema_migrations") == len(shipped)


def test_an_edited_applied_migration_is_refused(empty_dsn):
    """A migration changed after it was applied is reported, not silently skipped."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        schema.upgrade(conn)
        conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(schema.MigrationError, match="changed after it was applied"):
            schema.upgrade(conn)
        with pytest.raises(schema.MigrationError):
            schema.status(conn)


def test_every_unique_constraint_on_growing_tables_has_the_distribution_key(conn):
    """Citus-readiness: unique keys of message/account tables include their shard key."""
    keys = {"messages": "conversation_id", "members": "conversation_id",
            "outbox_to_legacy": "conversation_id", "notifications": "account_id",
            "presence": "account_id", "accounts": "account_id",
            "conversations": "conversation_id", "account_handles": "handle",
            "conversation_legacy_ids": "legacy_chat_id"}
    rows = conn.execute(
        "SELECT t.relname, array(SELECT a.attname FROM unnest(i.indkey) k "
        "  JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k) "
        "FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
        "WHERE i.indisunique AND t.relname = ANY(%s)", (list(keys),)).fetchall()
    assert {r[0] for r in rows} == set(keys)
    for table, columns in rows:
        assert keys[table] in columns, (table, columns)


# ---------------------------------------------------------------- digests

def test_sql_digest_matches_the_shared_vectors(conn):
    """The SQL message hash, bucket and range digests reproduce docs/digest-vectors.json."""
    senders = {}
    for m in VECTORS["messages"]:
        if m["sender"] not in senders:
            senders[m["sender"]] = make_account(conn, m["sender"])
    cid = make_conversation(conn, *senders.values(), chat=VECTORS["chat_id"])
    batch = MirrorBatch(tuple(
        mirrored(cid, senders[m["sender"]], m["sender"], m["guid"], m["ts_ms"], m["body"])
        for m in VECTORS["messages"]))
    tx(conn, store.write_mirrored_batch, batch, NOW)
    for m in VECTORS["messages"]:
        h, b = conn.execute(
            "SELECT digest_hash, digest_bucket FROM messages WHERE legacy_guid = %s",
            (m["guid"],)).fetchone()
        assert h % (1 << 64) == int(m["message_hash"]) and b == m["bucket"]
    assert VECTORS["range_digests"]
    for r in VECTORS["range_digests"]:
        got = tx(conn, store.range_digest, cid, r["start_ms"], r["end_ms"],
                 r["prefix_bits"], r["prefix"])
        assert (got.count, got.total) == (r["count"], int(r["total"])), r


def test_split_digests_add_up_to_the_parent(conn):
    """Children of a range split by bucket bits sum (count and mod 2**64) to the parent."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    batch = MirrorBatch(tuple(mirrored(cid, a, "alice", f"g{i}", NOW + i, f"b{i}")
                              for i in range(200)))
    tx(conn, store.write_mirrored_batch, batch, NOW)
    parent = tx(conn, store.range_digest, cid, NOW, NOW + 200)
    children = tx(conn, store.range_digests, cid, NOW, NOW + 200, 0, 0, 4)
    assert parent.count == 200 and len(children) == 16
    assert sum(c.count for c in children) == 200
    assert sum(c.total for c in children) % (1 << 64) == parent.total
    grand = tx(conn, store.range_digests, cid, NOW, NOW + 200, 4, 5, 2)
    assert sum(c.count for c in grand) == children[5].count


# ---------------------------------------------------------------- mirrored write path

def test_replaying_a_mirrored_batch_changes_nothing(conn):
    """The same batch twice: the second write inserts nothing and owes nothing new."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    batch = MirrorBatch(tuple(mirrored(cid, a, "alice", f"g{i}", NOW + i) for i in range(50)),
                        (FeedCheckpoint("sn-1", "e1", 50),))
    first = tx(conn, store.write_mirrored_batch, batch, NOW)
    assert len(first.inserted) == 50 and first.duplicates == 0 and first.notifications == 50
    snapshot = conn.execute("SELECT seq, message_id FROM messages ORDER BY seq").fetchall()
    again = tx(conn, store.write_mirrored_batch, batch, NOW + 5)
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
        tx(conn, store.write_mirrored_batch,
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
    assert sorted(re.findall(r"'([^']+)'", predicate)) == sorted(store.CLOUD_CLIENT_PHASES)
    for mode, statement in itertools.product(
            ("force_custom_plan", "force_generic_plan"),
            (store._MIRROR_INSERT, store._MIRROR_INSERT_NEW)):
        with conn.transaction():
            conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
            conn.execute(store._STAGING)
            for i, m in enumerate(batch):
                conn.execute(
                    "INSERT INTO mirror_staging VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (i, m.conversation_id, m.message_id, m.legacy_guid, m.sender_account_id,
                     m.sender_handle, m.sent_ms, m.body, m.origin))
            conn.execute(f"PREPARE mirror_insert AS {_numbered(statement)}")
            try:
                plan = "\n".join(r[0] for r in psycopg.ClientCursor(conn).execute(
                    "EXPLAIN EXECUTE mirror_insert(%s)", (NOW,)))
            finally:
                conn.execute("DEALLOCATE mirror_insert")
            scanned = [t for t in ("messages", "conversations", "members", "accounts")
                       if f"Seq Scan on {t} " in plan]
            assert scanned == [], f"{mode}: {scanned}\n{plan}"
            assert "Seq Scan on mirror_staging" in plan  # the plan printed is the statement's
            # a member's phase is an index-only probe of the cloud-capable accounts (0007)
            assert "Index Only Scan using accounts_cloud_capable" in plan, plan
            raise psycopg.Rollback()  # the staged rows go


def _numbered(sql: str) -> str:
    """A psycopg query with %(now)s as a PREPARE body ($1)."""
    return sql.replace("%(now)s", "$1::bigint")


def test_mirrored_batch_keeps_source_order_and_drops_in_batch_duplicates(conn):
    """Seqs follow batch order per conversation; a GUID repeated in the batch is kept once."""
    a = make_account(conn, "alice")
    c1, c2 = make_conversation(conn, a), make_conversation(conn, a)
    msgs = [mirrored(c1, a, "alice", "x1", NOW + 9), mirrored(c2, a, "alice", "y1", NOW),
            mirrored(c1, a, "alice", "x2", NOW + 1), mirrored(c1, a, "alice", "x1", NOW + 9),
            mirrored(c2, a, "alice", "y2", NOW - 5)]
    result = tx(conn, store.write_mirrored_batch, MirrorBatch(tuple(msgs)), NOW)
    assert result.duplicates == 1
    order = {cid: [r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %s ORDER BY seq", (cid,))]
        for cid in (c1, c2)}
    assert order == {c1: ["x1", "x2"], c2: ["y1", "y2"]}


def test_a_partly_stored_batch_inserts_only_the_new_rows_after_the_stored_ones(conn):
    """Stored g1, g2; the batch g2, g3, g1, g4: the one-statement insert meets a stored row
    and rolls back to its savepoint, consuming no seq; the careful path inserts g3, g4 as 3
    and 4."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    tx(conn, store.write_mirrored_batch, MirrorBatch(
        (mirrored(cid, a, "alice", "g1", NOW), mirrored(cid, a, "alice", "g2", NOW + 1))), NOW)
    result = tx(conn, store.write_mirrored_batch, MirrorBatch(tuple(
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
    assert set(store._STORED_ALREADY) <= names


def test_mirror_writers_locking_many_conversations_in_any_order_never_deadlock(db_dsn, conn):
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
                    tx(c, store.write_mirrored_batch, MirrorBatch(msgs), NOW)
                    tx(c, store.write_mirrored_batch, MirrorBatch(msgs[5:]), NOW)  # replay
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


def test_mirrored_batch_for_unknown_conversation_writes_nothing(conn):
    """A batch naming a conversation that does not exist fails whole, checkpoint included."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    batch = MirrorBatch((mirrored(cid, a, "alice", "g1", NOW),
                         mirrored(uuid.uuid4(), a, "alice", "g2", NOW)),
                        (FeedCheckpoint("sn-1", "e1", 2),))
    with pytest.raises(store.NotFound):
        tx(conn, store.write_mirrored_batch, batch, NOW)
    assert table_rows(conn, "messages") == 0 and table_rows(conn, "bridge_checkpoints") == 0


def test_stale_fence_rolls_back_the_whole_batch(conn):
    """A checkpoint under an older fence than the stored one refuses, and its data too."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    tx(conn, store.save_checkpoint, FeedCheckpoint("sn-1", "e1", 10, fence=7), NOW)
    batch = MirrorBatch((mirrored(cid, a, "alice", "g1", NOW),),
                        (FeedCheckpoint("sn-1", "e1", 11, fence=6),))
    with pytest.raises(store.StaleFence):
        tx(conn, store.write_mirrored_batch, batch, NOW)
    assert table_rows(conn, "messages") == 0
    assert tx(conn, store.load_checkpoints)["sn-1"] == FeedCheckpoint("sn-1", "e1", 10, 7)


def test_notifications_are_owed_to_cloud_capable_members_but_not_the_sender(conn):
    """Members in phase legacy have no cloud devices, and nobody is notified of their own."""
    a = make_account(conn, "alice", "dual")
    b = make_account(conn, "bob", "legacy")
    c = make_account(conn, "carol", "cloud-only")
    cid = make_conversation(conn, a, b, c)
    tx(conn, store.write_mirrored_batch, MirrorBatch((mirrored(cid, a, "alice", "g", NOW),)),
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
                    tx(c, store.write_mirrored_batch, MirrorBatch(msgs), NOW)
                    tx(c, store.write_mirrored_batch, MirrorBatch(msgs[:3]), NOW)
        except Exception as e:
            errors.append(e)

    def api_writer(w):
        try:
            with psycopg.connect(db_dsn, autocommit=True) as c:
                for k in range(25):
                    tx(c, store.post_message, cid, b, f"c{w}-{k}", "hello", NOW)
                    tx(c, store.post_message, cid, b, f"c{w}-{k}", "hello", NOW)
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


# ---------------------------------------------------------------- API write path

def test_post_is_idempotent_per_client_message_id(conn):
    """The same client message id returns the same message and writes nothing more."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    m1, created1 = tx(conn, store.post_message, cid, a, "c-1", "hello", NOW)
    m2, created2 = tx(conn, store.post_message, cid, a, "c-1", "something else", NOW + 9)
    assert created1 and not created2 and m1 == m2
    assert table_rows(conn, "messages") == 1 and table_rows(conn, "notifications") == 1
    assert table_rows(conn, "outbox_to_legacy") == 1


def test_client_message_ids_are_unique_per_sender_and_mirrored_rows_stay_out_of_the_index(
        conn):
    """The store refuses a second row with a sender's client message id, whatever the
    caller (migration 0006's partial index), and the duplicate lookup uses that index; a
    mirrored message, which has none, writes no entry in it."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    tx(conn, store.post_message, cid, a, "c-1", "hello", NOW)
    with pytest.raises(psycopg.errors.UniqueViolation):
        with conn.transaction():
            conn.execute(
                "INSERT INTO messages (conversation_id, seq, message_id, sender_account_id, "
                "  sender_handle, sent_ms, body, origin, client_message_id) "
                "VALUES (%s, 2, %s, %s, 'alice', 1, 'x', 'cloud', 'c-1')",
                (cid, uuid.uuid4(), a))
    (predicate,) = conn.execute(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
        "WHERE indexrelid = 'messages_client_message_id'::regclass").fetchone()
    assert predicate == "(client_message_id IS NOT NULL)"
    conn.execute("SET enable_seqscan = off")  # a tiny table: ask which index would serve
    try:
        plan = "\n".join(r[0] for r in psycopg.ClientCursor(conn).execute(
            "EXPLAIN SELECT 1 FROM messages WHERE conversation_id = %s "
            "AND sender_account_id = %s AND client_message_id = %s", (cid, a, "c-1")))
    finally:
        conn.execute("RESET enable_seqscan")
    assert "messages_client_message_id" in plan, plan


def test_outbox_to_legacy_only_when_a_member_still_uses_legacy_clients(conn):
    """Cloud-only members need no injection; a member in phase dual does."""
    a, b = make_account(conn, "alice", "cloud-only"), make_account(conn, "bob", "cloud-only")
    c = make_account(conn, "carol", "dual")
    cloud_only = make_conversation(conn, a, b)
    mixed = make_conversation(conn, a, c)
    tx(conn, store.post_message, cloud_only, a, "c-1", "x", NOW)
    tx(conn, store.post_message, mixed, a, "c-2", "y", NOW)
    rows = conn.execute("SELECT conversation_id, seq FROM outbox_to_legacy").fetchall()
    assert rows == [(mixed, 1)]


def test_post_and_its_outbox_rows_commit_together_or_not_at_all(conn):
    """A failure after the message insert but before commit leaves no message and no outbox."""
    a, c = make_account(conn, "alice"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    conn.execute("CREATE FUNCTION fail_outbox() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$")
    conn.execute("CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox_to_legacy "
                 "FOR EACH ROW EXECUTE FUNCTION fail_outbox()")
    try:
        with pytest.raises(psycopg.errors.RaiseException):
            tx(conn, store.post_message, cid, a, "c-1", "hello", NOW)
    finally:
        conn.execute("DROP TRIGGER fail_outbox ON outbox_to_legacy")
        conn.execute("DROP FUNCTION fail_outbox()")
    assert table_rows(conn, "messages") == 0 and table_rows(conn, "outbox_to_legacy") == 0
    assert table_rows(conn, "notifications") == 0
    message, created = tx(conn, store.post_message, cid, a, "c-1", "hello", NOW)
    assert created and message.seq == 1


def test_post_by_non_member_or_to_unknown_conversation_is_refused(conn):
    """Non-members get NotMember, unknown conversations NotFound; nothing is written."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a)
    with pytest.raises(store.NotMember):
        tx(conn, store.post_message, cid, b, "c", "x", NOW)
    with pytest.raises(store.NotFound):
        tx(conn, store.post_message, uuid.uuid4(), a, "c", "x", NOW)
    assert table_rows(conn, "messages") == 0


def test_sync_returns_messages_after_the_cursor_in_order(conn):
    """sync_messages pages through a conversation by seq."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    for i in range(7):
        tx(conn, store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    page = tx(conn, store.sync_messages, cid, 2, 3)
    assert [(m.seq, m.body) for m in page] == [(3, "m2"), (4, "m3"), (5, "m4")]


def test_handle_belongs_to_one_account(conn):
    """A second account may not take an existing handle; recreating the same one is a no-op."""
    a = make_account(conn, "alice")
    assert tx(conn, store.create_account, Account(a, "alice", "dual", "alice"), None) is False
    with pytest.raises(store.Conflict):
        tx(conn, store.create_account, Account(uuid.uuid4(), "alice", "dual"), None)
    assert table_rows(conn, "accounts") == 1


# ---------------------------------------------------------------- presence and notifications

def test_presence_keeps_the_newest_version_per_source_and_hides_expired(conn):
    """An older version never overwrites a newer one; expired sources are not read."""
    a = make_account(conn, "alice")
    tx(conn, store.set_presence, Presence(a, "cloud", "online", 5, NOW + 1000))
    assert not tx(conn, store.set_presence, Presence(a, "cloud", "away", 4, NOW + 9000))
    tx(conn, store.set_presence, Presence(a, "legacy", "busy", 1, NOW + 10))
    live = tx(conn, store.read_presence, [a], NOW + 20)
    assert live == {a: [Presence(a, "cloud", "online", 5, NOW + 1000)]}


def test_claiming_notifications_counts_attempts_then_fails_visibly(conn):
    """After max attempts unacked: failed with an open finding; a late ack resolves both."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    tx(conn, store.post_message, cid, a, "c", "x", NOW)
    now = NOW
    for attempt in range(1, 4):
        push, failed = tx(conn, store.claim_due_notifications, now, 10, 1000, 3)
        assert [n.attempts for n in push] == [attempt] and failed == []
        assert tx(conn, store.claim_due_notifications, now, 10, 1000, 3) == ([], [])
        now += 1000
    push, failed = tx(conn, store.claim_due_notifications, now, 10, 1000, 3)
    assert push == [] and len(failed) == 1
    assert tx(conn, store.notification_counts)["failed"] == 1
    assert conn.execute("SELECT kind, state FROM reconcile_findings").fetchall() == [
        ("notification_failed", "open")]
    # a late ack still counts: the device did get it
    assert tx(conn, store.ack_notification, b, failed[0].notification_id, now)
    assert tx(conn, store.notification_counts)["acked"] == 1
    assert conn.execute("SELECT state FROM reconcile_findings").fetchall() == [("repaired",)]


def test_ack_is_per_account_and_idempotent(conn):
    """Only the owner can ack; acking twice is the same as once."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    tx(conn, store.post_message, cid, a, "c", "x", NOW)
    nid = conn.execute("SELECT notification_id FROM notifications").fetchone()[0]
    assert not tx(conn, store.ack_notification, a, nid, NOW)
    assert tx(conn, store.ack_notification, b, nid, NOW + 1)
    assert tx(conn, store.ack_notification, b, nid, NOW + 2)
    assert conn.execute("SELECT state, acked_ms FROM notifications").fetchone() == (
        "acked", NOW + 1)


# ---------------------------------------------------------------- outbox to legacy

def test_outbox_claims_hide_rows_keep_order_and_come_due_again(conn):
    """Claimed rows are invisible until the claim runs out; order per conversation holds."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    for i in range(3):
        tx(conn, store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    first = tx(conn, store.claim_outbox, NOW, 2, 1000)
    assert [(i.seq, i.body, i.member_handles) for i in first] == [
        (1, "m0", ("alice", "carol")), (2, "m1", ("alice", "carol"))]
    assert first[0].legacy_client_members == 2 and first[0].attempts == 1
    # seq 3 waits: an earlier row of its conversation is claimed (order across workers)
    assert tx(conn, store.claim_outbox, NOW + 10, 10, 1000) == []
    tx(conn, store.complete_outbox, first[0], "chat-x", "cloud:g1", NOW + 20)
    tx(conn, store.release_outbox, first[1], "supernode down", NOW + 500)
    again = tx(conn, store.claim_outbox, NOW + 600, 10, 1000)
    assert [(i.seq, i.attempts) for i in again] == [(2, 2), (3, 1)]
    assert again[0].legacy_chat_id == "chat-x"
    assert conn.execute("SELECT legacy_guid FROM messages WHERE seq = 1").fetchone() == (
        "cloud:g1",)
    assert tx(conn, store.outbox_backlog, NOW + 1000) == (2, 999)  # seq 2 was posted at NOW+1


def test_two_workers_never_split_one_conversations_outbox(db_dsn, conn):
    """While one worker's claim is open, another gets none of that conversation's rows, not
    even rows posted after the first claim (they would overtake the first worker's)."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    for i in range(2):
        tx(conn, store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    with psycopg.connect(db_dsn, autocommit=True) as worker_a, \
            psycopg.connect(db_dsn, autocommit=True) as worker_b:
        with worker_a.transaction():
            claimed = store.claim_outbox(worker_a, NOW + 10, 10, 5000)
            assert [i.seq for i in claimed] == [1, 2]
            tx(conn, store.post_message, cid, a, "c2", "m2", NOW + 11)  # a later row
            assert tx(worker_b, store.claim_outbox, NOW + 12, 10, 5000) == []
        # committed: the head is claimed, so the conversation stays with worker A
        assert tx(worker_b, store.claim_outbox, NOW + 13, 10, 5000) == []
        assert [i.seq for i in tx(worker_b, store.claim_outbox, NOW + 6000, 10, 5000)] == [
            1, 2, 3]


@pytest.mark.parametrize("body", ["a\x00b", "\ud800"])
def test_post_refuses_text_postgresql_can_not_store(conn, body):
    """NUL and lone surrogates are refused with ValueError before anything is written."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    with pytest.raises(ValueError):
        tx(conn, store.post_message, cid, a, "c1", body, NOW)
    assert table_rows(conn, "messages") == 0


def test_ensure_legacy_conversations_creates_maps_and_adds_members_idempotently(conn):
    """Many chats in one call: created with their legacy ids and members; a second call
    with more members adds only those; a chat over MAX_MEMBERS is refused (nothing added to
    it) while the others go ahead; a chat id mapped elsewhere or an unknown member rolls
    the whole call back."""
    from cloud.model import MAX_MEMBERS

    people = [make_account(conn, f"p{i:03d}", "legacy") for i in range(MAX_MEMBERS + 1)]
    c1, c2, big = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    refused = tx(conn, store.ensure_legacy_conversations, {
        "chat-1": (c1, people[:2]), "chat-2": (c2, people[2:3])})
    assert refused == {}
    members = "SELECT count(*) FROM members WHERE conversation_id = %s"
    assert [conn.execute(members, (c,)).fetchone()[0] for c in (c1, c2)] == [2, 1]
    assert dict(conn.execute("SELECT legacy_chat_id, conversation_id "
                             "FROM conversation_legacy_ids").fetchall()) == {
        "chat-1": c1, "chat-2": c2}
    refused = tx(conn, store.ensure_legacy_conversations, {
        "chat-1": (c1, people[:3]), "chat-big": (big, people)})
    assert list(refused) == ["chat-big"] and f"at most {MAX_MEMBERS}" in refused["chat-big"]
    assert conn.execute(members, (c1,)).fetchone()[0] == 3
    assert conn.execute(members, (big,)).fetchone()[0] == 0  # exists, nobody added
    before = conn.execute("SELECT count(*) FROM members").fetchone()[0]
    with pytest.raises(store.Conflict):
        tx(conn, store.ensure_legacy_conversations, {
            "chat-3": (uuid.uuid4(), people[:1]), "chat-1": (uuid.uuid4(), people[:1])})
    with pytest.raises(store.NotFound):
        tx(conn, store.ensure_legacy_conversations, {"chat-4": (uuid.uuid4(), [uuid.uuid4()])})
    assert conn.execute("SELECT count(*) FROM members").fetchone()[0] == before
    assert conn.execute("SELECT count(*) FROM conversation_legacy_ids").fetchone()[0] == 3


def test_add_members_stops_at_max_members_and_adds_nothing_past_it(conn):
    """A conversation fills up to MAX_MEMBERS; adding anyone else raises TooManyMembers and
    adds no one of that call, while re-adding members it already has is fine."""
    from cloud.model import MAX_MEMBERS

    people = [make_account(conn, f"m{i:03d}", "legacy") for i in range(MAX_MEMBERS + 2)]
    cid = make_conversation(conn, *people[:2])
    assert tx(conn, store.add_members, cid, people[:MAX_MEMBERS]) == MAX_MEMBERS - 2
    assert tx(conn, store.add_members, cid, people[:MAX_MEMBERS]) == 0  # all there already
    with pytest.raises(store.TooManyMembers, match=f"at most {MAX_MEMBERS} members; this one "
                                                   f"would have {MAX_MEMBERS + 2}"):
        tx(conn, store.add_members, cid, people[MAX_MEMBERS - 1:])
    assert conn.execute("SELECT count(*) FROM members WHERE conversation_id = %s",
                        (cid,)).fetchone()[0] == MAX_MEMBERS


def test_ensure_legacy_conversations_counts_the_members_already_there(conn):
    """The limit counts existing members: a conversation one short of MAX_MEMBERS takes one
    more new member but not two; a refused chat's conversation still exists."""
    from cloud.model import MAX_MEMBERS

    people = [make_account(conn, f"q{i:03d}", "legacy") for i in range(MAX_MEMBERS + 1)]
    full, other = uuid.uuid4(), uuid.uuid4()
    tx(conn, store.ensure_legacy_conversations, {
        "almost": (full, people[:MAX_MEMBERS - 1]), "other": (other, people[:1])})
    refused = tx(conn, store.ensure_legacy_conversations, {
        "almost": (full, people[:MAX_MEMBERS + 1])})  # two new: one too many
    assert f"would have {MAX_MEMBERS + 1}" in refused["almost"]
    assert tx(conn, store.ensure_legacy_conversations, {
        "almost": (full, people[:MAX_MEMBERS])}) == {}  # one new: fits
    assert conn.execute("SELECT count(*) FROM members WHERE conversation_id = %s",
                        (full,)).fetchone()[0] == MAX_MEMBERS
    refused = tx(conn, store.ensure_legacy_conversations, {
        "refused-new": (uuid.uuid4(), people)})
    assert list(refused) == ["refused-new"]
    assert conn.execute("SELECT count(*) FROM conversations WHERE legacy_chat_id = "
                        "'refused-new'").fetchone()[0] == 1


def test_an_older_report_of_the_same_worker_process_does_not_overwrite_a_newer_one(conn):
    """Reports of one process run on pool threads and may commit out of order: a 'degraded'
    stamped before a 'ready' must not win. A new process (another started_ms) always does."""
    def report(state: str, started: int, at: int) -> None:
        tx(conn, store.heartbeat_worker, "w1", state, at, started, lag_to_cloud_ms=None,
           lag_to_legacy_ms=None, mirrored_to_cloud=0, mirrored_to_legacy=0,
           feeds=1 if state == "ready" else 0, detail={})

    def row() -> tuple:
        return conn.execute("SELECT state, heartbeat_ms, started_ms FROM bridge_workers "
                            "WHERE worker_id = 'w1'").fetchone()

    report("ready", started=1_000, at=5_000)
    report("degraded", started=1_000, at=4_000)  # stamped earlier, committed later
    assert row() == ("ready", 5_000, 1_000)
    report("ready", started=1_000, at=5_000)  # the same moment again: written
    report("degraded", started=9_000, at=3_000)  # a restarted process, whatever its clock
    assert row() == ("degraded", 3_000, 9_000)
