"""A supernode's life: the Service, its configuration and memory, crash and restart.

The node owns one object per role and hands itself to each; they share its memory, clock,
trace and ``send_to``::

    Supernode --+-- Routing         routing.py   home and index-owner roles, delivery
                +-- PresenceHub     presence.py  publish, merge, fan-out, sweep
                +-- ClientSessions  clients.py   devices attached here and their requests
                +-- PeerApi         peer_api.py  the privileged peers' requests
                +-- OfflineService  offline.py   answers to the logins' offline-message requests
                +-- Link per peer   link.py      outbound, reconnecting (kept in its memory)
    SupernodeProtocol (protocol.py) serves every inbound connection and dispatches by role.

All state lives in memory (``Memory``, state.py): ``crash`` drops it, ``start`` begins a
new epoch.
"""

from __future__ import annotations

import hashlib
import random
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
from prometheus_client import REGISTRY, Counter, Gauge
from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from legacy import wire
from legacy.auth import Secrets
from legacy.faults import HopFaults
from legacy.framing import FrameCount, ProtocolViolation
from legacy.network import Network
from legacy.ring import HashRing
from legacy.supernode.clients import ClientSessions
from legacy.supernode.link import Link
from legacy.supernode.offline import OfflineService
from legacy.supernode.peer_api import PeerApi
from legacy.supernode.presence import PRESENCE_HANDLERS, PresenceHub
from legacy.supernode.protocol import SupernodeProtocol
from legacy.supernode.routing import ROUTING_HANDLERS, Routing
from legacy.supernode.state import Memory
from legacy.trace import Trace

log = Logger()

HOP_FRAMES = FrameCount("legacy_hop_frames", "Frames sent between supernodes.")
REGISTRY.register(HOP_FRAMES)
LOOP_FAILURES = Counter("legacy_loop_failures_total",
                        "Background passes of a supernode that failed (and were retried).",
                        ["loop"])
SUPERNODES_UP = Gauge("legacy_supernodes_up", "Supernodes currently running in this process.")

# Every supernode-to-supernode frame is handled by routing or by the presence hub, not both.
assert not set(ROUTING_HANDLERS) & set(PRESENCE_HANDLERS)
assert set(ROUTING_HANDLERS) | set(PRESENCE_HANDLERS) == set(wire.SUPERNODE_FRAMES)


@attrs.frozen
class SupernodeConfig:
    sn_id: str
    host: str = "127.0.0.1"
    port: int = 0
    feed_capacity: int = 10_000
    retention_seconds: float = 30 * 86400.0
    presence_ttl: float = 300.0
    refresh_interval: float = 100.0
    sweep_interval: float = 10.0
    link_queue_limit: int = 10_000


