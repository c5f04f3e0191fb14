"""Frame transport shared by every legacy endpoint: length prefix, strict decode, clean reject.

A protocol built on ``FrameProtocol`` receives decoded frames in ``frameReceived``. Anything
wrong with the input -- an oversized or malformed frame, an unknown type, a frame its role
may not send -- ends in ``reject``: one logged reason, one counter increment, an ``Error``
frame to the peer and the connection closed. The server behind it keeps serving everyone else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from legacy import wire

REJECTED_FRAMES = Counter(
    "legacy_rejected_connections_total",
    "Connections closed by a legacy endpoint because of bad input, by reason code.",
    ["code"],
)


class FrameCount(Collector):
    """A counter of frames (``<name>_total``), counted without a lock.

    Every frame of every legacy connection is counted, on the reactor thread (protocols run
    there). prometheus_client's ``Counter.inc`` takes a lock each time: in the bridge's drain
    that was 8% of the time its process held the GIL. Exposed like a Counter, without
    ``_created``.
    """

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


FRAMES_RECEIVED = FrameCount("legacy_frames_received", "Frames decoded by legacy endpoints.")
REGISTRY.register(FRAMES_RECEIVED)


class CodedError(Exception):
    """An error with a machine-readable ``code`` and a human ``reason``, as on the wire."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class ProtocolViolation(CodedError):
    """Raised by a frame handler when the peer broke the protocol; the connection is closed."""


class FrameProtocol(Int32StringReceiver):
    """Int32-prefixed frames decoded by ``legacy.wire``; subclasses define ``frameReceived``."""

    MAX_LENGTH = wire.MAX_FRAME_BYTES
    log = Logger()
    rejected: str | None = None

    #: the transport's ``write_frame`` when it carries frames (the in-memory network)
    _write_frame: Any = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        self._write_frame = getattr(transport, "write_frame", None)
        super().makeConnection(transport)

    def stringReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted naming)
        if self.rejected is not None:
            return
        try:
            frame = wire.decode(data)
        except wire.WireError as e:
            self.reject(e.code, e.reason)
            return
        self.frame_arrived(frame)

    def frame_arrived(self, frame: Any) -> None:
        """Serve one decoded frame (the in-memory network hands frame protocols theirs)."""
        if self.rejected is not None:
            return
        FRAMES_RECEIVED.value += 1
        try:
            self.frameReceived(frame)
        except ProtocolViolation as e:
            self.reject(e.code, e.reason)
        except Exception:
            # A bug of ours must not take the server down with it: log it, drop this peer only.
            self.log.failure("handler for {frame} failed", frame=type(frame).__name__)
            self.reject("internal", "internal error while handling the frame")

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802
        self.reject("too_large", f"frame of {length} bytes exceeds {self.MAX_LENGTH}")

    def frameReceived(self, frame: Any) -> None:  # noqa: N802
        raise NotImplementedError

    def send(self, frame: Any) -> None:
        """Encode and write one frame (silently dropped once the connection is closing)."""
        if self.transport is None or self.rejected is not None:
            return
        data = wire.encode(frame)
        if self._write_frame is not None:
            self._write_frame(frame, data)
        else:
            self.sendString(data)

    def reject(self, code: str, reason: str) -> None:
        """Close this one connection because of bad input, with a logged reason."""
        if self.rejected is not None:
            return
        REJECTED_FRAMES.labels(code=code).inc()
        self.log.info("closing {peer}: {code}: {reason}", peer=self._peer_name(), code=code,
                      reason=reason)
        try:
            self.sendString(wire.encode(wire.Error(code=code, reason=reason[:1000])))
        except Exception:  # the Error frame is a courtesy; closing is what matters
            pass
        self.rejected = code
        if self.transport is not None:
            self.transport.loseConnection()

    def _peer_name(self) -> str:
        try:
            return str(self.transport.getPeer())
        except Exception:
            return "?"
