"""ResizableSemaphore: a limit that changes in place, holders and waiters kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servicekit.semaphore import ResizableSemaphore


def acquired(sem: ResizableSemaphore, n: int) -> tuple[list, list]:
    ds = [sem.acquire() for _ in range(n)]
    return [d for d in ds if d.called], [d for d in ds if not d.called]


def test_raising_the_limit_lets_waiters_in_at_once():
    """Two holders, three waiters, limit 2 -> 4: two waiters get a token now, one waits."""
    sem = ResizableSemaphore(2)
    held, waiting = acquired(sem, 5)
    assert (len(held), len(waiting)) == (2, 3)
    sem.resize(4)
    assert [d.called for d in waiting] == [True, True, False]
    assert sem.holders == 4 and sem.tokens == 0 and sem.limit == 4


def test_lowering_the_limit_takes_free_tokens_then_releases_until_under_it():
    """Limit 4 with 3 holders -> 1: the free token goes at once; the next two releases
    are owed and let nobody in; only the third lets a waiter in."""
    sem = ResizableSemaphore(4)
    held, _ = acquired(sem, 3)
    sem.resize(1)
    assert sem.tokens == 0 and sem.owed == 2 and sem.holders == 3
    later, waiting = acquired(sem, 1)
    assert later == [] and len(waiting) == 1
    sem.release()
    sem.release()
    assert not waiting[0].called and sem.holders == 1
    sem.release()
    assert waiting[0].called and sem.holders == 1


def test_raising_again_first_forgives_what_a_shrink_still_owed():
    """A shrink still owed tokens; raising the limit again cancels that first, so no more
    than the new limit ever hold a token."""
    sem = ResizableSemaphore(4)
    acquired(sem, 4)
    sem.resize(1)  # owes 3
    sem.resize(3)  # owes 1: 4 holders, limit 3
    assert sem.owed == 1 and sem.holders == 4
    _, waiting = acquired(sem, 1)
    sem.release()  # the owed one
    assert not waiting[0].called
    sem.release()
    assert waiting[0].called and sem.holders == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_a_limit_that_is_not_a_positive_integer_is_refused(bad):
    sem = ResizableSemaphore(2)
    with pytest.raises(ValueError, match="positive integer"):
        sem.resize(bad)
    assert sem.limit == 2


@given(st.lists(st.one_of(st.tuples(st.just("acquire")), st.tuples(st.just("release")),
                          st.tuples(st.just("resize"), st.integers(1, 6))), max_size=60))
def test_never_more_holders_than_the_limit_once_the_old_ones_left(ops):
    """Over any sequence of acquires, releases and resizes, tokens + holders = limit + owed,
    and no acquire succeeds while as many as the limit hold a token."""
    sem = ResizableSemaphore(3)
    holding = 0
    pending = []
    for op in ops:
        if op[0] == "acquire":
            before = sem.holders
            d = sem.acquire()
            if d.called:
                assert before < sem.limit
                holding += 1
            else:
                pending.append(d)
        elif op[0] == "release" and holding:
            sem.release()
            holding -= 1
        elif op[0] == "resize":
            sem.resize(op[1])
        newly = [d for d in pending if d.called]
        holding += len(newly)
        pending = [d for d in pending if not d.called]
        assert sem.holders == holding
        assert sem.tokens >= 0 and sem.owed >= 0
        assert sem.tokens == 0 or not pending
        if sem.owed:
            assert sem.holders > sem.limit and sem.tokens == 0
