"""The notification channel relayed between API worker processes (cloud/channel_relay.py),
over real unix datagram sockets, on a test clock."""

from __future__ import annotations

import socket
import uuid

from twisted.internet.task import Clock

from cloud.channel_relay import RelayedChannel
from cloud.push import PushMessage


def _message(account: uuid.UUID, seq: int) -> PushMessage:
    return PushMessage(account, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), seq)


def _peer(tmp_path, name: str) -> tuple[socket.socket, str]:
    path = str(tmp_path / name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock, path


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 20))
        except BlockingIOError:
            return out


def test_a_burst_of_deliveries_reaches_the_peer_and_its_mailboxes(tmp_path):
    """500 deliveries in one pass (more than a unix socket queues datagrams) all reach the
    peer, a few datagrams in all, and fill its channel's mailboxes; its ack clears ours."""
    clock = Clock()
    sock, path = _peer(tmp_path, "peer.sock")
    sender = RelayedChannel(clock, [path])
    receiver = RelayedChannel(clock, [])
    account = uuid.uuid4()
    messages = [_message(account, seq) for seq in range(500)]
    for m in messages:
        sender.deliver(m)
    assert _drain(sock) == []  # sent at the end of the pass, not one by one
    clock.advance(0)
    datagrams = _drain(sock)
    assert 1 <= len(datagrams) <= 10 and sender.dropped == 0
    for d in datagrams:
        receiver.received(d)
    assert {m.notification_id for m in receiver.pending(account)} == \
        {m.notification_id for m in messages}
    # an acknowledgement through the receiver's process reaches the sender's mailbox
    sender_sock, sender_path = _peer(tmp_path, "sender.sock")
    acker = RelayedChannel(clock, [sender_path])
    acker.ack(account, messages[0].notification_id)
    clock.advance(0)
    for d in _drain(sender_sock):
        sender.received(d)
    assert messages[0].notification_id not in {m.notification_id
                                                for m in sender.pending(account)}
    assert len(sender.pending(account)) == 499
    for c in (sender, receiver, acker):
        c.close()
    sock.close()
    sender_sock.close()


def test_a_full_peer_is_retried_and_a_missing_one_loses_events_counted(tmp_path):
    """A peer whose queue is full gets the events once it reads; events for a peer that is
    not there are dropped and counted, and the local mailbox still has them."""
    clock = Clock()
    sock, path = _peer(tmp_path, "slow.sock")
    channel = RelayedChannel(clock, [path, str(tmp_path / "absent.sock")])
    account = uuid.uuid4()
    sent = 0
    while not channel._queues[path] or sent < 5000:  # until the peer's socket is full
        for _ in range(200):
            channel.deliver(_message(account, sent))
            sent += 1
        clock.advance(0)
        if channel._queues[path]:
            break
    assert channel._queues[path], "the peer's socket never filled"
    received = []
    for _ in range(1000):
        received += _drain(sock)
        clock.advance(0.005)
        if not channel._queues[path]:
            break
    received += _drain(sock)
    lines = [line for d in received for line in d.split(b"\n")]
    assert len(lines) == sent
    assert channel.dropped == sent  # every event for the absent peer
    assert len(channel.pending(account)) == min(sent, 1000)  # the local mailbox's bound
    channel.close()
    sock.close()


def test_malformed_relay_events_are_ignored(tmp_path):
    """A datagram that is not the relay's JSON changes nothing and does not raise."""
    channel = RelayedChannel(Clock(), [])
    channel.received(b"not json\n{\"deliver\": {\"account_id\": \"x\"}}")
    assert channel.waiting() == 0 and channel.pending(uuid.uuid4()) == []


def test_the_listener_reads_whole_datagrams(tmp_path):
    """The receiving socket reads datagrams as large as the relay sends (Twisted's default
    of 8 KiB would cut a burst's datagram and lose its events)."""
    from cloud.channel_relay import MAX_DATAGRAM_BYTES, ChannelRelayListener

    class RecordingReactor:
        def listenUNIXDatagram(self, path, proto, maxPacketSize=8192):  # noqa: N802, N803
            self.max_packet = maxPacketSize
            return None

    reactor = RecordingReactor()
    channel = RelayedChannel(Clock(), [])
    ChannelRelayListener(reactor, channel, str(tmp_path / "me.sock")).startService()
    assert reactor.max_packet > MAX_DATAGRAM_BYTES
    channel.close()
