"""Cloud -> legacy: how the outbox injector (``bridge.outbox``) packs one conversation's rows
into requests, and how it bounds the rows in flight.

A conversation's claimed rows, in seq order, become requests on the one connection to its
chat's home supernode, sent in that order::

    rows:      m1  m2  m3  (+carol)  m4  m5     m: a message row; (+carol): a membership row
    requests:  InjectBatch(m1 m2 m3)  InjectMembership(+carol)  InjectBatch(m4 m5)

A run of message rows with one member list shares one InjectBatch, up to ``inject_batch``
rows (``InjectorConfig``) and what fits in a frame; a membership change is a request of its
own. The home answers each request with one outcome per row, in order (``Request.send``).
One request per run instead of one per row is what cut the CPU per injected message on both
sides: one frame, one deadline and one reply per batch, not per message.
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.internet import defer, error

from bridge.outbox_membership import ORIGIN, inject_membership_change
from cloud.store.outbox import Injected, OutboxItem
from legacy import wire
from legacy.peer import PeerConnection, PeerRefused, PeerRequestFailed

#: The result statuses of an injected message that mean done.
MESSAGE_ACCEPTED = ("new", "duplicate")
#: Failure codes that refuse a row for good (anything else: try again later).
REFUSALS = ("bad_message", "bad_members")

#: Failures of a request that only mean "not now": its rows are released and retried.
_TRANSIENT = (defer.TimeoutError, error.ConnectionLost, error.ConnectionDone,
              error.ConnectError, PeerRefused)

# An InjectBatch frame: version and type, req_id, then the chat id, the member list and the
# message count; each message: five strings (a u16 length each) and two u64s.
_FRAME_FIXED = 2 + 4 + 2 + 2 + 2
_MESSAGE_FIXED = 5 * 2 + 2 * 8


def _utf8_len(s: str) -> int:
    # surrogatepass never raises: a string the codec refuses is counted, then refused when
    # the frame is built (WireError)
    return len(s.encode("utf-8", "surrogatepass"))


def message_size(m: wire.ChatMessage) -> int:
    """The bytes *m* takes in an InjectBatch frame."""
    return (_MESSAGE_FIXED + _utf8_len(m.chat_id) + _utf8_len(m.guid) + _utf8_len(m.sender)
            + _utf8_len(m.body) + _utf8_len(m.origin))


def _frame_base(chat_id: str, members: tuple[str, ...]) -> int:
    """The bytes of an InjectBatch frame of *chat_id* and *members* before its messages."""
    return _FRAME_FIXED + _utf8_len(chat_id) + sum(2 + _utf8_len(h) for h in members)


@attrs.frozen
class Row:
    """One claimed outbox row ready to send: what it records once acknowledged, and for a
    message the message as injected and the members it goes to."""

    injected: Injected
    #: None for a membership change
    message: wire.ChatMessage | None = None
    members: tuple[str, ...] = ()

    @property
    def item(self) -> OutboxItem:
        return self.injected.item


@attrs.define
class Request:
    """One request to a chat's home: an InjectBatch of message rows that share *members*, or
    (``members`` None) the InjectMembership of one membership row."""

    chat_id: str
    members: tuple[str, ...] | None
    rows: list[Row]
    #: the bytes of the batch's frame so far
    size: int = 0

    def send(self, peer: PeerConnection) -> defer.Deferred:
        """Send it on *peer*: a Deferred firing with one outcome per row, in order (a
        ``wire.InjectResult`` per message, the ``wire.Ack`` of a membership change), or
        failing for the whole request. ``WireError`` at once, nothing sent, for a request
        the wire format can not carry."""
        if self.members is None:
            return inject_membership_change(peer, self.rows[0].item, self.chat_id
                                            ).addCallback(lambda ack: [ack])
        return peer.inject_batch(self.chat_id, self.members,
                                 [row.message for row in self.rows])

    def unencodable(self, row: Row) -> str | None:
        """Why *row* alone can not be sent in a frame (the wire format's refusal), or None."""
        if self.members is None:
            item = row.item
            frame = wire.InjectMembership(req_id=0, chat_id=self.chat_id, add=item.add_handles,
                                          remove=item.remove_handles, origin=ORIGIN)
        else:
            frame = wire.InjectBatch(req_id=0, chat_id=self.chat_id, members=self.members,
                                     messages=(row.message,))
        try:
            wire.encode(frame)
        except wire.WireError as e:
            return str(e)
        return None


def plan_requests(rows: list[Row], most: int) -> list[Request]:
    """*rows* (one conversation's, in seq order) as the requests that carry them, in order:
    each run of message rows with one chat and member list in InjectBatches of at most
    *most* rows that fit in a frame, each membership row on its own."""
    requests: list[Request] = []
    batch: Request | None = None
    for row in rows:
        chat_id = row.injected.legacy_chat_id
        if row.message is None:
            requests.append(Request(chat_id, None, [row]))
            batch = None
            continue
        size = message_size(row.message)
        if (batch is None or row.members != batch.members or chat_id != batch.chat_id
                or len(batch.rows) >= most or batch.size + size > wire.MAX_FRAME_BYTES):
            # (a message too large for any frame goes alone, and is refused when it is sent)
            batch = Request(chat_id, row.members, [], _frame_base(chat_id, row.members))
            requests.append(batch)
        batch.rows.append(row)
        batch.size += size
    return requests


class RowWindow:
    """At most *limit* rows in flight at once, over every request of an injector. A request
    takes a slot per row before it is sent and gives them back at its answer; requests that
    wait are let in in the order they asked (a large batch is not overtaken by small ones).
    ``resize`` changes the limit in place (``bridgectl control set injector-concurrency``):
    a raise lets waiters in at once, a cut takes effect as answers come in; a request
    planned before a cut and larger than the new limit goes alone once nothing is in
    flight, so nothing waits forever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, defer.Deferred]] = deque()

    def take(self, rows: int) -> defer.Deferred | None:
        """Take *rows* slots (at most ``limit``): None when they were free and are taken
        now, else a Deferred that fires once they are (cancel it to stop waiting)."""
        if not self._waiting and self._fits(rows):
            self.used += rows
            return None
        d: defer.Deferred = defer.Deferred(lambda d: self._waiting.remove((rows, d)))
        self._waiting.append((rows, d))
        return d

    def give_back(self, rows: int) -> None:
        """*rows* slots are free again: let in who waits, in order, while they fit."""
        self.used -= rows
        self._let_in()

    def resize(self, limit: int) -> None:
        """At most *limit* rows in flight from now on (see the class docstring)."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"a window must be a positive whole number, not {limit!r}")
        self.limit = limit
        self._let_in()

    def _fits(self, rows: int) -> bool:
        return self.used + rows <= self.limit or self.used == 0

    def _let_in(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            taken, d = self._waiting.popleft()
            self.used += taken
            d.callback(None)


class Retry(Exception):
    """A request, or a row of it, failed for now: that row and the rest of its conversation
    go back."""


class Unexpected(Retry):
    """A request failed in a way nobody foresaw (worth a log with the traceback); retried."""


def outcomes_of_failure(e: BaseException, rows: int, timed_out: bool,
                        timeout_s: float) -> list[wire.InjectResult]:
    """What a request of *rows* rows that failed with *e* means: a refusal per row when the
    home refused the whole request for good; else ``Retry`` (``Unexpected`` for a failure
    not foreseen) is raised. *timed_out*: the request was cancelled at its deadline."""
    if timed_out and isinstance(e, defer.CancelledError):
        raise Retry(f"no answer from the home supernode within {timeout_s}s") from e
    if isinstance(e, PeerRequestFailed):
        if e.code in REFUSALS:
            return [wire.InjectResult(status="failed", legacy_seq=0, code=e.code,
                                      reason=e.reason)] * rows
        raise Retry(str(e)) from e  # not_home (the ring changed) and the like: later
    if isinstance(e, defer.TimeoutError):  # the connection's own request limit
        raise Retry(f"no answer from the home supernode within {timeout_s}s") from e
    if isinstance(e, _TRANSIENT):
        raise Retry(f"{type(e).__name__}: {e}") from e
    raise Unexpected(f"{type(e).__name__}: {e}") from e
