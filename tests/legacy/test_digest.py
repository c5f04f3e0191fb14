"""The range digest contract: order-independent, sensitive to every change, splittable.

``docs/digest-vectors.json`` holds vectors computed with ``printf | sha256sum`` and ``bc``,
independently of ``legacy/digest.py``; the cloud side checks the same file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from legacy import digest
from legacy.wire import ChatMessage, Digest, Range
from tests.strategies import chat_messages, utf8_text

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "docs" / "digest-vectors.json")
                     .read_text(encoding="utf-8"))
MOD = 2**64

#: Histories with distinct GUIDs, small timestamps so that ranges catch some of them.
histories = st.lists(chat_messages().map(lambda m: attrs.evolve(m, ts_ms=m.ts_ms % 1000)),
                     max_size=12, unique_by=lambda m: m.guid)


@st.composite
def valid_ranges(draw, messages: Sequence[ChatMessage] = (), max_split: int = 8) -> tuple:
    """A well-formed (range, split_bits); the prefix is often that of one of *messages*."""
    split_bits = draw(st.integers(0, max_split))
    most_bits = digest.MAX_PREFIX_BITS - split_bits
    prefix_bits = draw(st.integers(0, min(3, most_bits)) | st.integers(0, most_bits))
    if messages and draw(st.booleans()):
        bucket = digest.guid_bucket(draw(st.sampled_from(messages)).guid)
        prefix = bucket >> (digest.MAX_PREFIX_BITS - prefix_bits) if prefix_bits else 0
    else:
        prefix = draw(st.integers(0, 2**prefix_bits - 1))
    times = [m.ts_ms for m in messages]
    start = draw(st.integers(0, 1000) | st.sampled_from([0, *times]))
    end = draw(st.just(1001) | st.integers(start, 1001) | st.sampled_from([start, *times])
               .map(lambda t: max(t, start)))
    rng = Range(chat_id="c", start_ms=start, end_ms=end, prefix_bits=prefix_bits, prefix=prefix)
    return rng, split_bits


def _vector_messages() -> list[ChatMessage]:
    return [ChatMessage(chat_id=VECTORS["chat_id"], guid=v["guid"], legacy_seq=i + 1,
                        sender=v["sender"], ts_ms=v["ts_ms"], body=v["body"], origin="legacy")
            for i, v in enumerate(VECTORS["messages"])]


# -- the shared vectors ------------------------------------------------------------------------

@pytest.mark.parametrize("v", VECTORS["messages"], ids=lambda v: v["guid"])
def test_message_vectors_are_reproduced(v):
    """message_hash and guid_bucket match the independently computed vectors."""
    assert digest.message_hash(v["guid"], v["sender"], v["ts_ms"], v["body"]) == \
        int(v["message_hash"])
    assert digest.guid_bucket(v["guid"]) == v["bucket"]


def test_vectors_cover_the_awkward_cases():
    """The vector file keeps an empty body, non-ASCII text and a 4-byte UTF-8 character."""
    bodies = [v["body"] for v in VECTORS["messages"]]
    assert "" in bodies
    assert any(not b.isascii() for b in bodies)
    assert any(len(ch.encode()) == 4 for b in bodies for ch in b)


@pytest.mark.parametrize("r", VECTORS["range_digests"],
                         ids=lambda r: f"{r['start_ms']}-{r['end_ms']}/{r['prefix_bits']}")
def test_range_digest_vectors_are_reproduced(r):
    """split_digests and digest_of give the vector's (count, total) for its range."""
    rng = Range(chat_id=r["chat_id"], start_ms=r["start_ms"], end_ms=r["end_ms"],
                prefix_bits=r["prefix_bits"], prefix=r["prefix"])
    assert digest.valid_range(rng) is None
    expected = Digest(count=r["count"], total=int(r["total"]))
    msgs = _vector_messages()
    assert digest.split_digests(msgs, rng, 0) == [expected]
    inside = [m for m in msgs if digest.in_range(rng, m.ts_ms, digest.guid_bucket(m.guid))]
    assert digest.digest_of(inside) == expected


