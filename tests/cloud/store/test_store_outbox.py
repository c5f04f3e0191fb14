"""The outbox to legacy against a real PostgreSQL: claims keep order and never split a
conversation.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from cloud import admin
from cloud.db import run_transaction
from cloud.store import messages as messages_store
from cloud.store import outbox as outbox_store
from tests.cloud.store.storefixture import NOW, numbered, prepared_plan
from tests.dbfixture import failing_inserts, make_account, make_conversation, round_trips, tx


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
    # queued for legacy, each message has its legacy GUID from its post ...
    message = "SELECT ctid, legacy_guid FROM messages WHERE seq = 1"
    posted = conn.execute(message).fetchone()
    assert posted[1] == f"cloud:{first[0].message_id}"
    tx(conn, outbox_store.complete_outbox, first[0], "chat-x", posted[1], NOW + 20)
    tx(conn, outbox_store.release_outbox, first[1], "supernode down", NOW + 500)
    again = tx(conn, outbox_store.claim_outbox, NOW + 600, 10, 1000)
    assert [(i.seq, i.attempts) for i in again] == [(2, 2), (3, 1)]
    assert again[0].legacy_chat_id == "chat-x"
    # ... so its completion writes only the outbox row (the message keeps its row version)
    assert conn.execute(message).fetchone() == posted
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


def test_a_late_complete_or_release_from_an_expired_claim_changes_nothing(conn):
    """Claim A ran out and B claimed the rows again: A's complete and release write nothing
    (and say so), B's claim keeps its time and completes."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    for i in range(2):
        tx(conn, messages_store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    conn.execute("UPDATE messages SET legacy_guid = NULL WHERE seq = 1")  # an older writer's
    stale = tx(conn, outbox_store.claim_outbox, NOW, 10, 1000)
    fresh = tx(conn, outbox_store.claim_outbox, NOW + 2000, 10, 1000)
    assert [i.seq for i in fresh] == [1, 2] and fresh[0].claim_token != stale[0].claim_token

    def rows():
        return conn.execute("SELECT seq, state, claimed_until_ms, last_error FROM "
                            "outbox_to_legacy ORDER BY seq").fetchall()

    def messages():
        return conn.execute("SELECT seq, ctid, legacy_guid FROM messages ORDER BY seq"
                            ).fetchall()

    held, posted = rows(), messages()
    assert [i.legacy_guid for i in stale] == [None, f"cloud:{stale[1].message_id}"]
    assert tx(conn, outbox_store.complete_outbox, stale[0], "chat-x", "cloud:g1", NOW + 2001) \
        is False
    assert tx(conn, outbox_store.complete_outbox_batch,
              [outbox_store.Injected(i, "chat-x", f"cloud:g{i.seq}") for i in stale],
              NOW + 2001) == []
    for reason in outbox_store.SKIP_REASONS:
        assert tx(conn, outbox_store.complete_outbox, stale[1], "chat-x", None, NOW + 2001,
                  skipped=True, skip_reason=reason) is False
    assert tx(conn, outbox_store.release_outbox, stale[1], "late", NOW + 2002) is False
    assert rows() == held
    assert messages() == posted  # no GUID written or taken
    assert conn.execute("SELECT legacy_chat_id FROM conversations").fetchone() == (None,)
    assert tx(conn, outbox_store.release_outbox, fresh[1], "down", NOW + 2500) is True
    assert tx(conn, outbox_store.complete_outbox, fresh[0], "chat-x", "cloud:g1", NOW + 2003)
    assert [r[:2] for r in rows()] == [(1, "done"), (2, "pending")]
    # the claim's completion gave the message it found without a GUID the one it sent
    assert [m[2] for m in messages()] == ["cloud:g1", f"cloud:{fresh[1].message_id}"]


def test_a_batch_completes_every_row_in_one_transaction_or_none(conn):
    """Every row's state, the GUID a message lacks (queued by a version before migration
    0022) and the conversation's chat id are written together; a failure part-way rolls all
    of it back."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cids = [make_conversation(conn, a, c), make_conversation(conn, a, c, chat="legacy-7")]
    for cid in cids:
        for i in range(2):
            tx(conn, messages_store.post_message, cid, a, f"{cid}{i}", f"m{i}", NOW + i)
    conn.execute("UPDATE messages SET legacy_guid = NULL WHERE seq = 2")  # an older writer's
    items = tx(conn, outbox_store.claim_outbox, NOW, 10, 1000)
    batch = [outbox_store.Injected(i, i.legacy_chat_id or "born-1", f"cloud:{i.message_id}")
             for i in items]
    with failing_inserts(conn, "conversation_legacy_ids", "no"), \
            pytest.raises(psycopg.errors.RaiseException):
        tx(conn, outbox_store.complete_outbox_batch, batch, NOW + 5)
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy WHERE state = 'pending'"
                        ).fetchone() == (4,)
    assert conn.execute("SELECT count(legacy_guid) FROM messages").fetchone() == (2,)
    assert tx(conn, outbox_store.complete_outbox_batch, batch, NOW + 5) == [
        b.item for b in batch]
    assert conn.execute("SELECT state, done_ms, count(*) FROM outbox_to_legacy GROUP BY 1, 2"
                        ).fetchall() == [("done", NOW + 5, 4)]
    assert dict(conn.execute("SELECT message_id, legacy_guid FROM messages").fetchall()) == {
        b.item.message_id: b.legacy_guid for b in batch}
    assert sorted(conn.execute("SELECT legacy_chat_id FROM conversations").fetchall()) == [
        ("born-1",), ("legacy-7",)]


def test_concurrent_claimers_take_whole_runs_from_each_head_in_order(db_dsn, conn):
    """Two claimers in open transactions at once: no conversation is split between them,
    each claim starts at a head and runs in seq order; later claims carry on from there."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cids = [make_conversation(conn, a, c) for _ in range(6)]
    for n in range(5):
        for k, cid in enumerate(cids):
            tx(conn, messages_store.post_message, cid, a, f"{cid}{n}", f"m{n}", NOW + n * 10 + k)
    taken: dict = {}
    with psycopg.connect(db_dsn, autocommit=True) as one, \
            psycopg.connect(db_dsn, autocommit=True) as two:
        with one.transaction(), two.transaction():
            first = outbox_store.claim_outbox(one, NOW + 100, 7, 5000, 3)
            second = outbox_store.claim_outbox(two, NOW + 100, 7, 5000, 3)
        for claim in (first, second):
            by_cid: dict = {}
            for item in claim:
                by_cid.setdefault(item.conversation_id, []).append(item.seq)
            for cid, seqs in by_cid.items():
                assert cid not in taken  # never split between the two claims
                assert seqs == list(range(1, len(seqs) + 1))  # from the head, in order
                taken[cid] = seqs
        assert len(first) == 7 and len(second) == 7 and len(taken) == 6
    # the next claim (once both ran out) starts where each conversation's claim stopped
    again = tx(conn, outbox_store.claim_outbox, NOW + 6000, 100, 5000, 5)
    assert {i.conversation_id: i.seq for i in reversed(again)} == {
        cid: 1 for cid in cids}


def test_membership_changes_are_claimed_in_order_with_the_messages(conn):
    """post, remove carol, add her back, post: one claim returns the four rows in that order
    ((seq, sub)), the changes with their deltas, each message with its members of the
    moment; completing a change leaves its message's legacy GUID alone."""
    from cloud.store import conversations as conversations_store

    a, b = make_account(conn, "alice", "cloud"), make_account(conn, "bob", "legacy")
    make_account(conn, "carol", "legacy")
    carol = conn.execute("SELECT account_id FROM accounts WHERE handle = 'carol'").fetchone()[0]
    cid = make_conversation(conn, a, b, carol)
    tx(conn, messages_store.post_message, cid, a, "c0", "m0", NOW)
    tx(conn, conversations_store.remove_member, cid, a, "carol", NOW + 1)
    tx(conn, conversations_store.add_member, cid, a, "carol", NOW + 2)
    tx(conn, conversations_store.remove_member, cid, a, "carol", NOW + 3)
    tx(conn, messages_store.post_message, cid, a, "c1", "m1", NOW + 4)
    # queued without their GUIDs (by an older writer): the completion fills in only those
    # of the message rows it completes
    conn.execute("UPDATE messages SET legacy_guid = NULL")
    items = tx(conn, outbox_store.claim_outbox, NOW + 10, 10, 1000)
    assert [(i.seq, i.sub, i.kind, i.message_id is None, i.add_handles, i.remove_handles,
             i.sent_ms) for i in items] == [
        (1, 0, "message", False, (), (), NOW),
        (1, 1, "members", True, (), ("carol",), NOW + 1),
        (1, 2, "members", True, ("carol",), (), NOW + 2),
        (1, 3, "members", True, (), ("carol",), NOW + 3),
        (2, 0, "message", False, (), (), NOW + 4)]
    assert items[0].member_handles == ("alice", "bob", "carol")
    assert items[4].member_handles == ("alice", "bob")
    # counted now (alice is in phase cloud, so she has legacy clients too); a removal also
    # counts the member it removes
    assert [i.legacy_client_members for i in items] == [2, 3, 2, 3, 2]
    tx(conn, outbox_store.complete_outbox_batch,
       [outbox_store.Injected(items[0], "chat-x", "cloud:g1"),
        outbox_store.Injected(items[1], "chat-x", None)], NOW + 20)
    assert conn.execute("SELECT seq, legacy_guid FROM messages ORDER BY seq").fetchall() == [
        (1, "cloud:g1"), (2, None)]
    assert conn.execute("SELECT seq, sub, state FROM outbox_to_legacy ORDER BY seq, sub"
                        ).fetchall() == [(1, 0, "done"), (1, 1, "done"), (1, 2, "pending"),
                                         (1, 3, "pending"), (2, 0, "pending")]


def test_a_claim_looks_past_a_window_of_already_claimed_conversations(conn):
    """The claim first reads only the oldest rows: when they all belong to a conversation
    whose head is claimed (a long backlog in front), it still finds the conversations
    waiting behind it, oldest head first, and never a row of the claimed one."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    busy, quiet = make_conversation(conn, a, c), make_conversation(conn, a, c)
    for i in range(6):
        tx(conn, messages_store.post_message, busy, a, f"b{i}", f"b{i}", NOW + i)
    tx(conn, messages_store.post_message, quiet, a, "q0", "q0", NOW + 10)
    first = tx(conn, outbox_store.claim_outbox, NOW + 20, 2, 5000, 2, window=3)
    assert [(i.conversation_id, i.seq) for i in first] == [(busy, 1), (busy, 2)]
    # the three oldest rows are busy's, whose head is claimed now: the window finds nothing
    second = tx(conn, outbox_store.claim_outbox, NOW + 30, 10, 5000, 2, window=3)
    assert [(i.conversation_id, i.seq) for i in second] == [(quiet, 1)]
    assert tx(conn, outbox_store.claim_outbox, NOW + 40, 10, 5000, 2, window=3) == []


def test_each_claimed_row_counts_the_legacy_clients_of_its_own_conversation(conn):
    """Members with legacy clients are counted once per conversation (on its first row) and
    carried to its other rows: rows of conversations with different counts, posted
    interleaved and claimed in one call that runs the claim twice (the window first, then
    every pending row), each carry their own conversation's count."""
    alice = make_account(conn, "alice", "cloud")
    legacy = [make_account(conn, f"l{i}", "legacy") for i in range(3)]
    gone = make_account(conn, "gone", "cloud-only")
    counts = {make_conversation(conn, alice, *legacy): 4,
              make_conversation(conn, alice, gone): 1,
              make_conversation(conn, alice, legacy[0]): 2}
    for i in range(3):
        for n, cid in enumerate(counts):
            tx(conn, messages_store.post_message, cid, alice, f"c{i}", f"m{i}",
               NOW + 3 * i + n)
    # a window of the two oldest rows holds two conversations: the rest comes from the
    # second pass over every pending row
    items = tx(conn, outbox_store.claim_outbox, NOW + 100, 100, 5000, 50, window=2)
    assert len(items) == 9 and len({i.conversation_id for i in items}) == 3
    # the first execution took the two oldest conversations, the second the third
    assert items[-1].conversation_id == list(counts)[2]
    assert all(i.legacy_client_members == counts[i.conversation_id] for i in items), [
        (i.conversation_id, i.seq, i.legacy_client_members) for i in items]


def test_cloud_chat_ids_are_recorded_once_and_never_replace_one_set(conn):
    """map_cloud_chats records a cloud-born conversation's made-up chat id (the mapping and
    the conversation's column); again, it changes nothing, and a conversation that has a
    chat id keeps it."""
    a, c = make_account(conn, "alice", "dual"), make_account(conn, "carol", "legacy")
    born, linked = make_conversation(conn, a, c), make_conversation(conn, a, c, chat="legacy-7")
    chats = {born: f"cloud:{born}", linked: "cloud:other"}
    for _ in range(2):
        tx(conn, outbox_store.map_cloud_chats, chats)
        assert dict(conn.execute("SELECT conversation_id, legacy_chat_id FROM conversations"
                                 ).fetchall()) == {born: f"cloud:{born}", linked: "legacy-7"}
    assert sorted(conn.execute("SELECT legacy_chat_id FROM conversation_legacy_ids"
                               ).fetchall()) == [(f"cloud:{born}",), ("legacy-7",)]
    tx(conn, outbox_store.map_cloud_chats, {})


def test_any_due_sees_rows_no_claim_holds_and_no_retry_delay_keeps_back(conn):
    """A conversation has a row due when a pending row of it is neither claimed nor waiting
    for its retry time; done rows and other conversations' rows do not count."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid, other = make_conversation(conn, a, c), make_conversation(conn, a, c)
    assert tx(conn, outbox_store.any_due, [cid, other], NOW) is False
    assert tx(conn, outbox_store.any_due, [], NOW) is False
    tx(conn, messages_store.post_message, other, a, "o1", "elsewhere", NOW)
    tx(conn, messages_store.post_message, cid, a, "c1", "m1", NOW)
    assert tx(conn, outbox_store.any_due, [cid], NOW) is True
    claimed = tx(conn, outbox_store.claim_outbox, NOW, 10, 1000)  # both conversations
    [first] = [i for i in claimed if i.conversation_id == cid]
    assert tx(conn, outbox_store.any_due, [cid], NOW + 1) is False  # claimed
    tx(conn, outbox_store.release_outbox, first, "supernode down", NOW + 500)
    assert tx(conn, outbox_store.any_due, [cid], NOW + 499) is False  # its retry delay
    assert tx(conn, outbox_store.any_due, [cid], NOW + 500) is True
    [again] = [i for i in tx(conn, outbox_store.claim_outbox, NOW + 500, 10, 1000)
               if i.conversation_id == cid]
    tx(conn, outbox_store.complete_outbox, again, "chat-x", "cloud:g1", NOW + 600)
    assert tx(conn, outbox_store.any_due, [cid], NOW + 600) is False  # done


def _pairs(conn, n: int) -> list[tuple]:
    """*n* conversations of two dual members each; (conversation, first member) pairs."""
    conn.execute(
        "WITH acc AS (INSERT INTO accounts (account_id, handle, phase) "
        "  SELECT gen_random_uuid(), 'u-' || g, 'dual' FROM generate_series(1, %(accounts)s) g "
        "  RETURNING account_id), "
        "numbered AS (SELECT account_id, (row_number() OVER () + 1) / 2 AS k FROM acc), "
        "conv AS (INSERT INTO conversations (conversation_id) "
        "  SELECT gen_random_uuid() FROM generate_series(1, %(conversations)s) "
        "  RETURNING conversation_id), "
        "keyed AS (SELECT conversation_id, row_number() OVER () AS k FROM conv) "
        "INSERT INTO members (conversation_id, account_id) "
        "SELECT conversation_id, account_id FROM keyed JOIN numbered USING (k)",
        {"accounts": 2 * n, "conversations": n})
    return conn.execute("SELECT conversation_id, min(account_id::text)::uuid FROM members "
                        "GROUP BY 1 ORDER BY 1").fetchall()


def test_a_claim_probes_the_accounts_of_its_members_and_scans_none(conn):
    """Who of a claimed conversation's members has legacy clients (and its members' handles,
    for rows that carry none) is a probe of each member's account by its key, in a custom
    and in a generic plan: with 200 conversations of two, analyzed, the plan hashed each
    claimed conversation's members against a scan of every account (400 rows read for each
    conversation, a cost growing with the accounts, not with the claim)."""
    pairs = _pairs(conn, 200)
    posts = [messages_store.Post(cid, sender, f"c{i}", "x", NOW + i)
             for i in range(25) for cid, sender in pairs]
    assert all(isinstance(r, tuple) for r in messages_store.post_messages(conn, posts))
    conn.execute("VACUUM ANALYZE")
    body = numbered(outbox_store._CLAIM, ("now", "limit", "until", "per_conversation",
                                          "token", "phases", "window"))
    args = (NOW + 10**6, 1000, NOW + 10**6 + 30_000, 50, uuid.uuid4(),
            list(outbox_store.LEGACY_CLIENT_PHASES), 4000)
    for mode in ("force_custom_plan", "force_generic_plan"):
        plan = prepared_plan(conn, body, args, mode)
        assert "Seq Scan on accounts" not in plan, f"{mode}\n{plan}"
        assert "Index Scan using accounts_pkey on accounts a " in plan, plan


def _unkeyed_reads(plan: str) -> list[str]:
    """The reads of an index of pending rows (``outbox_to_legacy_pending_*``, whose size the
    planner takes from the last ANALYZE) in *plan* that are not a probe by conversation (a
    condition naming conversation_id). A read of the whole table is not one: its size is
    known (a merge join with it can be the cheapest plan on a small table)."""
    lines = plan.splitlines()
    stray = []
    for i, line in enumerate(lines):
        if "using outbox_to_legacy_pending" not in line:
            continue
        node = []  # the lines of this scan's node: up to the next node
        for later in lines[i + 1:]:
            if "->" in later:
                break
            node.append(later)
        cond = next((later for later in node if "Index Cond:" in later), "")
        if "conversation_id = " not in cond:
            stray.append(line.strip())
    return stray


def test_after_an_analyze_of_a_drained_outbox_claims_and_completions_probe_by_key(conn):
    """Statistics taken while the outbox was empty make its indexes of pending rows look
    empty to the planner, whatever they hold later. The claim and the completion still find
    each conversation's rows, and each row of a batch, by key, in custom and generic plans:
    they used to read the whole index by age for every conversation or row (a 1,000-row
    claim 548 ms and its completion 586 ms with 5,000 rows pending, and the cloud -> legacy
    leg stalled under load until the next ANALYZE). A read of the whole table is allowed:
    the planner knows its size (on this small one a merge join can be the cheapest)."""
    pairs = _pairs(conn, 100)

    def post(tag: str, each: int) -> None:
        posts = [messages_store.Post(cid, sender, f"{tag}{i}", "x", NOW + i)
                 for i in range(each) for cid, sender in pairs]
        assert all(isinstance(r, tuple) for r in messages_store.post_messages(conn, posts))

    post("a", 20)
    while items := tx(conn, outbox_store.claim_outbox, NOW + 10**6, 1000, 30_000):
        tx(conn, outbox_store.complete_outbox_batch,
           [outbox_store.Injected(i, "chat", i.legacy_guid) for i in items], NOW + 10**6)
    def planned_pending() -> float:  # the pending rows' index size, as the planner sees it
        return conn.execute("SELECT reltuples FROM pg_class "
                            "WHERE relname = 'outbox_to_legacy_pending_seq'").fetchone()[0]

    conn.execute("VACUUM ANALYZE outbox_to_legacy")
    assert planned_pending() == 0
    post("b", 10)  # 1,000 pending, in the planner's eyes none (no ANALYZE since: checked)
    assert planned_pending() == 0
    claim = numbered(outbox_store._CLAIM, ("now", "limit", "until", "per_conversation",
                                           "token", "phases", "window"))
    claim_args = (NOW + 2 * 10**6, 1000, NOW + 3 * 10**6, 50, uuid.uuid4(),
                  list(outbox_store.LEGACY_CLIENT_PHASES), 4000)
    completion = outbox_store.completion_sql(fill_guids=True)
    for k in range(1, 7):
        completion = completion.replace("%b" if k < 6 else "%s", f"${k}", 1)
    rows = conn.execute("SELECT conversation_id, seq, sub FROM outbox_to_legacy "
                        "WHERE state = 'pending' LIMIT 500").fetchall()
    completion_args = ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                       [uuid.uuid4()] * len(rows), ["g"] * len(rows), NOW)
    for mode in ("force_custom_plan", "force_generic_plan"):
        plan = prepared_plan(conn, claim, claim_args, mode)
        # one read of the oldest rows (the claim's window, by age), once per claim
        assert len(_unkeyed_reads(plan)) == 1, f"{mode}\n{plan}"
        with conn.transaction():
            conn.execute("SET LOCAL enable_hashjoin = off")  # as the completion runs
            plan = prepared_plan(conn, completion, completion_args, mode)
        assert _unkeyed_reads(plan) == [], f"{mode}\n{plan}"
    # and the claim gets its rows, the completion completes them
    items = tx(conn, outbox_store.claim_outbox, NOW + 2 * 10**6, 1000, 30_000)
    assert len(items) == 1000
    assert tx(conn, outbox_store.complete_outbox_batch,
              [outbox_store.Injected(i, "chat", i.legacy_guid) for i in items],
              NOW + 2 * 10**6) == items


class _Recording:
    """A connection that records the statements run through it, for their plans."""

    def __init__(self, conn) -> None:
        self.conn, self.statements = conn, []

    def execute(self, query, params=None, **kwargs):
        self.statements.append(query)
        return self.conn.execute(query, params, **kwargs)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_the_queries_by_age_can_read_the_index_by_age(conn):
    """The oldest pending row (what the gates read) is one read of the index of pending rows
    by age, which only a query that states its whole condition may use (``PENDING_BY_AGE``):
    asked for pending rows alone, it read every pending row."""
    pairs = _pairs(conn, 100)
    posts = [messages_store.Post(cid, sender, f"c{i}", "x", NOW + i)
             for i in range(20) for cid, sender in pairs]
    assert all(isinstance(r, tuple) for r in messages_store.post_messages(conn, posts))
    conn.execute("ANALYZE outbox_to_legacy")  # 2,000 pending: the planner sees them
    assert outbox_store.outbox_backlog(conn, NOW + 10) == (2000, 10)  # counts them all
    recording = _Recording(conn)
    assert admin.oldest_pending_outbox_ms(recording) == NOW
    (statement,) = recording.statements
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")  # the plan of a large outbox
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {statement}"))
    assert "outbox_to_legacy_pending_age" in plan, plan


def test_a_batch_with_and_without_guids_and_a_batch_of_posts_keep_every_value(conn):
    """The arrays go in binary (``%b``): a NULL among the GUIDs stays NULL (a row completed
    without a GUID, for messages queued without one by a version before migration 0022),
    wide integers and non-ASCII text arrive as given."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c, chat="legacy-9")
    bodies = ["zürich ☃", "日本語", "x" * 3]
    posted = tx(conn, messages_store.post_messages, [
        messages_store.Post(cid, a, f"é-{i}", body, NOW + 2**40 + i)
        for i, body in enumerate(bodies)])
    assert [m.body for m, created in posted] == bodies and all(c for _, c in posted)
    assert conn.execute("SELECT client_message_id, sent_ms FROM messages ORDER BY seq"
                        ).fetchall() == [(f"é-{i}", NOW + 2**40 + i) for i in range(3)]
    conn.execute("UPDATE messages SET legacy_guid = NULL")  # an older writer's rows
    items = tx(conn, outbox_store.claim_outbox, NOW + 2**40 + 10, 10, 1000)
    batch = [outbox_store.Injected(i, "legacy-9", None if i.seq == 2 else f"cloud:{i.seq}")
             for i in items]
    assert tx(conn, outbox_store.complete_outbox_batch, batch, NOW + 2**40 + 20) == items
    assert conn.execute("SELECT seq, legacy_guid FROM messages ORDER BY seq").fetchall() == [
        (1, "cloud:1"), (2, None), (3, "cloud:3")]


