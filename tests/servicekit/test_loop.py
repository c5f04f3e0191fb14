"""servicekit.loop: a loop's failure counter exports every reason from the start."""

from __future__ import annotations

from prometheus_client import REGISTRY

from servicekit.loop import FAILURE_REASONS, failure_counter


def test_a_failure_counter_exports_every_reason_at_zero_before_any_failure():
    """rate() over a loop's failures sees the first one: each reason is there, at 0."""
    counter = failure_counter("servicekit_test_loop_failures_total", "test loop failures")
    for reason in FAILURE_REASONS:
        assert REGISTRY.get_sample_value("servicekit_test_loop_failures_total",
                                         {"reason": reason}) == 0.0
    counter.labels(reason="error").inc()
    assert REGISTRY.get_sample_value("servicekit_test_loop_failures_total",
                                     {"reason": "error"}) == 1.0
