"""The supernode's maintained digests (legacy/digest_tree.py) answer every range as a scan
of the history would, and touch a bounded part of the chat to do it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from legacy import digest
from legacy.digest_tree import SLOT_BITS, SLOT_MS, TOTAL_BITS, ChatDigestTree, Work
from legacy.supernode.state import ChatState
from legacy.wire import ChatMessage, Range

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "docs" / "digest-vectors.json")
                     .read_text(encoding="utf-8"))
CHAT = "chat-t"
SPAN = 5 * SLOT_MS
#: moments near slot edges, where the fast path splits a slot
EDGES = [k * SLOT_MS + d for k in range(6) for d in (-1, 0, 1)]
times = st.sampled_from(EDGES).filter(lambda t: t > 0) | st.integers(1, SPAN)


def message(guid: str, ts_ms: int, body: str, seq: int = 1) -> ChatMessage:
    return ChatMessage(chat_id=CHAT, guid=guid, legacy_seq=seq, sender="alice", ts_ms=ts_ms,
                       body=body, origin="legacy")


@st.composite
def requests(draw, history: dict) -> tuple[Range, int]:
    """A valid (range, split_bits), its prefix often that of a held message."""
    split = draw(st.integers(0, 8))
    pbits = draw(st.sampled_from([0, 0, 4, 8]) | st.integers(0, 32 - split))
    if history and draw(st.booleans()):
        b = digest.guid_bucket(draw(st.sampled_from(sorted(history))))
        prefix = b >> (32 - pbits) if pbits else 0
    else:
        prefix = draw(st.integers(0, (1 << pbits) - 1))
    bounds = st.sampled_from(EDGES).map(lambda t: max(t, 0)) | st.integers(0, SPAN + 2)
    if history:
        bounds |= st.sampled_from(sorted({m.ts_ms + d for m in history.values()
                                          for d in (0, 1)}))
    lo, hi = sorted((draw(bounds), draw(bounds | st.just(2**63))))
    return Range(chat_id=CHAT, start_ms=lo, end_ms=hi, prefix_bits=pbits, prefix=prefix), split


class MaintainedDigests(RuleBasedStateMachine):
    """Appends (duplicates too), retention prunes, crashes and restarts, and digest requests:
    the tree's answer is always the from-scratch ``split_digests`` over the history."""

    @initialize()
    def start(self) -> None:
        self.chat = ChatState(members=("alice", "bob"))
        self.now = SPAN

    @rule(batch=st.lists(st.tuples(st.integers(0, 60).map(lambda i: f"g{i}"), times,
                                   st.text(max_size=3)), min_size=1, max_size=12))
    def append(self, batch: list) -> None:
        """As routing.accept does: a GUID the chat holds is a duplicate, and changes nothing."""
        for guid, ts, body in batch:
            if guid not in self.chat.history:
                self.chat.add(message(guid, ts, body, self.chat.next_seq))
                self.chat.next_seq += 1

    @rule(horizon=times)
    def prune(self, horizon: int) -> None:
        """As routing.sweep does: drop from the oldest appended while older than *horizon*."""
        history = self.chat.history
        while history and history[next(iter(history))].ts_ms < horizon:
            self.chat.drop(next(iter(history)))

    @precondition(lambda self: self.chat.history)
    @rule(data=st.data())
    def drop_any(self, data: st.DataObject) -> None:
        """Any held message can be dropped, not only the oldest."""
        self.chat.drop(data.draw(st.sampled_from(sorted(self.chat.history))))

    @rule(lose=st.booleans())
    def restart(self, lose: bool) -> None:
        """A crash loses the memory: the chat starts again empty. A chat made from a history
        (as a preload does) builds its tree from that history."""
        self.chat = ChatState(members=self.chat.members, next_seq=self.chat.next_seq,
                              history={} if lose else dict(self.chat.history))

    @precondition(lambda self: self.chat.history)
    @rule(data=st.data())
    def ask(self, data: st.DataObject) -> None:
        rng, split = data.draw(requests(self.chat.history))
        assert digest.valid_range(rng, split) is None
        assert (self.chat.digests.split_digests(rng, split)
                == digest.split_digests(self.chat.history.values(), rng, split))
        # a list of the range's GUIDs, from the stored buckets, is what a scan finds
        assert self.chat.digests.guids_in(rng) == sorted(
            (m.ts_ms, m.guid) for m in self.chat.history.values()
            if digest.in_range(rng, m.ts_ms, digest.guid_bucket(m.guid)))

    @invariant()
    def whole(self) -> None:
        """The whole chat, as the reconciler's descent asks for it (0, 4 and 8 bits): always
        as a scan gives."""
        for pbits, prefix, split in ((0, 0, 0), (0, 0, 4), (4, 3, 4), (4, 9, 2)):
            rng = Range(chat_id=CHAT, start_ms=0, end_ms=2**63, prefix_bits=pbits,
                        prefix=prefix)
            assert (self.chat.digests.split_digests(rng, split)
                    == digest.split_digests(self.chat.history.values(), rng, split))

    @invariant()
    def bounded(self) -> None:
        """The tree holds what the history holds; a slot at most 17 nodes, the chat 273."""
        tree = self.chat.digests
        assert len(tree) == len(self.chat.history)
        assert sum(len(s.guids) for s in tree.slots.values()) == len(self.chat.history)
        assert sorted(tree.slots) == tree.slot_ids
        assert len(tree.total) <= sum(1 << b for b in TOTAL_BITS)
        for slot in tree.slots.values():
            ts = [self.chat.history[g].ts_ms for g in slot.guids]
            assert ts == sorted(ts)
            assert list(slot.buckets) == [digest.guid_bucket(g) for g in slot.guids]
            assert 0 < len(slot.nodes) <= sum(1 << b for b in SLOT_BITS)


