"""bridge.ops.metrics.BulkHistogram: a batch observed at once exports what Histogram would."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bridge.ops.metrics import BulkHistogram

BUCKETS = (0.005, 0.01, 0.1, 1, 2.5, 300)
values = st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=50)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text exposition without comments and _created samples, sorted."""
    return sorted(line for line in generate_latest(registry).decode()
                  .splitlines() if line and not line.startswith("#") and "_created" not in line)


@given(st.lists(values, max_size=5), values)
@example(batches=[[0.0, 0.005, 0.01, 1.0, 300.0], [0.1]], other=[2.5, 300.0001, 1000.0])
def test_batches_export_exactly_what_histogram_exports_for_the_same_values(batches, other):
    """Bucket boundaries (le, values equal to a bound included), counts, sum, per label."""
    reference, bulk_registry = CollectorRegistry(), CollectorRegistry()
    hist = Histogram("lag_seconds", "Lag.", ["direction"], buckets=BUCKETS,
                     registry=reference)
    bulk = BulkHistogram("lag_seconds", "Lag.", "direction", BUCKETS)
    bulk_registry.register(bulk)
    for batch in batches:
        child = hist.labels(direction="to_cloud")  # a series exists once labelled, in both
        for v in batch:
            child.observe(v)
        bulk.labels(direction="to_cloud").observe_many(batch)
    for v in other:
        hist.labels(direction="to_legacy").observe(v)
        bulk.labels(direction="to_legacy").observe(v)
    assert exposition(bulk_registry) == exposition(reference)


def test_a_label_it_does_not_have_is_refused():
    bulk = BulkHistogram("lag_seconds", "Lag.", "direction", BUCKETS)
    with pytest.raises(ValueError, match="exactly the label 'direction'"):
        bulk.labels(kind="x")


def test_a_batch_whose_values_fail_part_way_counts_nothing():
    """Counts and sum stay in step: a generator that raises mid-batch adds no value."""
    registry = CollectorRegistry()
    bulk = BulkHistogram("lag_seconds", "Lag.", "direction", BUCKETS)
    registry.register(bulk)
    bulk.labels(direction="to_cloud").observe_many([0.5])

    def failing():
        yield 0.001
        raise RuntimeError("feed broke")

    with pytest.raises(RuntimeError):
        bulk.labels(direction="to_cloud").observe_many(failing())
    assert registry.get_sample_value("lag_seconds_count", {"direction": "to_cloud"}) == 1
    assert registry.get_sample_value("lag_seconds_sum", {"direction": "to_cloud"}) == 0.5