def test_migration_0022_gives_queued_messages_their_guid_and_no_others(empty_dsn, monkeypatch):
    """Messages an older version queued without a GUID get theirs (and their digests) from
    0022 when their row is pending; a skipped one and one legacy was never owed do not."""
    from cloud import schema
    from cloud.store import digests as digests_store

    shipped = schema.shipped_migrations()
    (ours,) = [m.version for m in shipped if m.name == "guid_when_queued"]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        monkeypatch.setattr(schema, "shipped_migrations",
                            lambda: [m for m in shipped if m.version < ours])
        schema.upgrade(conn)
        a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
        cid = make_conversation(conn, a, c, chat="legacy-1")
        dave = make_account(conn, "dave", "cloud-only")
        alone = make_conversation(conn, dave)
        for i in range(3):
            tx(conn, messages_store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
        tx(conn, messages_store.post_message, alone, dave, "d", "nobody on legacy", NOW)
        [first, *_] = tx(conn, outbox_store.claim_outbox, NOW, 1, 1000)
        tx(conn, outbox_store.complete_outbox, first, "legacy-1", None, NOW,
           skipped=True, skip_reason=outbox_store.REFUSED)
        conn.execute("UPDATE messages SET legacy_guid = NULL")  # as the older version left it
        monkeypatch.setattr(schema, "shipped_migrations",
                            lambda: [m for m in shipped if m.version <= ours])
        assert schema.upgrade(conn) == [ours]
        assert conn.execute(
            "SELECT conversation_id = %s, seq, legacy_guid = 'cloud:' || message_id::text "
            "FROM messages ORDER BY 1, 2", (cid,)).fetchall() == [
            (False, 1, None), (True, 1, None), (True, 2, True), (True, 3, True)]
        assert tx(conn, digests_store.maintained_slots) == tx(conn, digests_store.scratch_slots)


def test_a_claim_updates_a_row_on_a_filled_outbox_page_in_place(conn):
    """Outbox pages keep room (fillfactor 70, migration 0023): a claim's update of a row
    whose page was filled by later posts is HOT, a new version on the same page with no
    index entries, not a row version elsewhere with an entry in each of three indexes."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    with conn.transaction():
        messages_store.post_messages(conn, [messages_store.Post(cid, a, f"c{i}", "m", NOW + i)
                                            for i in range(400)])
    pages = "SELECT count(DISTINCT (ctid::text::point)[0]) FROM outbox_to_legacy"
    assert conn.execute(pages).fetchone()[0] >= 3  # the first page is as full as it gets
    where = "SELECT (ctid::text::point)[0] FROM outbox_to_legacy WHERE seq = 1"
    page = conn.execute(where).fetchone()[0]
    with conn.transaction():
        [item] = outbox_store.claim_outbox(conn, NOW + 1000, 1, 5000)
        assert item.seq == 1
        (hot,) = conn.execute("SELECT pg_stat_get_xact_tuples_hot_updated("
                              "'outbox_to_legacy'::regclass)").fetchone()
    assert hot == 1
    assert conn.execute(where).fetchone()[0] == page


def test_a_claim_and_its_probe_for_more_rows_share_one_round_trip(db_dsn, conn):
    """Through the transaction runner, a claim and its probe for more pending rows go in one
    pipeline: three round trips with BEGIN and COMMIT (four before), the claim committed as
    another connection sees; a claim past a window of the claimed conversation's rows finds
    the later one."""
    a, c = make_account(conn, "alice", "cloud"), make_account(conn, "carol", "legacy")
    cid = make_conversation(conn, a, c)
    for i in range(3):
        tx(conn, messages_store.post_message, cid, a, f"c{i}", f"m{i}", NOW + i)
    with round_trips(conn) as trips:
        items = run_transaction(conn, "claim_outbox", outbox_store.claim_outbox, NOW, 10, 1000)
    assert trips.count == 3 and [i.seq for i in items] == [1, 2, 3]
    with psycopg.connect(db_dsn, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM outbox_to_legacy WHERE claim_token = %s",
                             (items[0].claim_token,)).fetchone() == (3,)
    later = make_conversation(conn, a, c)
    tx(conn, messages_store.post_message, later, a, "l0", "later", NOW + 10)
    more = run_transaction(conn, "claim_outbox", outbox_store.claim_outbox, NOW + 20, 10, 1000,
                           window=2)
    assert [(i.conversation_id, i.body) for i in more] == [(later, "later")]
