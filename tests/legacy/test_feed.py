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


# -- FeedSubscribeOnly: other origins' entries left out -------------------------------------------


def covered(log: FeedLog) -> list[int]:
    """Every offset the frames account for: an entry's own, or a FeedSkipped run's."""
    out: list[int] = []
    for f in log.entries:
        out.extend(range(f.offset, f.next_offset) if isinstance(f, wire.FeedSkipped)
                   else [f.offset])
    return out


def inject(net: LegacyNet, sn_id: str, chat_id: str, n: int, tag: str,
           origin: str = "cloud") -> None:
    """Inject *n* messages of *origin* into *chat_id* in one InjectBatch."""
    peer = net.peer(sn_id, name="injector")
    ts = int(net.clock.seconds() * 1000)
    net.wait(peer.inject_batch(chat_id, MEMBERS, [
        wire.ChatMessage(chat_id=chat_id, guid=f"{tag}-{i}", legacy_seq=0, sender="alice",
                         ts_ms=ts, body=f"body {i}", origin=origin) for i in range(n)]))
    peer.disconnect()


def test_subscribe_only_sends_that_origins_messages_and_skips_runs_of_the_rest():
    """Legacy messages and every member list come whole; each run of other origins'
    messages comes as one FeedSkipped naming its exact range; together the frames cover
    every offset of the feed once, in order."""
    net, sn, chat = setup_home()
    first = append(sn, chat, 3, "a")                 # FeedChat + 3 legacy messages
    inject(net, "sn0", chat, 10, "echo1")            # 10 echoes: one run
    middle = append(sn, chat, 2, "b")
    inject(net, "sn0", chat, 5, "echo2", origin="reconciler")
    peer = net.peer("sn0")
    log = FeedLog()
    peer.subscribe(sn.epoch, 0, 1000, log, only_origin="legacy")
    net.run(1)
    assert covered(log) == list(range(sn.mem.feed.next_offset))
    assert log.guids == first + middle
    skipped = [(f.offset, f.next_offset) for f in log.entries
               if isinstance(f, wire.FeedSkipped)]
    assert skipped == [(4, 14), (16, 21)]
    assert isinstance(log.entries[0], wire.FeedChat)

    live = append(sn, chat, 1, "c")
    inject(net, "sn0", chat, 64, "echo3")  # one InjectBatch: one FeedSkipped, not 64
    net.run(1)
    assert covered(log) == list(range(sn.mem.feed.next_offset))
    assert log.guids == first + middle + live
    assert [(f.offset, f.next_offset) for f in log.entries[-1:]] == [(22, 86)]


def test_a_plain_subscription_still_gets_every_origins_messages():
    """FeedSubscribe (no origin named) gets the injected messages themselves, as before."""
    net, sn, chat = setup_home()
    append(sn, chat, 2, "a")
    inject(net, "sn0", chat, 3, "echo")
    log = FeedLog()
    net.peer("sn0").subscribe(sn.epoch, 0, 1000, log)
    net.run(1)
    assert log.offsets == list(range(sn.mem.feed.next_offset))
    assert log.guids == ["a-0", "a-1", "echo-0", "echo-1", "echo-2"]
    assert not any(isinstance(f, wire.FeedSkipped) for f in log.frames)


def test_a_skipped_run_takes_one_credit_and_waits_for_credit():
    """A FeedSkipped costs one credit like any entry: with none left, nothing is sent, and
    the run and what follows go once credit comes."""
    net, sn, chat = setup_home()
    append(sn, chat, 1, "a")                 # offsets 0 (chat), 1
    inject(net, "sn0", chat, 6, "echo")      # offsets 2..7
    append(sn, chat, 2, "b")                 # offsets 8, 9
    log = FeedLog()
    peer = net.peer("sn0")
    peer.subscribe(sn.epoch, 0, 2, log, only_origin="legacy")
    net.run(1)
    assert covered(log) == [0, 1]
    peer.credit(1)
    net.run(1)
    assert covered(log) == list(range(8))    # the whole run in one frame
    peer.credit(1)
    net.run(1)
    assert covered(log) == list(range(9))
    inject(net, "sn0", chat, 3, "echo-late")  # offsets 10..12: no credit for their run yet
    peer.credit(1)
    net.run(1)
    assert covered(log) == list(range(10))
    peer.credit(5)
    net.run(1)
    assert covered(log) == list(range(13))
    assert [(f.offset, f.next_offset) for f in log.entries if isinstance(f, wire.FeedSkipped)
            ] == [(2, 8), (10, 13)]


def test_a_skipping_subscriber_overtaken_by_eviction_still_gets_the_gap():
    """Leaving entries out never hides a gap: eviction past the subscriber is a FeedStatus."""
    net, sn, chat = setup_home(feed_capacity=5)
    append(sn, chat, 1, "early")  # offsets 0, 1
    peer = net.peer("sn0")
    log = FeedLog()
    peer.subscribe(sn.epoch, 0, 2, log, only_origin="legacy")
    net.run(1)
    inject(net, "sn0", chat, 8, "echo")  # offsets 2..9; the buffer holds 5..9
    append(sn, chat, 1, "late")          # offset 10; the buffer holds 6..10
    peer.credit(10)
    net.run(1)
    gaps = [(g.gap, g.gap_from, g.gap_to) for g in log.statuses[1:]]
    assert gaps == [("expired", 2, 6)]
    assert covered(log) == [0, 1, *range(6, 11)]
    assert log.guids == ["early-0", "late-0"]


def test_subscribe_only_skips_other_origins_presence_and_always_sends_member_lists():
    """Presence is left out like messages when another origin published it; a member list
    comes whatever its origin (the bridge remembers its own); legacy presence comes."""
    net, sn, chat = setup_home()
    append(sn, chat, 1, "a")                                            # offsets 0, 1
    peer = net.peer("sn0", name="injector")
    net.wait(peer.inject_presence("alice", "away", 60_000, "cloud"))    # 2: skipped
    net.wait(peer.inject_membership(chat, ("carol",), (), "cloud"))     # 3: sent
    sn.presence.publish("bob", "online", "legacy")                      # 4: sent
    net.wait(peer.inject_presence("bob", "busy", 60_000, "cloud"))      # 5: skipped
    log = FeedLog()
    net.peer("sn0").subscribe(sn.epoch, 0, 1000, log, only_origin="legacy")
    net.run(1)
    assert covered(log) == list(range(sn.mem.feed.next_offset)) == list(range(6))
    kinds = [(type(f).__name__, getattr(f, "origin", None)) for f in log.entries]
    assert kinds == [("FeedChat", "legacy"), ("FeedMessage", None), ("FeedSkipped", None),
                     ("FeedChat", "cloud"), ("FeedPresence", "legacy"), ("FeedSkipped", None)]
    assert log.entries[3].members == ("alice", "bob", "carol")


def test_a_held_append_that_evicts_sends_the_oldest_entry_first():
    """An InjectBatch larger than a small feed buffer: a subscriber with credit still gets
    every entry, none of them evicted while the batch held the pump."""
    net, sn, chat = setup_home(feed_capacity=5)
    append(sn, chat, 1, "a")  # offsets 0, 1
    log = FeedLog()
    net.peer("sn0").subscribe(sn.epoch, 0, 1000, log)
    net.run(1)
    inject(net, "sn0", chat, 12, "echo")  # offsets 2..13, more than the buffer holds
    net.run(1)
    assert log.statuses[1:] == []
    assert log.offsets == list(range(14))
