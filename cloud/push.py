"""Push delivery: the gateway interface, and the channel cloud devices long-poll.

    dispatcher --push()--> PushGateway --deliver()--> NotificationChannel <--wait()-- device
        ^                                                                          |
        +------------ notifications.ack_notification <-- POST .../ack -------------+

A gateway's ``push`` fires when it *accepts* a notification; that is not proof of
delivery (a real push service drops some silently). Only the device's acknowledgement
is, which is why the dispatcher re-sends unacknowledged notifications with the same id and
why a mailbox keyed by notification id makes a duplicate delivery harmless.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime


@attrs.frozen
class PushMessage:
    account_id: uuid.UUID
    notification_id: uuid.UUID
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    seq: int

    def to_json(self) -> dict:
        return {"notification_id": str(self.notification_id),
                "conversation_id": str(self.conversation_id),
                "message_id": str(self.message_id), "seq": self.seq}


class PushRejected(Exception):
    """The gateway refused a push (a transient error: the dispatcher retries later)."""


class PushGateway(Protocol):
    def push(self, message: PushMessage) -> defer.Deferred:
        """Fires (with None) when the gateway accepted *message*; errbacks PushRejected."""


class NotificationChannel:
    """Per-account mailboxes of delivered, not yet acknowledged notifications.

    ``wait`` answers at once when the mailbox has something, else when something arrives
    or *timeout_s* passes (with an empty list). A mailbox holds at most
    ``max_per_account`` notifications; past that the oldest are dropped, which is safe
    because an unacknowledged notification is re-sent.
    """

    def __init__(self, clock: IReactorTime, max_per_account: int = 1000) -> None:
        self._clock = clock
        self._max = max_per_account
        self._boxes: dict[uuid.UUID, dict[uuid.UUID, PushMessage]] = {}
        self._waiters: dict[uuid.UUID, list[defer.Deferred]] = {}

    def deliver(self, message: PushMessage) -> None:
        box = self._boxes.setdefault(message.account_id, {})
        box[message.notification_id] = message
        while len(box) > self._max:
            del box[next(iter(box))]
        for waiter in self._waiters.pop(message.account_id, []):
            waiter.callback(list(box.values()))

    def pending(self, account_id: uuid.UUID) -> list[PushMessage]:
        return list(self._boxes.get(account_id, {}).values())

    def ack(self, account_id: uuid.UUID, notification_id: uuid.UUID) -> None:
        box = self._boxes.get(account_id)
        if box is not None:
            box.pop(notification_id, None)
            if not box:
                del self._boxes[account_id]

    def waiting(self) -> int:
        """How many long-polls are parked (for metrics and tests)."""
        return sum(len(w) for w in self._waiters.values())

    def wait(self, account_id: uuid.UUID, timeout_s: float) -> defer.Deferred:
        """The account's pending notifications, now or when one arrives (or [] on timeout)."""
        ready = self.pending(account_id)
        if ready or timeout_s <= 0:
            return defer.succeed(ready)
        timer: Any = None

        def cancel(d: defer.Deferred) -> None:
            self._forget(account_id, d)
            if timer is not None and timer.active():
                timer.cancel()

        d: defer.Deferred = defer.Deferred(cancel)
        self._waiters.setdefault(account_id, []).append(d)

        def timed_out() -> None:
            self._forget(account_id, d)
            d.callback([])

        timer = self._clock.callLater(timeout_s, timed_out)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stop_timer)
        return d

    def _forget(self, account_id: uuid.UUID, d: defer.Deferred) -> None:
        waiters = self._waiters.get(account_id)
        if waiters and d in waiters:
            waiters.remove(d)
            if not waiters:
                del self._waiters[account_id]