# -- order independence and sensitivity -------------------------------------------------------

@given(histories, st.randoms(use_true_random=False))
def test_equal_histories_have_equal_digests_in_any_order(msgs, rnd):
    """Two stacks holding the same messages agree whatever order they arrived in."""
    shuffled = list(msgs)
    rnd.shuffle(shuffled)
    assert digest.digest_of(shuffled) == digest.digest_of(msgs)


@given(histories, st.data())
def test_digest_ignores_what_only_one_stack_knows(msgs, data):
    """legacy_seq, origin and chat_id are not hashed: each stack numbers messages itself."""
    renumbered = [attrs.evolve(m, legacy_seq=data.draw(st.integers(0, 2**64 - 1)),
                               origin=data.draw(st.sampled_from(["legacy", "cloud", ""])),
                               chat_id="elsewhere") for m in msgs]
    assert digest.digest_of(renumbered) == digest.digest_of(msgs)


@given(histories.filter(bool), st.data())
def test_one_missing_message_changes_the_digest(msgs, data):
    """Dropping any one message changes the digest."""
    i = data.draw(st.integers(0, len(msgs) - 1))
    assert digest.digest_of(msgs[:i] + msgs[i + 1:]) != digest.digest_of(msgs)


@given(histories, chat_messages())
def test_one_extra_message_changes_the_digest(msgs, extra):
    """One message more changes the digest."""
    assert digest.digest_of([*msgs, extra]) != digest.digest_of(msgs)


@given(histories.filter(bool), st.data())
def test_duplicates_change_the_digest(msgs, data):
    """A duplicate changes count and total, and two duplicates do not cancel out as in XOR."""
    m = data.draw(st.sampled_from(msgs))
    base = digest.digest_of(msgs)
    once = digest.digest_of([*msgs, m])
    twice = digest.digest_of([*msgs, m, m])
    assert once.count == base.count + 1 and once.total != base.total
    assert twice.count == base.count + 2 and twice.total != base.total


@given(histories.filter(bool), st.data())
def test_one_altered_message_changes_the_total(msgs, data):
    """Altering the guid, body, sender or ts_ms of one message changes the total."""
    i = data.draw(st.integers(0, len(msgs) - 1))
    m = msgs[i]
    field = data.draw(st.sampled_from(["guid", "body", "sender", "ts_ms"]))
    if field == "ts_ms":
        new = data.draw(st.integers(0, 2**64 - 1).filter(lambda t: t != m.ts_ms))
    else:
        new = data.draw(utf8_text(128).filter(lambda s: s != getattr(m, field)))
    altered = [*msgs[:i], attrs.evolve(m, **{field: new}), *msgs[i + 1:]]
    before, after = digest.digest_of(msgs), digest.digest_of(altered)
    assert after.count == before.count
    assert after.total != before.total


def test_hash_covers_each_field_separately():
    """Moving text from body to sender, or changing only the ts, gives another hash."""
    h = digest.message_hash
    assert h("g", "ab", 1, "c") != h("g", "a", 1, "bc")
    assert h("g", "a", 1, "b") != h("g", "a", 10, "b")
    assert h("g", "a", 1, "b") != h("g", "a", 1, "b ")


# -- splitting ranges ---------------------------------------------------------------------------

@given(histories.flatmap(lambda msgs: st.tuples(st.just(msgs), valid_ranges(msgs))))
def test_split_children_sum_to_the_parent(case):
    """Children's counts and totals (mod 2**64) sum to the parent; each is its sub-range's."""
    msgs, (rng, split_bits) = case
    parent = digest.split_digests(msgs, rng, 0)
    assert parent == [digest.digest_of(
        m for m in msgs if digest.in_range(rng, m.ts_ms, digest.guid_bucket(m.guid)))]
    children = digest.split_digests(msgs, rng, split_bits)
    assert len(children) == 2**split_bits
    assert sum(c.count for c in children) == parent[0].count
    assert sum(c.total for c in children) % MOD == parent[0].total
    for child, sub in zip(children, digest.sub_ranges(rng, split_bits), strict=True):
        assert digest.split_digests(msgs, sub, 0) == [child]


