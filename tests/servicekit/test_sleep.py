"""The cancellable sleep on an injected clock: it fires on time, or early when woken, or
fails when cancelled, and never leaves a timer behind."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from servicekit.sleep import Sleeper, sleep


class SleepTests(SynchronousTestCase):
    def test_fires_with_none_after_the_given_seconds(self):
        """Nothing before the time; None at the time; no timer left."""
        clock = Clock()
        d = sleep(clock, 2.0)
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_firing_it_early_wakes_it_and_removes_its_timer(self):
        """A callback before the time ends the wait now and cancels the timer."""
        clock = Clock()
        d = sleep(clock, 5.0)
        d.callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)  # the cancelled timer does not fire the Deferred again

    def test_cancelling_fails_it_and_removes_its_timer(self):
        """cancel() is a CancelledError now, and nothing stays scheduled."""
        clock = Clock()
        d = sleep(clock, 5.0)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class SleeperTests(SynchronousTestCase):
    def test_a_wait_ends_on_time_and_is_forgotten(self):
        """A Sleeper's wait fires after its seconds, like sleep(), and then is not pending."""
        clock = Clock()
        sleeper = Sleeper(clock)
        d = sleeper.sleep(1.0)
        self.assertEqual(len(sleeper.timers), 1)
        clock.advance(1.0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(sleeper.timers, ())

    def test_wake_ends_every_wait_now(self):
        """wake() fires all pending waits with None and cancels their timers."""
        clock = Clock()
        sleeper = Sleeper(clock)
        first, second = sleeper.sleep(3.0), sleeper.sleep(7.0)
        sleeper.wake()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual((sleeper.timers, clock.getDelayedCalls()), ((), []))

    def test_a_wait_started_by_a_woken_waiter_is_not_woken_too(self):
        """Code that carries on after wake() and sleeps again waits the whole new pause."""
        clock = Clock()
        sleeper = Sleeper(clock)
        again: list[defer.Deferred] = []
        sleeper.sleep(3.0).addCallback(lambda _: again.append(sleeper.sleep(2.0)))
        sleeper.wake()
        self.assertNoResult(again[0])
        clock.advance(2.0)
        self.assertIsNone(self.successResultOf(again[0]))

    def test_wake_with_nothing_pending_does_nothing(self):
        """A stop request while no wait is in progress is harmless."""
        sleeper = Sleeper(Clock())
        sleeper.wake()
        sleeper.cancel()
        self.assertEqual(sleeper.timers, ())

    def test_cancel_fails_every_wait(self):
        """cancel() fails all pending waits with CancelledError and leaves no timer."""
        clock = Clock()
        sleeper = Sleeper(clock)
        waits = [sleeper.sleep(1.0), sleeper.sleep(2.0)]
        sleeper.cancel()
        for d in waits:
            self.failureResultOf(d, defer.CancelledError)
        self.assertEqual((sleeper.timers, clock.getDelayedCalls()), ((), []))
