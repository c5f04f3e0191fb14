"""Pacing on an injected clock: at most *rate* starts per second, evenly spaced.

``Pacer.wait()`` is a Deferred that fires when the caller may start its next request: at
once when the last start was at least ``1 / rate`` seconds ago, else at the next free slot.
Each call takes the slot after the last one given, so callers that wait one after another
(or at once) start ``1 / rate`` apart, never in a burst::

    rate 4/s:   wait() t=0.00 -> now      wait() t=0.00 -> 0.25      wait() t=0.10 -> 0.50
                wait() t=2.00 -> now  (slots do not pile up while nobody asks)

A wait is a ``servicekit.sleep.sleep``: cancelling it (a run's deadline) cancels its timer.
The slot it held stays taken, which only ever spaces the next start further apart.
"""

from __future__ import annotations

import math

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from servicekit.sleep import sleep


class Pacer:
    """At most *rate* starts per second on *clock* (see the module docstring)."""

    def __init__(self, clock: IReactorTime, rate: float) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number, got {rate!r}")
        self._clock = clock
        self.rate = rate
        self._interval = 1.0 / rate
        self._next = -math.inf  # the earliest moment the next start may happen
        #: how many starts were given, and how many had to wait for their slot
        self.started = 0
        self.delayed = 0

    def wait(self) -> defer.Deferred[None]:
        """Fires with None at the caller's slot (at once when it is free now)."""
        now = self._clock.seconds()
        at = max(now, self._next)
        self._next = at + self._interval
        self.started += 1
        if at <= now:
            return defer.succeed(None)
        self.delayed += 1
        return sleep(self._clock, at - now)
