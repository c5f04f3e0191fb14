"""The in-memory network: frames handed over without a second decode, one timer per moment."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.protocol import Factory

from legacy import wire
from legacy.network import MemoryNetwork
from legacy.simclock import SimClock
from tests.legacy.netfixture import FrameRecorder, wait


def pair(net: MemoryNetwork, port: int) -> tuple[FrameRecorder, FrameRecorder]:
    """A connected (client, server) pair of frame recorders on *port*."""
    servers: list[FrameRecorder] = []

    def build() -> FrameRecorder:
        servers.append(FrameRecorder())
        return servers[-1]

    net.listen("127.0.0.1", port, Factory.forProtocol(build))
    client = wait(net.clock, net.connect("127.0.0.1", port, Factory.forProtocol(FrameRecorder)))
    return client, servers[0]


def framed(f: Any) -> bytes:
    data = wire.encode(f)
    return struct.pack(">I", len(data)) + data


def test_a_frame_reaches_a_frame_protocol_as_sent_without_being_decoded_again(monkeypatch):
    """A frame a frame protocol sends arrives as that frame; no decode runs on the way."""
    clock = SimClock()
    net = MemoryNetwork(clock)
    client, server = pair(net, 1000)
    f = wire.Send(guid="g", chat_id="c", members=("a", "b"), body="hello")
    decoded: list[bytes] = []
    monkeypatch.setattr(wire, "decode", lambda data: decoded.append(data))
    client.send(f)
    clock.advance(1)
    assert server.frames == [f] and server.frames[0] is f
    assert decoded == []


def test_raw_bytes_and_frames_arrive_in_the_order_they_were_written():
    """Raw bytes (a frame split across deliveries) and frames keep their order."""
    clock = SimClock()
    net = MemoryNetwork(clock)
    client, server = pair(net, 1001)
    one, two, three = (wire.SetPresence(status=s) for s in ("online", "away", "busy"))
    client.transport.write(framed(one)[:5])
    clock.advance(1)
    assert server.frames == []  # a partial frame waits in the receiver
    client.transport.write(framed(one)[5:])
    client.send(three)  # must not overtake the bytes written before it
    client.transport.write(framed(two))
    clock.advance(1)
    assert server.frames == [one, three, two]


def test_a_malformed_raw_frame_still_closes_only_its_connection():
    """Bad bytes on one in-memory connection reject it; a frame on another still arrives."""
    clock = SimClock()
    net = MemoryNetwork(clock)
    bad, bad_server = pair(net, 1002)
    good, good_server = pair(net, 1003)
    bad.transport.write(struct.pack(">I", 2) + bytes((wire.PROTOCOL_VERSION, 0x99)))
    good.send(wire.SetPresence(status="away"))
    clock.advance(1)
    assert bad_server.rejected == "unknown_type" and bad.lost
    assert isinstance(bad.frames[0], wire.Error) and bad.frames[0].code == "unknown_type"
    assert good_server.frames == [wire.SetPresence(status="away")] and not good.lost


def test_writes_due_at_one_moment_share_one_timer():
    """Connections written to in one moment are flushed by one timer, not one each."""
    clock = SimClock()
    net = MemoryNetwork(clock)
    pairs = [pair(net, 1010 + i) for i in range(3)]
    clock.advance(1)
    assert clock.getDelayedCalls() == []
    for client, _server in pairs:
        client.send(wire.SetPresence(status="away"))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert [server.frames for _client, server in pairs] == [[wire.SetPresence(status="away")]] * 3
