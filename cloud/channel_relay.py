"""The notification channel shared by several API processes (``cloud run --processes N``).

A device long-polls whichever worker accepted its connection, but pushes arrive at the
one worker that runs the dispatcher (and its gateway). Each worker's channel therefore
relays what it learns to the others, one unix datagram per event::

    worker 0: gateway --deliver()--> RelayedChannel --datagram--> worker 1's channel-1.sock
                                        |                                |
                                        v                                v
                                  its mailboxes                    its mailboxes
    worker k: POST .../ack --ack()--> RelayedChannel --datagram--> every other worker

A datagram that cannot be sent (a worker restarting, its queue full) is dropped and
logged once per peer: the notification is not acknowledged in the store, so the dispatcher
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


class RelayedChannel(NotificationChannel):
    """A ``NotificationChannel`` whose deliveries and acknowledgements also reach the
    channels of the *peers* (their datagram socket paths)."""

    def __init__(self, clock: IReactorTime, peers: Sequence[str],
                 max_per_account: int = 1000) -> None:
        super().__init__(clock, max_per_account)
        self._peers = list(peers)
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sender.setblocking(False)  # never wait on a peer from the reactor thread
        self._unreachable: set[str] = set()
        #: datagrams that could not be sent (for tests and debugging)
        self.dropped = 0

    def deliver(self, message: PushMessage) -> None:
        super().deliver(message)
        self._send({"deliver": {"account_id": str(message.account_id),
                                **message.to_json()}})

    def ack(self, account_id: uuid.UUID, notification_id: uuid.UUID) -> None:
        super().ack(account_id, notification_id)
        self._send({"ack": {"account_id": str(account_id),
                            "notification_id": str(notification_id)}})

    def received(self, data: bytes) -> None:
        """A peer's event: applied here only (not relayed again)."""
        try:
            event = json.loads(data)
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
            log.warn("ignoring a malformed channel relay datagram ({size} bytes)",
                     size=len(data))

    def _send(self, event: dict) -> None:
        payload = json.dumps(event, separators=(",", ":")).encode()
        for peer in self._peers:
            try:
                self._sender.sendto(payload, peer)
            except OSError as e:
                self.dropped += 1
                if peer not in self._unreachable:
                    self._unreachable.add(peer)
                    log.warn("cannot relay to {peer}: {error} (the notification is pushed "
                             "again if it is not acknowledged; further failures to this "
                             "peer are not logged until it answers)", peer=peer, error=e)
            else:
                self._unreachable.discard(peer)

    def close(self) -> None:
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
        self._port = self._reactor.listenUNIXDatagram(self.path, _Receiver(self._channel))
        super().startService()

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        port, self._port = self._port, None
        self._channel.close()
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)
