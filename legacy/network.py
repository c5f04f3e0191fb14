"""Two runtimes, one code path: the same protocols over loopback TCP or an in-memory network.

Everything in ``legacy`` reaches the network only through ``Network.listen`` and
``Network.connect``. ``TCPNetwork`` uses a real reactor; ``MemoryNetwork`` joins protocol
pairs with transports that deliver bytes through ``clock.callLater``, so with a
``twisted.internet.task.Clock`` a whole run is a pure function of its seed::

    client proto --write--> MemoryTransport --(one timer per due time)--> server proto.dataReceived
                 --write_frame(frame, bytes)------------------------> server proto.frame_arrived

A frame protocol (``legacy.framing``) hands the transport its encoded frame together with the
frame itself; if the other end is a frame protocol too, it gets the frame without decoding
its bytes again (encoding checked every value; the bytes still decode to an equal frame).
Raw bytes (hostile-input tests) take the byte path, in order with the frames. Every
transport with something due at one moment is flushed by one timer for that moment.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer


class ListeningPort(Protocol):
    def stopListening(self) -> Any: ...  # noqa: N802


class Network(Protocol):
    """What the legacy stack needs from a network."""

    clock: IReactorTime

    def listen(self, host: str, port: int, factory: Factory) -> defer.Deferred: ...

    def connect(self, host: str, port: int, factory: Factory,
                timeout: float = 5.0) -> defer.Deferred: ...


class TCPNetwork:
    """Real TCP through the given reactor (bridgectl/main.py passes the global one)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.clock = reactor

    def listen(self, host: str, port: int, factory: Factory) -> defer.Deferred:
        return TCP4ServerEndpoint(self.reactor, port, interface=host).listen(factory)

    def connect(self, host: str, port: int, factory: Factory,
                timeout: float = 5.0) -> defer.Deferred:
        return TCP4ClientEndpoint(self.reactor, host, port, timeout=timeout).connect(factory)


