"""A supernode's offline-message service: the answer to the request every login makes.

A device that logs in asks its supernode for its offline messages. What its chats' home
supernodes hold for it reaches it by the routing path (``routing.py``: held, noted at the
index owner, flushed as the user comes online); this service sends the answer to the
request, an ``OfflineReply``, in the order the requests came, at most ``rate`` answers a
simulated second (None: each at once)::

    attach --request--> queue (FIFO, in memory) --one per 1/rate s--> OfflineReply --> device

A request whose device left before its turn is dropped without taking a turn. The 2010
outage overloaded these servers: answers came late, and the client of the day crashed on a
late answer (``legacy.client``), logged in again and asked again. A fault models the
overload by bounding ``rate`` (``drills.simfaults``). The service is off by default
(``enabled`` False): the device then gets no answer, as in every run before it existed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from legacy import wire

if TYPE_CHECKING:
    from legacy.supernode.node import Supernode
    from legacy.supernode.protocol import SupernodeProtocol
    from legacy.supernode.state import Memory


class OfflineService:
    """The offline-message answers of one supernode's devices, through a queue bounded in
    rate, not in length: one entry per attach while the rate holds (a device that attached
    again has one more; the entries of sessions gone are dropped at their turn)."""

    def __init__(self, sn: Supernode) -> None:
        self.sn = sn
        #: whether logins get an answer at all
        self.enabled = False
        #: answers a simulated second (None: unbounded)
        self.rate: float | None = None
        #: over every incarnation: answers sent, and those that waited in the queue first
        self.answered = 0
        self.delayed = 0

    def request(self, proto: SupernodeProtocol) -> None:
        """A device attached here asks for its offline messages."""
        if not self.enabled:
            return
        mem = self.sn.mem
        mem.offline_queue.append((proto, self.sn.clock.seconds()))
        if mem.offline_timer is None:
            self._serve(mem)

    def set_rate(self, rate: float | None) -> None:
        """Bound the answers to *rate* a second (None: unbounded; what waits is answered
        at once)."""
        if rate is not None and not rate > 0:
            raise ValueError(f"an offline-message rate must be above 0, not {rate!r}")
        self.rate = rate
        mem = self.sn.mem
        if mem is not None and mem.offline_queue:
            if mem.offline_timer is not None and mem.offline_timer.active():
                mem.offline_timer.cancel()
            mem.offline_timer = None
            self._serve(mem)

    def waiting(self) -> int:
        """Requests in the queue now."""
        return len(self.sn.mem.offline_queue) if self.sn.mem is not None else 0

    def _serve(self, mem: Memory) -> None:
        sn = self.sn
        if mem is not sn.mem:
            return  # crashed since: the queue went with the memory
        mem.offline_timer = None
        clock, queue = sn.clock, mem.offline_queue
        while queue:
            now = clock.seconds()
            if self.rate is not None and now < mem.offline_free_at:
                mem.offline_timer = clock.callLater(mem.offline_free_at - now, self._serve,
                                                    mem)
                return
            proto, asked = queue.popleft()
            if mem.sessions.get(proto.handle, {}).get(proto.device) is not proto:
                continue  # the device left: nobody to answer
            waited = now - asked
            proto.send(wire.OfflineReply(waited_ms=min(int(waited * 1000), 2**32 - 1)))
            self.answered += 1
            if waited > 0:
                self.delayed += 1
            if self.rate is not None:
                mem.offline_free_at = now + 1.0 / self.rate
