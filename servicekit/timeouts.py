"""Time limits for many waits that share one limit, on one timer.

``Deferred.addTimeout`` schedules a ``DelayedCall`` per wait and cancels it at the answer.
At thousands of injections a second with limits of seconds, the reactor's heap then holds
hundreds of thousands of cancelled calls, and every push, pop and rebuild of it pays for
them (the cloud -> legacy drain ran a third faster without them). Waits with the same limit
end in the order they start, so one FIFO and one timer armed for its head do the same job:
O(1) to start a wait and to end it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """One wait's limit: ``clear()`` it when the wait ends in time."""

    __slots__ = ("at", "expire")

    def __init__(self, at: float, expire: Callable[[], object]) -> None:
        self.at = at
        self.expire: Callable[[], object] | None = expire

    def clear(self) -> None:
        """The wait ended in time: its expiry will not be called."""
        self.expire = None


class FifoTimeouts:
    """Calls each wait's *expire* once *timeout_s* have passed on *clock* since ``start``,
    unless its ``Deadline`` was cleared first."""

    def __init__(self, clock: IReactorTime, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"a time limit must be positive, not {timeout_s!r}")
        self._clock = clock
        self.timeout_s = timeout_s
        self._waits: deque[Deadline] = deque()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        """Waits started and not yet expired (cleared ones included until their time)."""
        return len(self._waits)

    def start(self, expire: Callable[[], object]) -> Deadline:
        """Start a wait; *expire* runs if it is not cleared within the limit."""
        waits = self._waits
        while waits and waits[0].expire is None:  # answered already: forget them now
            waits.popleft()
        deadline = Deadline(self._clock.seconds() + self.timeout_s, expire)
        waits.append(deadline)
        if self._timer is None:
            self._timer = self._clock.callLater(self.timeout_s, self._fire)
        return deadline

    def cancel_all(self) -> None:
        """Forget every wait (none will expire) and stop the timer."""
        self._waits.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        waits = self._waits
        while waits and (waits[0].expire is None or waits[0].at <= now):
            deadline = waits.popleft()
            expire, deadline.expire = deadline.expire, None
            if expire is not None:
                expire()
        if waits and self._timer is None:  # an expiry may have started a wait (and timer)
            self._timer = self._clock.callLater(max(0.0, waits[0].at - now), self._fire)
