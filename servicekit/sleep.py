"""Waiting on an injected clock, in a way the waiter's owner can end early.

``sleep(clock, seconds)`` is a Deferred that fires with None after *seconds* on *clock* (an
``IReactorTime``: the reactor, or a ``task.Clock`` in tests). Whichever way it ends, its
timer goes with it, so nothing stays scheduled on the clock::

    sleep --timer--------------> fires None
          --callback(None)-----> fires None now, timer cancelled    (woken early)
          --cancel()-----------> fails with CancelledError, timer cancelled

A ``Sleeper`` holds the waits of one owner (a Service's retry and backoff pauses) so that
the owner can end them all: ``wake()`` when the waiter should carry on now and notice that
it was asked to stop, ``cancel()`` when it should not carry on at all.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime


def sleep(clock: IReactorTime, seconds: float) -> defer.Deferred[None]:
    """A Deferred that fires with None after *seconds* on *clock* (see the module
    docstring for ending it early)."""
    return _timed_wait(clock, seconds)[0]


def _timed_wait(clock: IReactorTime,
                seconds: float) -> tuple[defer.Deferred[None], IDelayedCall]:
    d: defer.Deferred[None] = defer.Deferred()
    call = clock.callLater(seconds, d.callback, None)

    def stop_timer(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    d.addBoth(stop_timer)
    return d, call


class Sleeper:
    """The waits of one owner on one clock, which the owner can end early."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiting: list[tuple[defer.Deferred[None], IDelayedCall]] = []

    @property
    def timers(self) -> tuple[IDelayedCall, ...]:
        """The timers of the waits in progress, oldest first (a simulated kill cancels
        them: the waits then never end, as in a process that is gone)."""
        return tuple(call for _, call in self._waiting)

    def sleep(self, seconds: float) -> defer.Deferred[None]:
        """Fires with None after *seconds*, or when ``wake()`` is called before."""
        wait = _timed_wait(self._clock, seconds)
        self._waiting.append(wait)

        def done(result: Any) -> Any:
            self._waiting.remove(wait)
            return result

        wait[0].addBoth(done)
        return wait[0]

    def wake(self) -> None:
        """End every wait now, as if its time had come."""
        for d, _ in list(self._waiting):
            if not d.called:
                d.callback(None)

    def cancel(self) -> None:
        """Fail every wait with ``CancelledError`` now."""
        for d, _ in list(self._waiting):
            d.cancel()
