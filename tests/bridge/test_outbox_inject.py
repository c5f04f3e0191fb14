"""How the outbox injector packs a conversation's rows into requests, and bounds the rows in
flight (bridge/outbox_inject.py): pure values, no network or database."""

from __future__ import annotations

import uuid

import pytest
from twisted.internet import defer

from bridge.outbox_inject import Row, RowWindow, message_size, plan_requests
from cloud.store.outbox import MEMBERS, Injected, OutboxItem
from legacy import wire

CID = uuid.UUID(int=1)
CHAT = "chat-1"


def message_row(seq: int, members: tuple = ("alice", "bob"), body: str = "hi",
                chat_id: str = CHAT) -> Row:
    item = OutboxItem(CID, seq, uuid.UUID(int=seq), chat_id, "alice", 1, body, members, 2, 1)
    message = wire.ChatMessage(chat_id=chat_id, guid=f"g{seq}", legacy_seq=0, sender="alice",
                               ts_ms=1, body=body, origin="cloud")
    return Row(Injected(item, chat_id, f"g{seq}"), message, members)


def membership_row(seq: int) -> Row:
    item = OutboxItem(CID, seq, None, CHAT, "alice", 1, "", ("alice", "bob"), 2, 1, sub=1,
                      kind=MEMBERS, add_handles=("carol",))
    return Row(Injected(item, CHAT, None))


def shape(requests) -> list[tuple]:
    return [("members" if r.members is None else "batch", [row.item.seq for row in r.rows])
            for r in requests]


def test_runs_of_messages_share_a_batch_and_a_membership_change_goes_alone():
    """Message rows in a row with one chat and member list are one batch; a membership row,
    a new member list or a new chat starts another; order is kept."""
    rows = [message_row(1), message_row(2), membership_row(3), message_row(4),
            message_row(5, members=("alice", "bob", "carol")), message_row(6, chat_id="c2"),
            message_row(7, chat_id="c2")]
    assert shape(plan_requests(rows, 64)) == [
        ("batch", [1, 2]), ("members", [3]), ("batch", [4]), ("batch", [5]),
        ("batch", [6, 7])]


def test_a_batch_holds_at_most_the_given_rows():
    """*most* bounds the rows of one batch."""
    assert shape(plan_requests([message_row(i) for i in range(1, 8)], 3)) == [
        ("batch", [1, 2, 3]), ("batch", [4, 5, 6]), ("batch", [7])]


def test_a_batch_is_cut_where_the_next_message_would_not_fit_a_frame():
    """Long bodies: every batch's frame stays within MAX_FRAME_BYTES (the size counted is
    the size encoded), and a batch is cut only when the next message would not fit."""
    body = "é" * wire.MAX_MESSAGE_CHARS  # 8,000 bytes
    rows = [message_row(i, body=body) for i in range(1, 20)]
    requests = plan_requests(rows, 64)
    assert len(requests) > 1 and sum(len(r.rows) for r in requests) == 19
    for r in requests:
        frame = wire.encode(wire.InjectBatch(req_id=2**32 - 1, chat_id=r.chat_id,
                                             members=r.members,
                                             messages=[row.message for row in r.rows]))
        assert len(frame) == r.size <= wire.MAX_FRAME_BYTES
    for r in requests[:-1]:
        assert r.size + message_size(rows[0].message) > wire.MAX_FRAME_BYTES


def test_a_row_the_wire_can_not_carry_is_named():
    """unencodable names the wire format's refusal of a row alone, None for one that fits."""
    fine, long_sender = message_row(1), message_row(2)
    long_sender = Row(long_sender.injected,
                      wire.ChatMessage(chat_id=CHAT, guid="g2", legacy_seq=0, sender="s" * 129,
                                       ts_ms=1, body="", origin="cloud"), fine.members)
    [request] = plan_requests([fine, long_sender], 64)
    assert request.unencodable(fine) is None
    assert request.unencodable(long_sender).startswith("too_long")


def test_the_window_lets_rows_in_up_to_its_limit_in_the_order_asked():
    """take() is immediate while the rows fit; then waiters are let in in order as rows are
    given back, a large request not overtaken by a small one behind it."""
    window = RowWindow(4)
    assert window.take(3) is None
    big, small = window.take(4), window.take(1)
    assert not big.called and not small.called  # the small one would fit, but waits its turn
    window.give_back(3)
    assert big.called and not small.called and window.used == 4
    window.give_back(4)
    assert small.called and window.used == 1
    larger = window.take(5)  # more than the limit: it goes alone, once nothing is in flight
    assert not larger.called
    window.give_back(1)
    assert larger.called and window.used == 5


def test_a_resized_window_lets_waiters_in_at_once_or_as_answers_come():
    """A raise lets waiters in at once; a cut holds new requests until the rows in flight
    are under it, and no request in flight is cut short."""
    window = RowWindow(2)
    assert window.take(2) is None
    waiting = window.take(2)
    window.resize(4)
    assert waiting.called and window.used == 4
    window.resize(1)
    later = window.take(1)
    window.give_back(2)
    assert not later.called  # 2 still in flight, over the new limit of 1
    window.give_back(2)
    assert later.called and window.used == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            window.resize(bad)
    assert window.limit == 1


def test_a_cancelled_wait_for_the_window_takes_nothing():
    """A waiter that gives up is forgotten: the rows it asked for are not taken."""
    window = RowWindow(2)
    assert window.take(2) is None
    waiting = window.take(2)
    caught: list[BaseException] = []
    waiting.addErrback(lambda f: caught.append(f.value))
    waiting.cancel()
    assert [type(e) for e in caught] == [defer.CancelledError]
    window.give_back(2)
    assert window.used == 0
