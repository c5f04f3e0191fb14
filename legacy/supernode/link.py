"""The supernode-to-supernode link: one-way, connected lazily, reconnecting with backoff.

A supernode sends routing and presence frames to another through one outbound ``Link``; the
other end only ever answers the handshake. States of one link::

                 send (queued)           Welcome (same epoch; a new one: give back
        idle -----------------> connecting ----------------> ready   what the peer owns)
         ^                       |     ^                      |
         |        connect failed |     |                      | connection lost
         |  or lost before Welcome     |                      |
         |                       v     |                      v
         +------- timer --------- waiting <-------------------+
                  (a stale node generation stays idle)

        any state --close (the node stops or crashes)--> closed

While not ready, frames wait in a bounded queue (the oldest is dropped past
``link_queue_limit``). A link reconnects even with nothing queued: that is how it notices a
peer's restart, by the new epoch in the ``Welcome``. The backoff is ``LINK_RETRY_POLICY``,
drawn from the node's seeded rng.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from legacy import auth, wire
from legacy.framing import FrameProtocol, ProtocolViolation
from servicekit.retry import RetryPolicy

if TYPE_CHECKING:
    from legacy.supernode.node import Supernode

log = Logger()

#: A link's wait before it reconnects: 1, 2, 4, 8, then 10 s, each spread by half
#: (``base * (0.5 + r)``, one draw of the node's rng, as the seeded traces expect).
LINK_RETRY_POLICY = RetryPolicy(initial_s=1.0, factor=2.0, cap_s=10.0, jitter=0.5,
                                jitter_mode="spread")


class LinkState(enum.Enum):
    IDLE = "idle"  # no connection and no retry pending: the next send connects
    CONNECTING = "connecting"  # connecting, then authenticating, until the Welcome
    READY = "ready"  # authenticated: frames go straight out
    WAITING = "waiting"  # the last attempt failed or the connection dropped: retry timer set
    CLOSED = "closed"  # the node stopped: nothing is sent or retried any more


_IDLE, _CONNECTING, _READY = LinkState.IDLE, LinkState.CONNECTING, LinkState.READY
_WAITING, _CLOSED = LinkState.WAITING, LinkState.CLOSED

#: The only transitions a link makes. READY -> READY is a repeated Welcome (no honest
#: supernode sends one): its epoch is checked again, as the first one's was.
LEGAL_TRANSITIONS: dict[LinkState, frozenset[LinkState]] = {
    _IDLE: frozenset({_CONNECTING, _CLOSED}),
    _CONNECTING: frozenset({_READY, _WAITING, _CLOSED}),
    _READY: frozenset({_READY, _WAITING, _CLOSED}),
    _WAITING: frozenset({_IDLE, _CLOSED}),
    _CLOSED: frozenset(),
}


class LinkProtocol(FrameProtocol):
    """Client side of a supernode-to-supernode link: authenticate, then only send."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        sn = self.link.sn
        if isinstance(f, wire.Challenge):
            self.send(wire.PeerAuth(role="supernode", name=sn.sn_id, proof=auth.peer_proof(
                sn.secrets.peer_secret, f.nonce, "supernode", sn.sn_id)))
        elif isinstance(f, wire.Welcome):
            self.link.ready(self, f.epoch)
        elif isinstance(f, wire.Error):
            log.warn("link {src}->{dst} refused: {code}: {reason}", src=sn.sn_id,
                     dst=self.link.dst, code=f.code, reason=f.reason)
        else:
            raise ProtocolViolation("unexpected", f"{type(f).__name__} on an outbound link")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.link.lost(self)


class Link:
    """An outbound connection to one supernode, connected lazily, with a bounded queue.

    When the connection drops, the link reconnects with backoff; a different epoch in the
    ``Welcome`` means the peer lost its memory, so we give it back what it owns.
    """

    def __init__(self, sn: Supernode, dst: str) -> None:
        self.sn = sn
        self.dst = dst
        self.gen = sn.generation
        self.state = _IDLE
        self.proto: LinkProtocol | None = None  # set while READY
        self.queue: list[Any] = []
        self.known_epoch: int | None = None
        self.failures = 0
        self._retry: Any = None  # the timer, while WAITING

    def _move(self, to: LinkState) -> None:
        if to not in LEGAL_TRANSITIONS[self.state]:
            raise RuntimeError(f"link {self.sn.sn_id}->{self.dst}: no transition from "
                               f"{self.state.value} to {to.value}")
        self.state = to

    # -- inputs -------------------------------------------------------------------------------

    def send(self, frame: Any) -> None:
        state = self.state
        if state is _READY:
            self.proto.send(frame)
            return
        if state is _CLOSED:
            return
        if len(self.queue) >= self.sn.config.link_queue_limit:
            self.queue.pop(0)
            self.sn.trace.record("link_overflow", self.sn.sn_id, self.dst)
        self.queue.append(frame)
        if state is _IDLE:
            self._connect()

    def ready(self, proto: LinkProtocol, epoch: int) -> None:
        """The peer's ``Welcome`` on *proto*: flush the queue, resync a restarted peer."""
        if self.state is _CLOSED:
            proto.transport.abortConnection()
            return
        self._move(_READY)
        self.proto = proto
        self.failures = 0
        restarted = self.known_epoch is not None and epoch != self.known_epoch
        self.known_epoch = epoch
        queue, self.queue = self.queue, []
        if restarted:
            self.sn.on_peer_restarted(self.dst)
        for frame in queue:
            proto.send(frame)

    def lost(self, proto: LinkProtocol) -> None:
        """*proto*'s connection is gone: wait, then reconnect (unless the link is closed)."""
        state = self.state
        if state is _CONNECTING or (state is _READY and proto is self.proto):
            self.proto = None
            self._schedule_retry()

    def close(self) -> None:
        if self.state is _CLOSED:
            return
        self._move(_CLOSED)
        self.queue.clear()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self.proto is not None:
            self.proto.transport.abortConnection()
            self.proto = None

    # -- transitions of its own ---------------------------------------------------------------

    def _connect(self) -> None:
        self._move(_CONNECTING)
        addr = self.sn.directory[self.dst]
        d = self.sn.network.connect(addr.host, addr.port,
                                    Factory.forProtocol(lambda: LinkProtocol(self)))
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        if self.state is _CONNECTING:
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._move(_WAITING)
        self.failures += 1
        delay = LINK_RETRY_POLICY.delay(self.failures, self.sn.rng)
        self._retry = self.sn.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.state is not _WAITING:
            return
        self._move(_IDLE)
        if self.sn.generation == self.gen:
            self._connect()