@given(valid_ranges(), st.integers(0, 1001), st.integers(0, 2**32 - 1), st.data())
def test_sub_ranges_partition_the_parent(case, ts_ms, bucket, data):
    """Every (ts, bucket) in the parent is in exactly one child, and none outside it is in any."""
    rng, split_bits = case
    if rng.prefix_bits and data.draw(st.booleans()):
        # Keep the parent's prefix so the interesting side of the property is exercised.
        low = digest.MAX_PREFIX_BITS - rng.prefix_bits
        bucket = (rng.prefix << low) | (bucket & ((1 << low) - 1))
    children = digest.sub_ranges(rng, split_bits)
    assert len(children) == 2**split_bits
    for child in children:
        assert digest.valid_range(child) is None
        assert (child.chat_id, child.start_ms, child.end_ms) == \
            (rng.chat_id, rng.start_ms, rng.end_ms)
        assert child.prefix_bits == rng.prefix_bits + split_bits
    hits = sum(digest.in_range(child, ts_ms, bucket) for child in children)
    assert hits == (1 if digest.in_range(rng, ts_ms, bucket) else 0)


def test_time_window_is_half_open():
    """start_ms is inside a range, end_ms is not."""
    rng = Range(chat_id="c", start_ms=10, end_ms=20, prefix_bits=0, prefix=0)
    assert digest.in_range(rng, 10, 0)
    assert digest.in_range(rng, 19, 2**32 - 1)
    assert not digest.in_range(rng, 20, 0)
    assert not digest.in_range(rng, 9, 0)


def _range(start: int = 0, end: int = 10, prefix_bits: int = 0, prefix: int = 0) -> Range:
    return Range(chat_id="c", start_ms=start, end_ms=end, prefix_bits=prefix_bits, prefix=prefix)


@pytest.mark.parametrize("rng,split_bits,why", [
    (_range(start=11, end=10), 0, "start_ms is after end_ms"),
    (_range(), 9, "split_bits must be at most 8"),
    (_range(prefix_bits=25), 8, "prefix_bits + split_bits must be at most 32"),
    (_range(prefix_bits=33), 0, "prefix_bits + split_bits must be at most 32"),
    (_range(prefix_bits=0, prefix=1), 0, "prefix has more bits than prefix_bits"),
    (_range(prefix_bits=3, prefix=8), 0, "prefix has more bits than prefix_bits"),
    (_range(prefix_bits=31, prefix=2**31), 0, "prefix has more bits than prefix_bits"),
], ids=["start-after-end", "split-9", "bits-33-with-split", "bits-33", "prefix-without-bits",
        "prefix-too-wide", "prefix-32-bits-of-31"])
def test_valid_range_explains_what_is_wrong(rng, split_bits, why):
    """valid_range names the first problem of a malformed range or split."""
    assert digest.valid_range(rng, split_bits) == why


@pytest.mark.parametrize("rng,split_bits", [
    (_range(start=10, end=10), 0),
    (_range(), 8),
    (_range(prefix_bits=24, prefix=2**24 - 1), 8),
    (_range(prefix_bits=32, prefix=2**32 - 1), 0),
], ids=["empty-window", "split-8", "bits-24-split-8", "bits-32"])
def test_valid_range_accepts_the_limits(rng, split_bits):
    """The boundary cases of a well-formed range are accepted."""
    assert digest.valid_range(rng, split_bits) is None


@given(valid_ranges())
def test_generated_ranges_are_valid(case):
    """valid_range accepts every range the contract allows (start <= end, prefix fits)."""
    rng, split_bits = case
    assert digest.valid_range(rng, split_bits) is None
    assume(rng.prefix_bits < 32)
    assert digest.valid_range(attrs.evolve(rng, prefix=rng.prefix | 1 << rng.prefix_bits),
                              split_bits) == "prefix has more bits than prefix_bits"
