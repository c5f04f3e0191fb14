"""The maintained digests (migration 0019) against a real PostgreSQL: the slots always equal
digests computed from the messages, whatever wrote or removed them; a window's root read from
them equals the scan's; the dirty set names what changed; the migration back-fills a store
that already has messages.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from bridge import ids
from bridge.mirror import LegacyChanges, mirror_changes
from cloud import schema
from cloud.model import Account, MirrorBatch
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import digests as digests_store
from cloud.store import messages as messages_store
from cloud.store import mirror as mirror_store
from cloud.store import outbox as outbox_store
from legacy import digest_tree, wire
from tests.cloud.store.storefixture import NOW, mirrored
from tests.dbfixture import make_account, make_conversation, truncate_all, tx

VECTORS = json.loads((Path(__file__).parents[3] / "docs" / "digest-vectors.json").read_text())
SLOT = digests_store.SLOT_MS
#: an hour boundary, so slot offsets below are whole slots
BASE = (NOW // SLOT) * SLOT


def test_slot_width_is_the_legacy_trees_and_the_sql_floor_divides(conn):
    """Both sides slot time alike: the SQL slot function floor-divides by the legacy tree's
    slot width, negative times included."""
    assert SLOT == digest_tree.SLOT_MS
    for ms in (0, 1, SLOT - 1, SLOT, NOW, -1, -SLOT, -SLOT - 1, -SLOT + 1,
               2 ** 63 - 1, -(2 ** 63), -(2 ** 63) + 1, -(2 ** 63) + SLOT - 1):
        assert conn.execute("SELECT message_digest_slot(%s)", (ms,)).fetchone()[0] == ms // SLOT


def test_window_parts_cover_the_window_exactly():
    """A window is its whole slots plus the cut parts at its ends, nothing more or less."""
    cases = [(0, SLOT), (5, SLOT), (0, SLOT - 5), (5, 10), (5, 3 * SLOT + 7), (SLOT, 3 * SLOT),
             (-SLOT - 3, 2), (SLOT - 1, SLOT + 1)]
    for start, end in cases:
        lo, hi, (a1, b1), (a2, b2) = digests_store.window_parts(start, end)
        covered = [(s * SLOT, (s + 1) * SLOT) for s in range(lo, hi + 1)]
        covered += [r for r in ((a1, b1), (a2, b2)) if r[0] < r[1]]
        covered.sort()
        assert covered[0][0] == start and covered[-1][1] == end, (start, end, covered)
        pairs = zip(covered, covered[1:], strict=False)
        assert all(x[1] == y[0] for x, y in pairs), (start, end, covered)


def test_window_root_reproduces_the_shared_vectors(conn):
    """The root of each shared vector range without a prefix, read from the maintained slots,
    is the vector's digest (and the scan's)."""
    senders = {}
    for m in VECTORS["messages"]:
        if m["sender"] not in senders:
            senders[m["sender"]] = make_account(conn, m["sender"])
    cid = make_conversation(conn, *senders.values(), chat=VECTORS["chat_id"])
    tx(conn, mirror_store.write_mirrored_batch, MirrorBatch(tuple(
        mirrored(cid, senders[m["sender"]], m["sender"], m["guid"], m["ts_ms"], m["body"])
        for m in VECTORS["messages"])), NOW)
    roots = [r for r in VECTORS["range_digests"] if r["prefix_bits"] == 0]
    assert roots
    for r in roots:
        got = tx(conn, digests_store.maintained_digests, cid, r["start_ms"], r["end_ms"], 0, 0, 0)
        assert [(d.count, d.total) for d in got.digests] == [(r["count"], int(r["total"]))], r
    assert tx(conn, digests_store.maintained_slots) == tx(conn, digests_store.scratch_slots)


def test_a_window_root_reads_slots_not_the_history(conn):
    """The root of a window over 48 busy hours reads one row per whole hour plus the
    messages of the two hours its ends cut, not the conversation's messages."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a, chat="chat-busy")
    msgs = [mirrored(cid, a, "alice", f"g{h}-{i}", BASE + h * SLOT + i * 1000)
            for h in range(48) for i in range(40)]
    tx(conn, mirror_store.write_mirrored_batch, MirrorBatch(tuple(msgs)), NOW)
    start, end = BASE + 10 * SLOT + 20_500, BASE + 30 * SLOT + 5_500  # cut: 19 and 6 msgs
    got = tx(conn, digests_store.window_root, cid, start, end)
    assert got.digests == [tx(conn, digests_store.range_digest, cid, start, end)]
    assert got.digests[0].count == 19 * 40 + 19 + 6
    assert got.rows_read == 19 + 19 + 6


