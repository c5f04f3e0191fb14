"""``SimClock``: a ``twisted.internet.task.Clock`` with a heap, for simulations of 10^5 timers.

``Clock.callLater`` re-sorts its whole list on every call, which is fine in a unit test and
quadratic in a simulation of a hundred thousand devices. This subclass keeps the same
interface and the same order (by time, then by scheduling order) with a heap, and advances
time to each call's own moment so ``seconds()`` inside a callback is the time it was due.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock
from twisted.python.failure import Failure


class SimClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._seq = 0

    def callLater(self, delay: float, callable: Callable[..., Any],  # noqa: N802, A002
                  *args: object, **kw: object) -> DelayedCall:
        if delay < 0:
            delay = 0
        dc = DelayedCall(self.seconds() + delay, callable, args, kw,
                         lambda c: None, self._push, seconds=self.seconds)
        self._push(dc)
        return dc

    def _push(self, dc: DelayedCall) -> None:
        self._seq += 1
        dc._sim_seq = self._seq  # entries with another seq for this call are stale
        heapq.heappush(self._heap, (dc.getTime(), self._seq, dc))

    def _live_head(self) -> DelayedCall | None:
        heap = self._heap
        while heap:
            _, seq, dc = heap[0]
            if dc.cancelled or dc.called or dc._sim_seq != seq:
                heapq.heappop(heap)
                continue
            return dc
        return None

    def next_call_time(self) -> float | None:
        dc = self._live_head()
        return None if dc is None else dc.getTime()

    def advance(self, amount: float) -> None:
        target = self.rightNow + amount
        while True:
            dc = self._live_head()
            if dc is None or dc.getTime() > target:
                break
            heapq.heappop(self._heap)
            self.rightNow = max(self.rightNow, dc.getTime())
            dc.called = 1
            dc.func(*dc.args, **dc.kw)
        self.rightNow = target

    def run_until(self, until: float) -> None:
        """Run every call due up to *until*, jumping straight from one to the next."""
        self.advance(max(0.0, until - self.rightNow))

    def result_of(self, d: defer.Deferred, timeout_s: float) -> Any:
        """Run the clock until *d* has a result, at most *timeout_s* simulated seconds on;
        return it or raise its exception (``TimeoutError`` when it has none by then)."""
        results: list[Any] = []
        d.addBoth(results.append)
        deadline = self.rightNow + timeout_s
        while not results:
            nxt = self.next_call_time()
            if nxt is None or nxt > deadline:
                raise TimeoutError(f"no result within {timeout_s:g} simulated seconds")
            self.run_until(nxt)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def getDelayedCalls(self) -> list[DelayedCall]:  # noqa: N802
        return [dc for _, seq, dc in self._heap
                if not (dc.cancelled or dc.called or dc._sim_seq != seq)]