TestMaintainedDigests = MaintainedDigests.TestCase
TestMaintainedDigests.settings = settings(max_examples=80, stateful_step_count=40,
                                          deadline=None)


def test_the_tree_answers_the_shared_vectors():
    """Built from the vectors' messages, the tree gives the vectors' range digests."""
    chat = VECTORS["chat_id"]
    msgs = [ChatMessage(chat_id=chat, guid=v["guid"], legacy_seq=i + 1, sender=v["sender"],
                        ts_ms=v["ts_ms"], body=v["body"], origin="legacy")
            for i, v in enumerate(VECTORS["messages"])]
    history = {m.guid: m for m in msgs}
    tree = ChatDigestTree.of(history)
    for case in VECTORS["range_digests"]:
        rng = Range(chat_id=chat, start_ms=case["start_ms"], end_ms=case["end_ms"],
                    prefix_bits=case["prefix_bits"], prefix=case["prefix"])
        [got] = tree.split_digests(rng, 0)
        assert (got.count, got.total) == (case["count"], int(case["total"]))


@functools.cache
def _chat_of(n: int, now: int) -> tuple[ChatState, Range]:
    """A chat of *n* messages spread over the 29 days before *now*, and the window a gaps
    pass asks for (from the retention floor to 10 s before now)."""
    span = 29 * 86_400_000
    history = {}
    for i in range(n):
        m = message(f"m{i}", now - span + i * span // n, f"body {i}", i + 1)
        history[m.guid] = m
    chat = ChatState(members=("alice", "bob"), next_seq=n + 1, history=history)
    window = Range(chat_id=CHAT, start_ms=now - 30 * 86_400_000 + 3_600_000,
                   end_ms=now - 10_000, prefix_bits=0, prefix=0)
    return chat, window


@pytest.mark.parametrize(("pbits", "prefix", "split"), [(0, 0, 0), (0, 0, 4), (4, 3, 4)])
def test_a_pass_window_touches_the_same_few_nodes_at_any_length(pbits, prefix, split):
    """At 10^3 and at 10^5 messages, each request of a gaps pass's descent (0, 4, then 8
    bits) over its window reads the chat's total, the slot outside the window, and hashes
    no message but the two ends of a bisection: the same count at both lengths, not N."""
    now = 1_800_000_000_000
    touched = {}
    for n in (1_000, 100_000):
        chat, window = _chat_of(n, now)
        rng = attrs.evolve(window, prefix_bits=pbits, prefix=prefix)
        tree = chat.digests
        tree.work, tree.fallbacks = Work(), 0
        got = tree.split_digests(rng, split)
        touched[n] = (tree.work.nodes, tree.work.messages)
        assert tree.fallbacks == 0
        assert got == digest.split_digests(chat.history.values(), rng, split)
    assert touched[1_000] == touched[100_000]
    assert touched[100_000] == (1 << split, 2)


def test_a_request_deeper_than_the_tree_is_answered_by_a_counted_scan():
    """Children deeper than 8 bits are summed from the window's messages: still exact, and
    counted as a fallback."""
    chat, window = _chat_of(500, 1_800_000_000_000)
    rng = Range(chat_id=CHAT, start_ms=window.start_ms, end_ms=window.end_ms,
                prefix_bits=8, prefix=3)
    assert (chat.digests.split_digests(rng, 4)
            == digest.split_digests(chat.history.values(), rng, 4))
    assert chat.digests.fallbacks == 1


def test_dropping_a_message_the_tree_does_not_hold_is_a_key_error_that_changes_nothing():
    """A remove of what was never added raises, and the tree still answers as before."""
    tree = ChatDigestTree.of({"a": message("a", 5, "x")})
    with pytest.raises(KeyError):
        tree.remove(message("b", 5, "y"))
    with pytest.raises(KeyError):
        tree.remove(message("c", 3 * SLOT_MS, "z"))
    assert len(tree) == 1


def test_a_slot_width_must_be_positive():
    """A zero slot width is refused with a clear error."""
    with pytest.raises(ValueError, match="slot_ms must be positive"):
        ChatDigestTree({}, 0)
