"""servicekit.loop: a loop's failure counter exports every reason from the start, and a
tick that hangs shows in how long it has run."""

from __future__ import annotations

from prometheus_client import REGISTRY
from twisted.internet import defer
from twisted.internet.task import Clock

from servicekit.loop import FAILURE_REASONS, PollingLoop, failure_counter


def test_a_failure_counter_exports_every_reason_at_zero_before_any_failure():
    """rate() over a loop's failures sees the first one: each reason is there, at 0."""
    counter = failure_counter("servicekit_test_loop_failures_total", "test loop failures")
    for reason in FAILURE_REASONS:
        assert REGISTRY.get_sample_value("servicekit_test_loop_failures_total",
                                         {"reason": reason}) == 0.0
    counter.labels(reason="error").inc()
    assert REGISTRY.get_sample_value("servicekit_test_loop_failures_total",
                                     {"reason": "error"}) == 1.0


class GatedLoop(PollingLoop):
    """A loop whose ticks wait for the test to let them finish."""

    description = "gated loop"
    failure_counter = failure_counter("servicekit_test_gated_failures_total", "test")

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, 1.0, "gated")
        self.gate: defer.Deferred = defer.Deferred()

    async def _tick(self) -> bool:
        await self.gate
        self.gate = defer.Deferred()
        return False


def test_tick_running_s_says_how_long_the_tick_in_flight_has_run():
    """0 while waiting between ticks; the age of the tick in flight otherwise (what the
    systemd watchdog asks of the notification dispatcher)."""
    clock = Clock()
    loop = GatedLoop(clock)
    loop.startService()
    clock.advance(0)  # the first tick starts and waits at its gate
    clock.advance(42)
    assert loop.tick_running_s() == 42.0
    loop.gate.callback(None)
    assert loop.tick_running_s() == 0.0
    clock.advance(0.5)
    assert loop.tick_running_s() == 0.0  # waiting for the next tick
    clock.advance(0.5)
    clock.advance(3)
    assert loop.tick_running_s() == 3.0
    loop.gate.callback(None)
    loop.stopService()
