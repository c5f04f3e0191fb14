"""The notification channel shared by several API processes (``cloud run --processes N``).

A device long-polls whichever worker accepted its connection, but pushes arrive at the
one worker that runs the dispatcher (and its gateway). Each worker's channel therefore
relays what it learns to the others, one unix datagram per event::

    worker 0: gateway --deliver()--> RelayedChannel --datagram--> worker 1's channel-1.sock
                                        |                                |
                                        v                                v
                                  its mailboxes                    its mailboxes
    worker k: POST .../ack --ack()--> RelayedChannel --datagram--> every other worker

Events go out at the end of the reactor's pass, many to a datagram; a peer whose socket is
full is tried again shortly. Events for a peer that is not there (restarting) are dropped
and logged once: the notification is not acknowledged in the store, so the dispatcher
pushes it again after ``resend_after``, exactly as after a push the real gateway lost.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cloud.push import NotificationChannel, PushMessage

log = Logger()


#: Most bytes in one relay datagram (events are JSON lines; a burst of deliveries from one
#: dispatcher pass goes out in a few datagrams, not one each: a unix socket queues only a
#: few datagrams, ``net.unix.max_dgram_qlen``, 10 by default on Linux).
MAX_DATAGRAM_BYTES = 32 * 1024
#: What the receiving end reads per datagram (Twisted's default, 8 KiB, would cut them).
RECEIVE_BYTES = 2 * MAX_DATAGRAM_BYTES
#: Events held per peer while its socket is full; beyond that they are dropped (and pushed
#: again after ``resend_after``, as after a lost push).
MAX_QUEUED_EVENTS = 20_000
#: Pause before trying a full peer socket again.
RETRY_FULL_S = 0.005


class RelayedChannel(NotificationChannel):
    """A ``NotificationChannel`` whose deliveries and acknowledgements also reach the
    channels of the *peers* (their datagram socket paths).

    Events are queued per peer and sent at the end of the reactor's current pass (a
    ``callLater(0)``), several to a datagram; a peer whose socket is full is tried again
    shortly; one that is not there (restarting) loses the events, logged once."""

    def __init__(self, clock: IReactorTime, peers: Sequence[str],
                 max_per_account: int = 1000) -> None:
        super().__init__(clock, max_per_account)
        self._queues: dict[str, list[bytes]] = {peer: [] for peer in peers}
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sender.setblocking(False)  # never wait on a peer from the reactor thread
        self._flush_call: Any = None
        self._unreachable: set[str] = set()
        #: events that could not be relayed (for tests and debugging)
        self.dropped = 0

    def deliver(self, message: PushMessage) -> None:
        super().deliver(message)
        self._relay({"deliver": {"account_id": str(message.account_id),
                                 **message.to_json()}})

    def ack(self, account_id: uuid.UUID, notification_id: uuid.UUID) -> None:
        super().ack(account_id, notification_id)
        self._relay({"ack": {"account_id": str(account_id),
                             "notification_id": str(notification_id)}})

    def received(self, data: bytes) -> None:
        """A peer's datagram of events: applied here only (not relayed again)."""
        malformed = 0
        for line in data.split(b"\n"):
            try:
                event = json.loads(line)
                if "deliver" in event:
                    d = event["deliver"]
                    NotificationChannel.deliver(self, PushMessage(
                        uuid.UUID(d["account_id"]), uuid.UUID(d["notification_id"]),
                        uuid.UUID(d["conversation_id"]), uuid.UUID(d["message_id"]),
                        int(d["seq"])))
                elif "ack" in event:
                    a = event["ack"]
                    NotificationChannel.ack(self, uuid.UUID(a["account_id"]),
                                            uuid.UUID(a["notification_id"]))
            except (ValueError, KeyError, TypeError):
                malformed += 1
        if malformed:
            log.warn("ignored {count} malformed channel relay events in a datagram of "
                     "{size} bytes", count=malformed, size=len(data))

    def _relay(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":")).encode()
        for queue in self._queues.values():
            if len(queue) >= MAX_QUEUED_EVENTS:
                self.dropped += 1
                continue
            queue.append(line)
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self._clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        full = False
        for peer, queue in self._queues.items():
            while queue:
                size, n = 0, 0
                while n < len(queue) and (n == 0 or size + len(queue[n]) < MAX_DATAGRAM_BYTES):
                    size += len(queue[n]) + 1
                    n += 1
                try:
                    self._sender.sendto(b"\n".join(queue[:n]), peer)
                except BlockingIOError:  # its queue is full: try again shortly
                    full = True
                    break
                except OSError as e:  # not there (restarting): these events are lost
                    self.dropped += len(queue)
                    queue.clear()
                    if peer not in self._unreachable:
                        self._unreachable.add(peer)
                        log.warn("cannot relay to {peer}: {error} (a notification not "
                                 "acknowledged is pushed again; further failures to this peer "
                                 "are not logged until it answers)", peer=peer, error=e)
                    break
                del queue[:n]
                self._unreachable.discard(peer)
        if full:
            self._schedule(RETRY_FULL_S)

    def close(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._sender.close()


class _Receiver(protocol.DatagramProtocol):
    def __init__(self, channel: RelayedChannel) -> None:
        self._channel = channel

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        self._channel.received(data)


class ChannelRelayListener(Service):
    """Receives the peers' events for *channel* on the unix datagram socket *path*."""

    def __init__(self, reactor: Any, channel: RelayedChannel, path: str) -> None:
        self._reactor, self._channel, self.path = reactor, channel, path
        self._port: Any = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        import os

        if os.path.exists(self.path):  # left by this worker's previous process
            os.unlink(self.path)
        self._port = self._reactor.listenUNIXDatagram(self.path, _Receiver(self._channel),
                                                      maxPacketSize=RECEIVE_BYTES)
        super().startService()

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        port, self._port = self._port, None
        self._channel.close()
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)