def incarnation_epoch(run_id: int, sn_id: str, draw: int) -> int:
    """The epoch of one incarnation of supernode *sn_id*: a hash of the run's id, the node's
    id and a draw from its seeded stream, in [1, 2**62].

    The draw alone repeats when a network is started again with the same seed, and a bridge
    whose checkpoint names that epoch would then read the new feed as the old one (its
    checkpoint ahead of the feed, or past entries it never read). The run id tells runs
    apart: fresh for every TCP run, fixed by the seed in a simulation (same seed, same run).
    """
    digest = hashlib.sha256(f"{run_id}:{sn_id}:{draw}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 2) + 1


def _bound(role: Any, table: dict[type, Callable[..., None]]) -> dict[type, Callable[..., None]]:
    """*table*'s handlers bound to *role*, so that a frame costs one lookup and one call."""
    return {frame_type: types.MethodType(fn, role) for frame_type, fn in table.items()}


class Supernode(service.Service):
    """One supernode. ``startService`` listens; ``crash`` loses memory; restart = new epoch."""

    def __init__(self, config: SupernodeConfig, *, network: Network, ring: HashRing,
                 directory: dict[str, wire.SupernodeAddress], secrets: Secrets,
                 hop_faults: HopFaults, trace: Trace, rng: random.Random,
                 run_id: int = 0) -> None:
        self.config = config
        self.sn_id = config.sn_id
        self.name = config.sn_id
        self.network = network
        self.clock = network.clock
        self.ring = ring
        self.directory = directory
        self.secrets = secrets
        self.faults = hop_faults
        self.trace = trace
        self.rng = rng
        #: mixed into every epoch, so that no two runs' incarnations share one
        self.run_id = run_id
        #: the epoch of every incarnation so far, in order
        self.epochs: list[int] = []
        self.mem: Memory | None = None
        self.generation = 0
        self._port: Any = None
        self._conns: dict[SupernodeProtocol, None] = {}  # ordered: faults pick from it
        self._loops: list[LoopingCall] = []
        self.restarts = 0
        #: a fault: privileged peers whose name starts with the prefix are cut off until then
        self._peer_cut: tuple[str, float] | None = None
        #: while above 0, feed appends wait to be sent (``feed_appending``)
        self._feed_holds = 0
        self.routing = Routing(self)
        self.presence = PresenceHub(self)
        self.clients = ClientSessions(self)
        self.peer_api = PeerApi(self)
        self.offline = OfflineService(self)
        self._sn_handlers = {**_bound(self.routing, ROUTING_HANDLERS),
                             **_bound(self.presence, PRESENCE_HANDLERS)}

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> defer.Deferred:  # noqa: N802
        super().startService()
        self.generation += 1
        epoch = incarnation_epoch(self.run_id, self.sn_id, self.rng.getrandbits(64))
        self.mem = Memory(epoch, self.config.feed_capacity)
        self.epochs.append(epoch)
        self.trace.record("sn_start", self.sn_id, epoch)
        SUPERNODES_UP.inc()
        factory = Factory.forProtocol(lambda: SupernodeProtocol(self))
        d = self.network.listen(self.config.host, self.config.port, factory)

        def listening(port: Any) -> None:
            self._port = port
            for fn, interval in ((self.presence.refresh, self.config.refresh_interval),
                                 (self._sweep, self.config.sweep_interval)):
                loop = LoopingCall(self._guarded, fn)
                loop.clock = self.clock
                loop.start(interval, now=False).addErrback(
                    lambda f: log.failure("supernode loop died", f))
                self._loops.append(loop)

        return d.addCallback(listening)

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        self.generation += 1
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        mem, self.mem = self.mem, None
        if mem is not None:
            SUPERNODES_UP.dec()
            for link in list(mem.links.values()):
                link.close()
        for conn in list(self._conns):
            conn.transport.abortConnection()
        self._conns.clear()
        port, self._port = self._port, None
        self.trace.record("sn_stop", self.sn_id)
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return defer.succeed(None)

    def _guarded(self, fn: Any) -> None:
        """Run one pass of a background loop; a failure is logged and counted, never fatal."""
        try:
            fn()
        except Exception:
            LOOP_FAILURES.labels(loop=fn.__name__.strip("_")).inc()
            log.failure("supernode {sn} background pass {fn} failed", sn=self.sn_id,
                        fn=fn.__name__)

    def _sweep(self) -> None:
        """Expire stale presence (hub and seen), stale index entries, and old history."""
        if self.mem is None:
            return
        now = self.now_ms()
        self.presence.sweep(now)
        self.routing.sweep(now)

    def cut_peers(self, prefix: str, seconds: float) -> None:
        """A fault: a partition between this supernode and the privileged peers whose name
        starts with *prefix* (e.g. the bridge workers) for *seconds*. Their connections
        drop now; new ones are dropped at authentication until the cut ends."""
        self._peer_cut = (prefix, self.clock.seconds() + seconds)
        self.trace.record("peer_cut", self.sn_id, prefix, seconds)
        for conn in list(self._conns):
            if conn.role == "peer" and conn.handle.startswith(prefix):
                conn.transport.abortConnection()

    def peer_is_cut(self, name: str) -> bool:
        cut = self._peer_cut
        return cut is not None and name.startswith(cut[0]) and self.clock.seconds() < cut[1]

    def crash(self) -> defer.Deferred:
        """Stop abruptly, losing every bit of memory (the next start has a new epoch)."""
        self.trace.record("sn_crash", self.sn_id)
        return self.stopService()

    def restart(self) -> defer.Deferred:
        self.restarts += 1
        return defer.maybeDeferred(self.startService)

    @property
    def epoch(self) -> int:
        return self.mem.epoch if self.mem else 0

    @property
    def presence_changes(self) -> int:
        """Changes of a merged status at this node's presence hub, over every incarnation."""
        return self.presence.changes

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def accept(self, chat_id: str, members: tuple, guid: str, sender: str, body: str,
               origin: str, ts_ms: int = 0) -> tuple[wire.ChatMessage, bool]:
        """Append a message to its chat here, as its home (see ``Routing.accept``)."""
        return self.routing.accept(chat_id, members, guid, sender, body, origin, ts_ms)

    def feed_append(self, make: Callable[[int], Any]) -> None:
        """Append ``make(offset)`` to the change feed and send it to whoever has credit."""
        mem = self.mem
        feed = mem.feed
        if self._feed_holds and feed.next_offset - feed.first_offset >= feed.capacity:
            # held, and this append evicts the oldest entry: whoever has still to read it
            # gets it now if its credit allows, as it would have without the hold
            for sub in mem.feed_subs:
                if sub.next == feed.first_offset:
                    sub.pump()
        feed.append(make)
        if not self._feed_holds:
            for sub in mem.feed_subs:
                sub.pump()

    @contextmanager
    def feed_appending(self) -> Iterator[None]:
        """Send what is appended to the feed inside this block once, at its end: a run of
        entries a subscriber leaves out (``FeedSubscribeOnly``) then goes as one
        ``FeedSkipped``, not one per entry (an ``InjectBatch`` appends up to 64)."""
        self._feed_holds += 1
        try:
            yield
        finally:
            self._feed_holds -= 1
            if not self._feed_holds and self.mem is not None:
                for sub in self.mem.feed_subs:
                    sub.pump()

    # -- other supernodes --------------------------------------------------------------------

    def send_to(self, dst: str, frame: Any) -> None:
        """Send *frame* to supernode *dst* (locally if it is us), subject to hop faults."""
        mem = self.mem
        if mem is None:
            return
        if dst == self.sn_id:
            self.handle_supernode_frame(frame)
            return
        if dst not in self.directory:
            raise ProtocolViolation("unknown_supernode", f"no supernode {dst!r}")
        gen = self.generation
        for delay in self.faults.delays(self.sn_id, dst):
            HOP_FRAMES.value += 1
            if delay <= 0:
                self._link(dst).send(frame)
            else:
                self.clock.callLater(delay, self._send_later, gen, dst, frame)

    def _send_later(self, gen: int, dst: str, frame: Any) -> None:
        if gen == self.generation and self.mem is not None:
            self._link(dst).send(frame)

    def _link(self, dst: str) -> Link:
        links = self.mem.links
        link = links.get(dst)
        if link is None:
            link = links[dst] = Link(self, dst)
        return link

    def handle_supernode_frame(self, f: Any) -> None:
        """Serve a frame from another supernode (or from ourselves, by ``send_to``)."""
        self._sn_handlers[type(f)](f)

    def on_peer_restarted(self, dst: str) -> None:
        """*dst* came back with a new epoch and empty memory: give it back what it owns."""
        mem = self.mem
        self.trace.record("resync", self.sn_id, dst)
        owner = self.ring.index_owner
        for handle, status in mem.local_status.items():
            if owner(handle) == dst:
                self.presence.publish(handle, status, "legacy", feed=False)
        for handle in mem.watchers:
            if owner(handle) == dst:
                self.send_to(dst, wire.PresenceSubscribe(handle=handle, subscriber_sn=self.sn_id))
        for recipient in mem.held:
            if owner(recipient) == dst:
                self.send_to(dst, wire.HoldNote(recipient=recipient, home_sn=self.sn_id))

    # -- introspection for summaries and tests ---------------------------------------------------

    def held_count(self) -> int:
        return sum(len(v) for v in self.mem.held.values()) if self.mem else 0

    def held_pairs(self) -> set[tuple[str, str]]:
        if self.mem is None:
            return set()
        return {(guid, r) for r, held in self.mem.held.items() for guid in held}

    def history(self, chat_id: str) -> list[wire.ChatMessage]:
        chat = self.mem.chats.get(chat_id) if self.mem else None
        return list(chat.history.values()) if chat else []
