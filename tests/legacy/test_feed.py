"""The supernode change feed: positions, gaps, resume from a checkpoint, credit flow control."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legacy import wire
from legacy.feed import Feed, FeedPosition
from legacy.supernode import Supernode
from tests.legacy.netfixture import LegacyNet

# -- Feed.position_for ------------------------------------------------------------------------


def feed_with(epoch: int, capacity: int, entries: int) -> Feed:
    feed = Feed(epoch, capacity)
    for _ in range(entries):
        feed.append(lambda o: ("entry", o))
    return feed


def test_epoch_zero_starts_at_the_beginning_of_an_unwrapped_feed():
    """Epoch 0 means 'from the start': no gap while nothing has been evicted."""
    assert feed_with(7, 10, 4).position_for(0, 0) == FeedPosition(0, "none")


def test_epoch_zero_on_a_wrapped_feed_reports_the_evicted_prefix():
    """Epoch 0 on a feed that evicted entries reports [0, first_offset) as expired."""
    feed = feed_with(7, 3, 5)
    assert feed.position_for(0, 0) == FeedPosition(2, "expired", 7, 0, 2)


@pytest.mark.parametrize("offset", [2, 3, 4, 5])
def test_same_epoch_in_range_resumes_exactly_there(offset):
    """An offset of this epoch still in the buffer (or at its head) resumes with no gap."""
    feed = feed_with(7, 3, 5)  # holds offsets 2, 3, 4; next is 5
    assert feed.position_for(7, offset) == FeedPosition(offset, "none")


def test_offset_older_than_the_buffer_is_an_expired_gap_with_the_exact_range():
    """An evicted offset resumes at first_offset and reports [offset, first_offset) expired."""
    feed = feed_with(7, 3, 10)  # holds 7, 8, 9
    assert feed.position_for(7, 3) == FeedPosition(7, "expired", 7, 3, 7)


def test_another_epoch_is_an_epoch_gap_from_the_old_offset():
    """A checkpoint of another epoch resumes at first_offset with gap 'epoch' from its offset."""
    feed = feed_with(7, 3, 10)
    assert feed.position_for(99, 4) == FeedPosition(7, "epoch", 99, 4, 0)


def test_offset_in_the_future_is_an_ahead_gap_resuming_at_the_feed_start():
    """An offset past the head of the feed (another incarnation's) is an 'ahead' gap from
    that offset, resumed at the start of this feed: never clamped to the head."""
    assert feed_with(7, 3, 5).position_for(7, 6) == FeedPosition(2, "ahead", 7, 6, 0)


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 1500), appends=st.integers(0, 4000))
def test_get_returns_every_buffered_entry_by_its_offset(capacity, appends):
    """``get`` answers every offset still in the buffer with the entry appended at it, also
    after evictions have been cut off the list's head in bulk; any other offset raises."""
    feed = feed_with(7, capacity, appends)
    assert feed.next_offset == appends
    assert feed.first_offset == max(0, appends - capacity)
    for offset in range(feed.first_offset, feed.next_offset):
        assert feed.get(offset) == ("entry", offset)
    for outside in (feed.first_offset - 1, feed.next_offset):
        with pytest.raises(IndexError):
            feed.get(outside)


def test_feed_capacity_must_be_positive():
    """A feed without room for one entry is a configuration error."""
    with pytest.raises(ValueError):
        Feed(1, 0)


# -- over a peer connection ---------------------------------------------------------------------


class FeedLog:
    """A feed handler that keeps every frame it is given."""

    def __init__(self) -> None:
        self.frames: list[Any] = []

    def __call__(self, f: Any) -> None:
        self.frames.append(f)

    @property
    def statuses(self) -> list[wire.FeedStatus]:
        return [f for f in self.frames if isinstance(f, wire.FeedStatus)]

    @property
    def entries(self) -> list[Any]:
        return [f for f in self.frames if not isinstance(f, wire.FeedStatus)]

    @property
    def offsets(self) -> list[int]:
        return [f.offset for f in self.entries]

    @property
    def guids(self) -> list[str]:
        return [f.message.guid for f in self.entries if isinstance(f, wire.FeedMessage)]


MEMBERS = ("alice", "bob")


def append(sn: Supernode, chat_id: str, n: int, tag: str) -> list[str]:
    """Append *n* messages at their home SN; returns their GUIDs."""
    guids = [f"{tag}-{i}" for i in range(n)]
    for g in guids:
        sn.accept(chat_id, MEMBERS, g, "alice", f"body {g}", "legacy")
    return guids


def setup_home(**config: Any) -> tuple[LegacyNet, Supernode, str]:
    net = LegacyNet(3, **config).start()
    return net, net.supernodes["sn0"], net.chat_homed_at("sn0")


def test_resume_from_a_checkpoint_replays_exactly_what_was_missed():
    """A subscriber resuming from (epoch, offset) gets exactly the entries it missed, in order."""
    net, sn, chat = setup_home()
    first = append(sn, chat, 5, "a")
    p1 = net.peer("sn0")
    log1 = FeedLog()
    p1.subscribe(sn.epoch, 0, 1000, log1)
    net.run(1)
    assert [(s.epoch, s.gap) for s in log1.statuses] == [(sn.epoch, "none")]
    assert log1.offsets == list(range(sn.mem.feed.next_offset))
    assert log1.guids == first
    checkpoint = (log1.statuses[0].epoch, log1.offsets[-1] + 1)
    p1.disconnect()
    net.run(1)

    missed = append(sn, chat, 7, "b")
    p2 = net.peer("sn0")
    log2 = FeedLog()
    p2.subscribe(*checkpoint, 1000, log2)
    net.run(1)
    assert [s.gap for s in log2.statuses] == ["none"]
    assert log2.offsets == list(range(checkpoint[1], sn.mem.feed.next_offset))
    assert log2.guids == missed

    live = append(sn, chat, 2, "c")
    net.run(1)
    assert log2.offsets == list(range(checkpoint[1], sn.mem.feed.next_offset))
    assert log2.guids == missed + live


def test_feed_window_limits_delivery_until_credit_is_granted():
    """With window N only N entries arrive; each FeedCredit lets exactly that many more through."""
    net, sn, chat = setup_home()
    append(sn, chat, 10, "m")  # one FeedChat and ten FeedMessage entries
    total = sn.mem.feed.next_offset
    assert total == 11
    peer = net.peer("sn0")
    log = FeedLog()
    peer.subscribe(sn.epoch, 0, 3, log)
    net.run(2)
    assert log.offsets == [0, 1, 2]
    net.run(30)
    assert log.offsets == [0, 1, 2]

    peer.credit(4)
    net.run(1)
    assert log.offsets == list(range(7))
    peer.credit(5)
    net.run(1)
    assert log.offsets == list(range(total))
    append(sn, chat, 3, "later")  # one credit left: one live entry, then nothing
    net.run(1)
    assert log.offsets == list(range(total + 1))
    peer.credit(10)
    net.run(1)
    assert log.offsets == list(range(total + 3))


def test_restarted_supernode_has_a_new_epoch_and_reports_an_epoch_gap():
    """After crash and restart the SN has a new epoch; an old checkpoint gets gap 'epoch'."""
    net, sn, chat = setup_home()
    append(sn, chat, 4, "before")
    old_epoch, old_offset = sn.epoch, sn.mem.feed.next_offset
    net.wait(sn.crash())
    net.run(1)
    net.wait(sn.restart())
    assert sn.epoch not in (0, old_epoch)
    after = append(sn, chat, 2, "after")

    peer = net.peer("sn0")
    assert peer.epoch == sn.epoch
    log = FeedLog()
    peer.subscribe(old_epoch, old_offset, 100, log)
    net.run(1)
    [status] = log.statuses
    assert status.epoch == sn.epoch
    assert (status.gap, status.gap_epoch, status.gap_from) == ("epoch", old_epoch, old_offset)
    assert log.offsets == list(range(sn.mem.feed.next_offset))
    assert log.guids == after


def test_offset_older_than_a_small_buffer_is_reported_expired_not_skipped():
    """Subscribing below the buffer gets FeedStatus gap 'expired' for exactly the lost range."""
    net, sn, chat = setup_home(feed_capacity=5)
    append(sn, chat, 10, "m")  # offsets 0..10; the buffer holds 6..10
    peer = net.peer("sn0")
    log = FeedLog()
    peer.subscribe(sn.epoch, 2, 100, log)
    net.run(1)
    [status] = log.statuses
    assert (status.gap, status.gap_epoch, status.gap_from, status.gap_to) == (
        "expired", sn.epoch, 2, 6)
    assert (status.first_offset, status.next_offset) == (6, 11)
    assert log.offsets == [6, 7, 8, 9, 10]


def test_subscriber_that_falls_behind_the_buffer_gets_a_gap_status():
    """A slow subscriber overtaken by eviction is told the exact gap before the stream goes on."""
    net, sn, chat = setup_home(feed_capacity=5)
    append(sn, chat, 2, "early")  # offsets 0..2
    peer = net.peer("sn0")
    log = FeedLog()
    peer.subscribe(sn.epoch, 0, 2, log)
    net.run(1)
    assert log.offsets == [0, 1]
    append(sn, chat, 10, "burst")  # offsets 3..12; the buffer now holds 8..12
    net.run(1)
    assert log.offsets == [0, 1]

    peer.credit(100)
    net.run(1)
    gaps = log.statuses[1:]
    assert [(g.gap, g.gap_epoch, g.gap_from, g.gap_to) for g in gaps] == [
        ("expired", sn.epoch, 2, 8)]
    assert log.offsets == [0, 1, 8, 9, 10, 11, 12]
    # the gap status comes right before the first entry after the gap
    assert log.frames.index(gaps[0]) == log.frames.index(log.entries[2]) - 1


def test_subscribing_ahead_of_the_feed_gets_an_ahead_gap_and_the_whole_feed():
    """A checkpoint beyond the feed's end in its epoch is answered with an 'ahead' gap and
    the feed from its start, on a connection that stays open (no refusal to loop on)."""
    net, sn, chat = setup_home(feed_capacity=5)
    guids = append(sn, chat, 8, "m")  # offsets 0..8 (chat + 8 messages); buffer 4..8
    peer = net.peer("sn0")
    log = FeedLog()
    peer.subscribe(sn.epoch, sn.mem.feed.next_offset + 5, 100, log)
    net.run(1)
    [status] = log.statuses
    assert (status.gap, status.gap_epoch, status.gap_from, status.gap_to) == (
        "ahead", sn.epoch, 14, 0)
    assert (status.epoch, status.first_offset, status.next_offset) == (sn.epoch, 4, 9)
    assert log.offsets == [4, 5, 6, 7, 8] and log.guids == guids[3:]
    assert not peer.closed.called and len(sn.mem.feed_subs) == 1
