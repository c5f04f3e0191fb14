"""FifoTimeouts: many waits with one limit on one timer."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from servicekit.timeouts import FifoTimeouts


def test_each_wait_expires_at_its_own_limit_unless_cleared():
    clock, expired = Clock(), []
    limits = FifoTimeouts(clock, 10.0)
    limits.start(lambda: expired.append("a"))
    clock.advance(3)
    b = limits.start(lambda: expired.append("b"))
    limits.start(lambda: expired.append("c"))
    clock.advance(6.9)
    assert expired == []
    clock.advance(0.1)  # a's limit: 10 s after it started
    assert expired == ["a"]
    b.clear()  # answered in time
    clock.advance(3)  # b's and c's limits (13 s)
    assert expired == ["a", "c"]
    assert len(clock.getDelayedCalls()) == 0 and len(limits) == 0


def test_one_timer_serves_every_wait():
    """Thousands of waits cost one DelayedCall, not one each; cleared ones are forgotten as
    later waits start."""
    clock = Clock()
    limits = FifoTimeouts(clock, 5.0)
    for _ in range(1000):
        limits.start(lambda: None).clear()
    assert len(clock.getDelayedCalls()) == 1
    limits.start(lambda: None)
    assert len(limits) == 1


def test_an_expiry_may_start_another_wait_and_cancel_all_stops_everything():
    clock, expired = Clock(), []
    limits = FifoTimeouts(clock, 1.0)

    def again():
        expired.append(clock.seconds())
        if len(expired) < 3:
            limits.start(again)

    limits.start(again)
    clock.pump([1.0] * 5)
    assert expired == [1.0, 2.0, 3.0]
    limits.start(lambda: expired.append("never"))
    limits.cancel_all()
    clock.advance(5)
    assert expired == [1.0, 2.0, 3.0] and clock.getDelayedCalls() == []


def test_a_limit_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        FifoTimeouts(Clock(), 0)
