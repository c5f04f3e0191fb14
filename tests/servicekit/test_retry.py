"""RetryPolicy: exponential delays, the cap, the jitter range, validation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servicekit.retry import RetryPolicy


def test_without_jitter_delays_grow_exponentially_up_to_the_cap():
    """jitter=0 gives initial * factor**(attempt-1), never above cap_s."""
    policy = RetryPolicy(initial_s=0.5, factor=2, cap_s=10, jitter=0)
    rng = random.Random(1)
    assert [policy.delay(a, rng) for a in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_factor_one_is_a_constant_delay():
    """factor=1 is a fixed interval, a legitimate policy too."""
    policy = RetryPolicy(initial_s=3, factor=1, cap_s=3, jitter=0)
    assert {policy.delay(a, random.Random(a)) for a in range(1, 50)} == {3.0}


def test_a_huge_attempt_number_is_the_cap_not_an_overflow():
    """A retry counter that ran for ages still yields the cap rather than OverflowError."""
    policy = RetryPolicy(initial_s=1, factor=10, cap_s=60, jitter=0)
    assert policy.delay(10**6, random.Random(0)) == 60


@given(attempt=st.integers(min_value=1, max_value=10_000), seed=st.integers(0, 2**32),
       jitter=st.floats(min_value=0, max_value=1))
def test_jittered_delay_lies_between_base_less_jitter_and_base(attempt, seed, jitter):
    """Jitter only shortens a delay, by at most the jitter fraction; the cap is hard."""
    policy = RetryPolicy(initial_s=0.25, factor=3, cap_s=20, jitter=jitter)
    base = policy.base_delay(attempt)
    delay = policy.delay(attempt, random.Random(seed))
    assert base * (1 - jitter) <= delay <= base <= 20


def test_jitter_spreads_delays_over_its_whole_range():
    """Many draws cover most of [base*(1-jitter), base], so clients do not retry in step."""
    policy = RetryPolicy(initial_s=4, factor=2, cap_s=4, jitter=0.5)
    rng = random.Random(7)
    delays = [policy.delay(1, rng) for _ in range(2000)]
    assert 2.0 <= min(delays) < 2.05 and 3.95 < max(delays) <= 4.0


def test_same_seed_same_delays():
    """A seeded rng reproduces the delays: one draw per call, whatever the jitter."""
    policy = RetryPolicy(jitter=0.3)
    runs = [[policy.delay(a, random.Random(42)) for a in range(1, 10)] for _ in range(2)]
    assert runs[0] == runs[1]
    rng_a, rng_b = random.Random(5), random.Random(5)
    RetryPolicy(jitter=0).delay(1, rng_a)
    rng_b.random()
    assert rng_a.random() == rng_b.random()


@pytest.mark.parametrize("kwargs, message", [
    ({"initial_s": 0}, "initial_s"),
    ({"initial_s": -1}, "initial_s"),
    ({"initial_s": float("nan")}, "initial_s"),
    ({"factor": 0.5}, "factor"),
    ({"cap_s": float("inf")}, "cap_s"),
    ({"initial_s": 5, "cap_s": 2}, "cap_s"),
    ({"jitter": -0.1}, "jitter"),
    ({"jitter": 1.5}, "jitter"),
])
def test_invalid_parameters_are_refused_with_the_field_named(kwargs, message):
    """A bad policy fails where it is configured, naming the offending field."""
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("attempt", [0, -1, 1.5, True])
def test_attempts_count_from_one(attempt):
    """Attempt numbers are integers from 1; anything else is a caller's bug."""
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().delay(attempt, random.Random(0))


@pytest.mark.parametrize("initial_s, cap_s, legacy", [
    (1.0, 10.0, lambda n, r: min(10.0, 0.5 * 2 ** min(n, 5)) * (0.5 + r)),  # supernode links
    (2.0, 30.0, lambda n, r: min(30.0, 1.0 * 2 ** min(n, 5)) * (0.5 + r)),  # client devices
])
def test_spread_half_jitter_is_the_legacy_backoff_bit_for_bit(initial_s, cap_s, legacy):
    """jitter=0.5 spread gives exactly the legacy network's ``base * (0.5 + r)`` delays,
    with one draw per delay, so a seeded simulation's trace is unchanged."""
    policy = RetryPolicy(initial_s=initial_s, factor=2, cap_s=cap_s, jitter=0.5,
                         jitter_mode="spread")
    for seed in range(50):
        ours, theirs = random.Random(seed), random.Random(seed)
        for n in (*range(1, 12), 1000):
            assert policy.delay(n, ours) == legacy(n, theirs.random())
        assert ours.random() == theirs.random()


@given(attempt=st.integers(min_value=1, max_value=10_000), seed=st.integers(0, 2**32),
       jitter=st.floats(min_value=0, max_value=1))
def test_spread_delay_lies_within_jitter_on_both_sides_of_the_base(attempt, seed, jitter):
    """Spread jitter adds or takes off at most the jitter fraction of the (capped) base."""
    policy = RetryPolicy(initial_s=0.25, factor=3, cap_s=20, jitter=jitter, jitter_mode="spread")
    base = policy.base_delay(attempt)
    delay = policy.delay(attempt, random.Random(seed))
    assert base * (1 - jitter) * (1 - 1e-12) <= delay <= base * (1 + jitter) * (1 + 1e-12)


def test_spread_jitter_covers_both_sides_of_the_base():
    """Many spread draws fall both below and above the base, over most of the range."""
    policy = RetryPolicy(initial_s=4, factor=2, cap_s=4, jitter=0.5, jitter_mode="spread")
    rng = random.Random(7)
    delays = [policy.delay(1, rng) for _ in range(2000)]
    assert 2.0 <= min(delays) < 2.05 and 5.95 < max(delays) <= 6.0


def test_the_default_jitter_mode_shortens_as_before():
    """Existing policies keep their jitter: the default mode is "shorten"."""
    assert RetryPolicy().jitter_mode == "shorten"
    shorten = RetryPolicy(jitter=0.3, jitter_mode="shorten")
    assert [shorten.delay(a, random.Random(a)) for a in range(1, 9)] == [
        RetryPolicy(jitter=0.3).delay(a, random.Random(a)) for a in range(1, 9)]


def test_an_unknown_jitter_mode_is_refused_with_the_field_named():
    """A jitter mode other than shorten or spread fails where it is configured."""
    with pytest.raises(ValueError, match="jitter_mode"):
        RetryPolicy(jitter_mode="full")