def test_dirty_set_is_cleared_only_by_an_unchanged_compare_below_its_newest_message(conn):
    """clear_dirty removes a conversation only when its version is still the one read and
    the watermark is past every message written since; a later write puts it back."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a, chat="chat-d")
    tx(conn, mirror_store.write_mirrored_batch,
       MirrorBatch((mirrored(cid, a, "alice", "g1", BASE + 5),)), NOW)
    read = tx(conn, digests_store.dirty_versions)
    assert cid in read
    assert tx(conn, digests_store.clear_dirty, read, BASE + 5) == 0  # not past its message
    tx(conn, mirror_store.write_mirrored_batch,
       MirrorBatch((mirrored(cid, a, "alice", "g2", BASE + 6),)), NOW)
    assert tx(conn, digests_store.clear_dirty, read, BASE + 100) == 0  # written since
    assert tx(conn, digests_store.clear_dirty, tx(conn, digests_store.dirty_versions),
              BASE + 100) == 1
    assert tx(conn, digests_store.dirty_versions) == {}
    tx(conn, mirror_store.write_mirrored_batch,
       MirrorBatch((mirrored(cid, a, "alice", "g1", BASE + 5),)), NOW)
    assert tx(conn, digests_store.dirty_versions) == {}  # a replay changes nothing
    tx(conn, accounts_store.set_phase, a, "cloud-only")
    tx(conn, messages_store.post_message, cid, a, "c1", "legacy is not owed it", NOW)
    assert tx(conn, digests_store.dirty_versions) == {}  # no legacy GUID: not digested
    tx(conn, accounts_store.set_phase, a, "dual")
    tx(conn, messages_store.post_message, cid, a, "c2", "queued for legacy", NOW)
    # queued for legacy: its GUID from the start, so in the digests while it is in flight
    assert set(tx(conn, digests_store.dirty_versions)) == {cid}
    assert tx(conn, digests_store.clear_dirty, tx(conn, digests_store.dirty_versions),
              NOW + 1) == 1
    tx(conn, digests_store.mark_dirty, [cid])
    assert set(tx(conn, digests_store.dirty_versions)) == {cid}


def test_migration_backfills_a_store_that_has_messages(empty_dsn, monkeypatch):
    """0019 on a store with messages: the slots equal the scratch digests, every
    conversation with a legacy chat is dirty, and writes after it keep the slots equal."""
    shipped = schema.shipped_migrations()
    (ours,) = [m.version for m in shipped if m.name == "maintained_digests"]
    before = [m for m in shipped if m.version < ours]  # the store as 0019 found it
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        monkeypatch.setattr(schema, "shipped_migrations", lambda: before)
        schema.upgrade(conn)
        a = make_account(conn, "alice")
        cids = [make_conversation(conn, a, chat=f"chat-{i}") for i in range(3)]
        lonely = make_conversation(conn, a)  # no legacy chat: never compared
        for k, cid in enumerate(cids):
            tx(conn, mirror_store.write_mirrored_batch, MirrorBatch(tuple(
                mirrored(cid, a, "alice", f"g{k}-{i}", BASE + i * 600_000) for i in range(30))),
               NOW)
        tx(conn, messages_store.post_message, lonely, a, "c1", "cloud only", NOW)
        monkeypatch.setattr(schema, "shipped_migrations", lambda: shipped)
        assert schema.upgrade(conn) == [m.version for m in shipped if m.version >= ours]
        slots = tx(conn, digests_store.maintained_slots)
        assert slots and slots == tx(conn, digests_store.scratch_slots)
        assert set(tx(conn, digests_store.dirty_versions)) == set(cids)
        tx(conn, mirror_store.write_mirrored_batch,
           MirrorBatch((mirrored(cids[0], a, "alice", "late", BASE + 7),)), NOW)
        conn.execute("DELETE FROM messages WHERE legacy_guid = 'g1-3'")
        assert tx(conn, digests_store.maintained_slots) == tx(conn, digests_store.scratch_slots)


# -- the state machine ------------------------------------------------------------------------

HANDLES = ("ann", "ben")
CHATS = ("chat-a", "chat-b", "chat-c")


class MaintainedDigests(RuleBasedStateMachine):
    """Mirror writes, repairs, posts (queued with their legacy GUIDs), their injections and
    give-ups, prunes, truncations, rolled-back writes and clean compares in any order; after
    each, the maintained slots equal the scratch ones and the dirty set names every
    conversation whose digested messages changed."""

    conn: psycopg.Connection

    def __init__(self) -> None:
        super().__init__()
        conn = self.conn
        truncate_all(conn)
        # the ids the bridge derives, so a repair through mirror_changes finds them
        self.accounts = {h: ids.account_id(h) for h in HANDLES}
        for h, a in self.accounts.items():
            tx(conn, accounts_store.create_account, Account(a, h, "dual", h), None)
        self.cids = {c: ids.conversation_id(c) for c in CHATS}
        for c, cid in self.cids.items():
            tx(conn, conversations_store.create_conversation, cid,
               list(self.accounts.values()), legacy_chat_id=c)
        self.guids: list[tuple[str, str, int]] = []  # (chat, guid, ts) mirrored so far
        self.n = 0
        self.posted = 0
        self.changed: set[uuid.UUID] = set(self.cids.values())  # new chats are dirty

    def _messages(self, chat: str, slots: list[int]) -> list:
        out = []
        for s in slots:
            self.n += 1
            ts = BASE + s * SLOT + (self.n * 7919) % SLOT
            out.append(mirrored(self.cids[chat], self.accounts["ann"], "ann", f"g{self.n}",
                                ts, f"body {self.n}"))
            self.guids.append((chat, f"g{self.n}", ts))
        return out

    @rule(chat=st.sampled_from(CHATS), slots=st.lists(st.integers(-3, 3), max_size=6),
          replay=st.integers(0, 3))
    def mirror(self, chat: str, slots: list[int], replay: int) -> None:
        """The bridge's bulk write, some rows replayed."""
        again = [mirrored(self.cids[c], self.accounts["ann"], "ann", g, ts, f"body {g[1:]}")
                 for c, g, ts in self.guids[-replay:]] if replay else []
        fresh = self._messages(chat, slots)
        tx(self.conn, mirror_store.write_mirrored_batch, MirrorBatch(tuple(fresh + again)), NOW)
        if fresh:
            self.changed.add(self.cids[chat])

    @rule(chat=st.sampled_from(CHATS), slots=st.lists(st.integers(-3, 3), min_size=1,
                                                     max_size=4))
    def repair(self, chat: str, slots: list[int]) -> None:
        """The gaps reconciler's repair: messages fetched from legacy, through mirror_changes."""
        msgs = []
        for s in slots:
            self.n += 1
            ts = BASE + s * SLOT + (self.n * 104729) % SLOT
            msgs.append(wire.ChatMessage(chat_id=chat, guid=f"r{self.n}", legacy_seq=self.n,
                                         sender="ben", ts_ms=ts, body=f"fetched {self.n}",
                                         origin="legacy"))
        tx(self.conn, mirror_changes, LegacyChanges(messages=msgs), NOW)
        self.changed.add(self.cids[chat])

    @rule(chat=st.sampled_from(CHATS))
    def post(self, chat: str) -> None:
        """A cloud client's post, queued for legacy (its members are in phase dual): it has
        its legacy GUID, so its digest, at once."""
        self.posted += 1
        tx(self.conn, messages_store.post_message, self.cids[chat], self.accounts["ben"],
           f"c{self.posted}", f"posted {self.posted}", NOW + self.posted)
        self.changed.add(self.cids[chat])

    def _claim(self, limit: int) -> list[outbox_store.OutboxItem]:
        return [i for i in tx(self.conn, outbox_store.claim_outbox, NOW, limit, 60_000)
                if i.kind == outbox_store.MESSAGE]

    @rule(limit=st.integers(1, 5))
    def inject(self, limit: int) -> None:
        """The bridge injected posts into legacy: their messages had their GUIDs already,
        so nothing digested changes."""
        done = [outbox_store.Injected(i, i.legacy_chat_id or "chat-a",
                                      f"cloud:{i.message_id}") for i in self._claim(limit)]
        before = tx(self.conn, digests_store.dirty_versions)
        tx(self.conn, outbox_store.complete_outbox_batch, done, NOW)
        assert tx(self.conn, digests_store.dirty_versions) == before  # no message written

    @rule()
    def give_up(self) -> None:
        """The injector gave a row up: its message takes its GUID back (legacy never had
        it), so it leaves the digests."""
        for item in self._claim(1):
            had = self.conn.execute(  # a message pruned since it was posted has nothing
                "SELECT 1 FROM messages WHERE message_id = %s", (item.message_id,)).fetchone()
            assert tx(self.conn, outbox_store.fail_outbox_item, item, "given up", NOW)
            if had:
                self.changed.add(item.conversation_id)

    @rule(slot=st.integers(-3, 4))
    def prune(self, slot: int) -> None:
        """Retention: every message older than a moment goes (any DELETE is subtracted)."""
        gone = self.conn.execute("DELETE FROM messages WHERE sent_ms < %s "
                                 "RETURNING conversation_id, legacy_guid",
                                 (BASE + slot * SLOT + SLOT // 3,)).fetchall()
        self.changed |= {c for c, g in gone if g is not None}
        self.guids = [x for x in self.guids if x[2] >= BASE + slot * SLOT + SLOT // 3]

    @rule(really=st.integers(0, 9))
    def truncate(self, really: int) -> None:
        """Now and then every message goes at once (TRUNCATE deletes no row one by one)."""
        if really:
            return
        self.conn.execute("TRUNCATE messages")
        self.guids = []
        self.changed = set(self.cids.values())

    @rule(chat=st.sampled_from(CHATS), slots=st.lists(st.integers(-3, 3), min_size=1,
                                                     max_size=4))
    def crash(self, chat: str, slots: list[int]) -> None:
        """A write whose transaction dies after the insert: neither messages nor digests."""
        fresh = self._messages(chat, slots)
        del self.guids[-len(fresh):]
        with pytest.raises(RuntimeError):
            with self.conn.transaction():
                mirror_store.write_mirrored_batch(self.conn, MirrorBatch(tuple(fresh)), NOW)
                raise RuntimeError("the process died")

    @rule(watermark_slot=st.integers(-3, 5))
    def clean_compare(self, watermark_slot: int) -> None:
        """A compare found everything equal: what has nothing at or past the watermark leaves
        the dirty set."""
        read = tx(self.conn, digests_store.dirty_versions)
        watermark = BASE + watermark_slot * SLOT
        tops = dict(self.conn.execute("SELECT conversation_id, top_ms FROM digest_dirty"
                                      ).fetchall())
        tx(self.conn, digests_store.clear_dirty, read, watermark)
        self.changed = {c for c in self.changed if tops.get(c, watermark) >= watermark}

    @rule(start=st.integers(-4 * SLOT, 4 * SLOT), length=st.integers(0, 5 * SLOT),
          chat=st.sampled_from(CHATS))
    def window(self, start: int, length: int, chat: str) -> None:
        """Any window's root from the slots equals the scan's, read alone or with others."""
        cid = self.cids[chat]
        got = tx(self.conn, digests_store.window_root, cid, BASE + start, BASE + start + length)
        assert got.digests == [tx(self.conn, digests_store.range_digest, cid, BASE + start,
                                  BASE + start + length)]
        many = tx(self.conn, digests_store.window_roots, list(self.cids.values()),
                  BASE + start, BASE + start + length)
        assert many[cid] == got

    @invariant()
    def slots_equal_scratch(self) -> None:
        assert (tx(self.conn, digests_store.maintained_slots)
                == tx(self.conn, digests_store.scratch_slots))
        empty = self.conn.execute("SELECT count(*) FROM message_digest_slots WHERE count = 0"
                                  ).fetchone()[0]
        assert empty == 0

    @invariant()
    def dirty_names_the_changed(self) -> None:
        assert self.changed <= set(tx(self.conn, digests_store.dirty_versions))


def test_maintained_digests_equal_scratch_digests_after_any_writes(conn):
    """The state machine above, on the real server."""
    MaintainedDigests.conn = conn
    run_state_machine_as_test(MaintainedDigests, settings=settings(
        max_examples=30, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))
