"""Which lag came from faults: the moments a worker met one, and whether a lag sample's span
holds any.

A message that waited through a lost feed, a failed injection, a database outage or the
worker's own (re)start has a lag that says more about the fault than about the bridge. The
followers and the injector mark those moments here; each lag sample is tagged with whether
its span (from when the message was sent or queued to when it was committed or
acknowledged) holds one, and the heartbeat reports the p99 of the untagged ("steady") samples
beside the p99 of all, with how many met a fault. An outside check can then tell "slow"
from "recovering".
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Reversible


class FaultMoments:
    """The moments (clock seconds, in order) a component met a fault, kept for *keep_s*."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self.keep_s = keep_s
        self._times: deque[float] = deque()

    def mark(self, t: float) -> None:
        """A fault at *t* (the component's clock; never earlier than the last mark)."""
        self._times.append(t)
        while self._times and self._times[0] < t - self.keep_s:
            self._times.popleft()

    def met(self, start: float, end: float) -> bool:
        """Whether a fault was marked within [*start*, *end*]."""
        i = bisect.bisect_left(self._times, start)
        return i < len(self._times) and self._times[i] <= end


def recent_samples(samples: Reversible[tuple[float, float, bool]],
                   since: float) -> list[tuple[float, bool]]:
    """The (lag, met a fault) of the (time, lag, met) *samples* at or after *since*.

    Samples are appended in time order, so they are read from the newest back and the first
    older one ends the read: a heartbeat costs what its window holds, not the 10,000
    samples each follower keeps (a quiet feed's are mostly older than the window; in a
    simulated day, scanning them all was 3% of the run). A clock stepped back could hide a
    few in-window samples behind an older one: a metric's loss for one window.
    """
    out = []
    for t, lag, met in reversed(samples):
        if t < since:
            break
        out.append((lag, met))
    return out


def percentile_ms(samples: list[float], q: float) -> int | None:
    """The *q* quantile of lags in seconds, as milliseconds (None without samples)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000)


def p99_ms(samples: list[float]) -> int | None:
    return percentile_ms(samples, 0.99)


def split_p99_ms(samples: list[tuple[float, bool]]) -> dict[str, int | None]:
    """From (lag seconds, met a fault) samples: the p99 of the steady ones, in ms, and how
    many there were, and how many met a fault."""
    steady = [lag for lag, met in samples if not met]
    return {"p99_steady_ms": p99_ms(steady), "samples": len(samples),
            "met_faults": len(samples) - len(steady)}