@implementer(ITransport)
class MemoryTransport:
    """One end of an in-memory connection; writes arrive at the peer after the latency."""

    disconnecting = False

    def __init__(self, network: MemoryNetwork, host: IPv4Address, peer: IPv4Address) -> None:
        self.network = network
        self._host = host
        self._peer = peer
        self.other: MemoryTransport | None = None
        self.protocol: Any = None
        #: what waits for delivery, in order: raw bytes, or (frame, its encoding)
        self._pending: list[Any] = []
        #: the flush this transport waits for (0: none); a cancelled one is a stale number
        self._flush_ticket = 0
        self.closed = False
        self.producer: Any = None

    # ITransport
    def write(self, data: bytes) -> None:
        if self.disconnecting or self.closed or not data:
            return
        self._pending.append(data)
        if not self._flush_ticket:
            self._flush_ticket = self.network._due(self)

    def write_frame(self, frame: Any, data: bytes) -> None:
        """Write one frame, given with its encoding *data* (without the length prefix)."""
        if self.disconnecting or self.closed:
            return
        self._pending.append((frame, data))
        if not self._flush_ticket:
            self._flush_ticket = self.network._due(self)

    def writeSequence(self, seq: list[bytes]) -> None:  # noqa: N802
        for data in seq:
            self.write(data)

    def loseConnection(self) -> None:  # noqa: N802
        """Close after what was written has been delivered, as TCP would."""
        if self.disconnecting or self.closed:
            return
        self.disconnecting = True
        if not self._flush_ticket:
            self.network.clock.callLater(self.network.latency, self._close, error.ConnectionDone())

    def abortConnection(self) -> None:  # noqa: N802
        """Close now, dropping anything not yet delivered."""
        if self.closed:
            return
        self._pending.clear()
        self._flush_ticket = 0
        self._close(error.ConnectionLost("aborted"))

    def getPeer(self) -> IPv4Address:  # noqa: N802
        return self._peer

    def getHost(self) -> IPv4Address:  # noqa: N802
        return self._host

    # IConsumer, enough for producers that never need pausing in memory
    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        self.abortConnection()

    # delivery
    def _flush(self) -> None:
        self._flush_ticket = 0
        if self.closed:
            return
        pending, self._pending = self._pending, []
        other = self.other
        if other is not None and not other.closed and other.protocol is not None:
            _deliver(other, pending)
        if self.disconnecting and not self.closed:
            self._close(error.ConnectionDone())

    def _close(self, reason: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        other = self.other
        proto = self.protocol
        if proto is not None:
            proto.connectionLost(Failure(reason))
        if other is not None and not other.closed:
            other._pending.clear()
            other._flush_ticket = 0
            other.closed = True
            if other.protocol is not None:
                other.protocol.connectionLost(Failure(reason))


_PREFIX = struct.Struct(">I").pack


def _deliver(dst: MemoryTransport, pending: list[Any]) -> None:
    """Hand *pending* (raw bytes and encoded frames, in order) to *dst*'s protocol.

    A frame goes straight to ``frame_arrived`` when the protocol has one and holds no partial
    frame from raw bytes; otherwise its bytes join the stream, prefixed as on the wire."""
    proto = dst.protocol
    arrived = getattr(proto, "frame_arrived", None)
    raw: list[bytes] = []
    for item in pending:
        if dst.closed:
            return
        if type(item) is bytes:
            raw.append(item)
            continue
        frame, data = item
        if arrived is not None and not raw and not proto._unprocessed:
            arrived(frame)
        else:
            raw.append(_PREFIX(len(data)) + data)
            if arrived is not None:
                proto.dataReceived(b"".join(raw))
                raw.clear()
    if raw and not dst.closed:
        proto.dataReceived(b"".join(raw))


class _MemoryPort:
    def __init__(self, network: MemoryNetwork, key: tuple[str, int]) -> None:
        self.network = network
        self.key = key

    def stopListening(self) -> defer.Deferred:  # noqa: N802
        self.network._listeners.pop(self.key, None)
        return defer.succeed(None)

    def getHost(self) -> IPv4Address:  # noqa: N802
        return IPv4Address("TCP", *self.key)


class MemoryNetwork:
    """A deterministic network of listeners and connections driven by *clock*."""

    def __init__(self, clock: IReactorTime, latency: float = 0.002) -> None:
        self.clock = clock
        self.latency = latency
        self._listeners: dict[tuple[str, int], Factory] = {}
        self._next_client_port = 40000
        # due time -> [(transport, ticket)]: one timer flushes them all, in order
        self._batches: dict[float, list[tuple[MemoryTransport, int]]] = {}
        self._tickets = 0

    def _due(self, transport: MemoryTransport) -> int:
        """Schedule *transport*'s flush after the latency; returns its ticket."""
        self._tickets += 1
        due = self.clock.seconds() + self.latency
        batch = self._batches.get(due)
        if batch is None:
            batch = self._batches[due] = []
            self.clock.callLater(self.latency, self._flush_batch, due)
        batch.append((transport, self._tickets))
        return self._tickets

    def _flush_batch(self, due: float) -> None:
        batch = self._batches.pop(due)
        for transport, ticket in batch:
            if transport._flush_ticket == ticket:
                transport._flush()

    def listen(self, host: str, port: int, factory: Factory) -> defer.Deferred:
        key = (host, port)
        if key in self._listeners:
            return defer.fail(error.CannotListenError(host, port, "address in use"))
        self._listeners[key] = factory
        return defer.succeed(_MemoryPort(self, key))

    def connect(self, host: str, port: int, factory: Factory,
                timeout: float = 5.0) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.clock.callLater(self.latency, self._complete, host, port, factory, d)
        return d

    def _complete(self, host: str, port: int, factory: Factory, d: defer.Deferred) -> None:
        server_factory = self._listeners.get((host, port))
        if server_factory is None:
            d.errback(error.ConnectionRefusedError(f"{host}:{port}"))
            return
        self._next_client_port += 1
        client_addr = IPv4Address("TCP", "127.0.0.1", self._next_client_port)
        server_addr = IPv4Address("TCP", host, port)
        server_proto = server_factory.buildProtocol(client_addr)
        client_proto = factory.buildProtocol(server_addr)
        if server_proto is None or client_proto is None:
            d.errback(error.ConnectionRefusedError("factory refused the connection"))
            return
        st = MemoryTransport(self, server_addr, client_addr)
        ct = MemoryTransport(self, client_addr, server_addr)
        st.other, ct.other = ct, st
        st.protocol, ct.protocol = server_proto, client_proto
        server_proto.makeConnection(st)
        client_proto.makeConnection(ct)
        d.callback(client_proto)
