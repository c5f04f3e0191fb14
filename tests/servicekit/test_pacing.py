"""Pacer: at most N starts a second on an injected clock, evenly spaced, never a burst."""

from __future__ import annotations

import math

import pytest
from twisted.internet import defer, task

from servicekit.pacing import Pacer


def starts(clock: task.Clock, pacer: Pacer, n: int) -> list[float]:
    """Ask for *n* slots at once; the clock times at which each fired."""
    fired: list[float] = []
    for _ in range(n):
        pacer.wait().addCallback(lambda _: fired.append(clock.seconds()))
    while clock.getDelayedCalls():  # on to each timer's own time, exactly
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
    return fired


def test_waiters_start_one_interval_apart():
    """Rate 4: five callers asking at once start at 0, 0.25, 0.5, 0.75, 1.0."""
    clock = task.Clock()
    pacer = Pacer(clock, 4.0)
    assert starts(clock, pacer, 5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert (pacer.started, pacer.delayed) == (5, 4)


def test_slots_do_not_pile_up_while_idle():
    """After a quiet spell the next start is immediate, the one after it an interval later:
    idle time buys no burst."""
    clock = task.Clock()
    pacer = Pacer(clock, 2.0)
    starts(clock, pacer, 1)
    clock.advance(30.0)
    t0 = clock.seconds()
    assert [t - t0 for t in starts(clock, pacer, 3)] == pytest.approx([0.0, 0.5, 1.0])


def test_a_fractional_rate_spaces_by_seconds():
    """Rate 0.5: one start every 2 s."""
    clock = task.Clock()
    assert starts(clock, Pacer(clock, 0.5), 3) == pytest.approx([0.0, 2.0, 4.0])


def test_a_cancelled_wait_leaves_nothing_on_the_clock():
    """A deadline cancelling a wait fails it and removes its timer."""
    clock = task.Clock()
    pacer = Pacer(clock, 1.0)
    pacer.wait()
    waiting = pacer.wait()
    assert len(clock.getDelayedCalls()) == 1
    waiting.cancel()
    waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("rate", [0, -1.0, math.inf, math.nan])
def test_a_rate_that_is_not_positive_and_finite_is_refused(rate):
    """No pacer for a rate that would never start anything, or never wait."""
    with pytest.raises(ValueError, match="rate must be a positive finite number"):
        Pacer(task.Clock(), rate)
