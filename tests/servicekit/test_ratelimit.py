"""The failure budgets of ``servicekit.ratelimit``, on a ``task.Clock``, and the two
stacks' login limits (``legacy.ratelimit``, ``cloud.ratelimit``).

The stacks never import each other; they share the toolkit's limits and arithmetic (the
cloud keeps its budgets in the store, tested in tests/cloud/test_login_ratelimit.py), so the
limits' tests run against both.
"""

from __future__ import annotations

import types

import pytest
from twisted.internet.task import Clock

from cloud import ratelimit as cloud_ratelimit
from legacy import ratelimit as legacy_ratelimit
from servicekit.ratelimit import TokenBuckets

IMPLEMENTATIONS = [legacy_ratelimit, cloud_ratelimit]


@pytest.fixture(params=IMPLEMENTATIONS, ids=["legacy", "cloud"])
def impl(request) -> types.ModuleType:
    return request.param


def buckets(capacity: int = 3, window_s: float = 60.0,
            max_keys: int = 100) -> tuple[Clock, TokenBuckets]:
    clock = Clock()
    clock.advance(1000)
    return clock, TokenBuckets(clock, capacity, window_s, max_keys)


def test_a_bucket_allows_capacity_then_says_how_long_to_wait():
    """Three takes empty a bucket of three; the wait is the time one token takes to refill."""
    _, b = buckets()
    for _ in range(3):
        assert b.wait_s("k") == 0.0
        b.take("k")
    assert b.wait_s("k") == pytest.approx(20.0)  # 3 per 60 s: one every 20 s
    assert b.wait_s("other") == 0.0


def test_a_bucket_refills_on_the_clock():
    """After the wait one try is back; after the whole window all of them are."""
    clock, b = buckets()
    for _ in range(3):
        b.take("k")
    clock.advance(19.9)
    assert b.wait_s("k") > 0
    clock.advance(0.1)
    assert b.wait_s("k") == 0.0
    clock.advance(40)
    for _ in range(3):
        assert b.wait_s("k") == 0.0
        b.take("k")
    assert b.wait_s("k") > 0


def test_giving_back_undoes_a_take():
    """A give_back after a take leaves the bucket as it was; a full bucket holds no entry."""
    _, b = buckets()
    b.take("k")
    b.give_back("k")
    assert len(b) == 0
    for _ in range(3):
        b.take("k")
    b.give_back("k")
    assert b.wait_s("k") == 0.0


def test_refilled_buckets_are_forgotten():
    """A bucket that has refilled completely is dropped on the next write to the table."""
    clock, b = buckets()
    for key in ("a", "b", "c"):
        b.take(key)
    assert len(b) == 3
    clock.advance(61)
    b.take("d")
    assert len(b) == 1


def test_a_flood_of_distinct_keys_stays_within_max_keys():
    """100,000 distinct keys in no time keep at most max_keys buckets, the newest ones."""
    _, b = buckets(max_keys=500)
    for i in range(100_000):
        b.take(f"handle-{i}")
    assert len(b) == 500
    assert b.wait_s("handle-99999") == 0.0 and b._spent.get("handle-99999") is not None
    assert b._spent.get("handle-0") is None


def test_past_max_keys_the_least_recently_used_bucket_goes_first():
    """A key touched again moves to the back: a flood of new keys evicts the quiet ones,
    not the one still being tried (its budget stays spent)."""
    _, b = buckets(max_keys=3)
    b.take("attacked")
    b.take("quiet-1")
    b.take("quiet-2")
    b.take("attacked")  # touched again: now the most recently used
    b.take("new")       # one too many: the least recently used goes
    assert set(b._spent) == {"quiet-2", "attacked", "new"}
    assert b._spent["attacked"][0] == pytest.approx(2.0)


def test_login_limiter_takes_from_both_budgets_or_from_neither():
    """A refusal by either budget takes nothing; success gives both tries back (the legacy
    login server's limiter; the cloud's keeps the same budgets in the store:
    tests/cloud/test_login_ratelimit.py)."""
    clock = Clock()
    limits = legacy_ratelimit.LoginLimits(per_handle=2, per_address=3, window_s=60.0)
    limiter = legacy_ratelimit.LoginLimiter(clock, limits)
    keys = limiter.handles
    assert limiter.attempt("alice", "10.0.0.1") == 0.0
    assert limiter.attempt("alice", "10.0.0.1") == 0.0
    assert limiter.attempt("alice", "10.0.0.1") == pytest.approx(30.0)  # alice is spent
    assert limiter.attempt("bob", "10.0.0.1") == 0.0  # the address had one more
    assert limiter.attempt("carol", "10.0.0.1") == pytest.approx(20.0)  # now it has none
    assert keys.wait_s("carol") == 0.0  # and the refusal took nothing from carol
    limiter.succeeded("bob", "10.0.0.1")
    assert limiter.attempt("carol", "10.0.0.1") == 0.0


@pytest.mark.parametrize("field", ["per_address", "window_s", "max_keys"])
def test_limits_must_be_positive(impl, field):
    """A zero limit is a configuration error, not a server that refuses everyone."""
    with pytest.raises(ValueError, match=field):
        impl.LoginLimits(**{field: 0})


def test_both_stacks_default_to_the_same_limits():
    """10 failures per handle/account and 30 per address per minute, on both stacks."""
    legacy, cloud = legacy_ratelimit.LoginLimits(), cloud_ratelimit.LoginLimits()
    assert (legacy.per_handle, legacy.per_address, legacy.window_s, legacy.max_keys) == \
        (cloud.per_account, cloud.per_address, cloud.window_s, cloud.max_keys) == \
        (10, 30, 60.0, 10_000)

