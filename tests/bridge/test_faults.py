"""Which lag came from faults (bridge/faults.py), and the injector's and follower's use of it."""

from __future__ import annotations

import pytest

from bridge.faults import FaultMoments, recent_samples, split_p99_ms
from tests.bridge.test_outbox import make_scene, two_party  # noqa: F401 - fixtures


def test_a_span_holding_a_fault_moment_met_it_and_old_moments_are_dropped():
    faults = FaultMoments(keep_s=100.0)
    for t in (10.0, 50.0):
        faults.mark(t)
    assert faults.met(5.0, 10.0) and faults.met(40.0, 60.0) and faults.met(10.0, 10.0)
    assert not faults.met(11.0, 49.9) and not faults.met(50.1, 200.0)
    faults.mark(155.0)  # 10.0 and 50.0 are now older than keep_s
    assert not faults.met(0.0, 100.0) and faults.met(150.0, 160.0)


def test_recent_samples_are_read_from_the_newest_back_to_the_window():
    """The samples at or after the window's start, and no older one read: the read stops at
    the first sample older than the window (appends come in time order)."""
    from collections import deque

    samples = deque([(float(t), t / 1000, t % 2 == 0) for t in range(10)], maxlen=10_000)
    assert sorted(recent_samples(samples, 7.0)) == [(0.007, False), (0.008, True),
                                                    (0.009, False)]
    assert recent_samples(samples, 10.5) == []
    assert len(recent_samples(samples, 0.0)) == 10

    class Counted(deque):
        read = 0

        def __reversed__(self):
            for item in super().__reversed__():
                Counted.read += 1
                yield item

    long = Counted(samples)
    assert len(recent_samples(long, 8.0)) == 2 and Counted.read == 3  # two, then one older


def test_the_steady_p99_leaves_out_the_samples_that_met_a_fault():
    samples = [(0.010 * i, False) for i in range(1, 101)] + [(30.0, True)] * 5
    got = split_p99_ms(samples)
    assert got == {"p99_steady_ms": 1000, "samples": 105, "met_faults": 5}
    assert split_p99_ms([]) == {"p99_steady_ms": None, "samples": 0, "met_faults": 0}
    assert split_p99_ms([(2.0, True)])["p99_steady_ms"] is None


@pytest.mark.db
def test_rows_that_waited_through_a_failed_injection_are_tagged_and_others_not(
        conn, make_scene):  # noqa: F811
    """A conversation whose home was down at the first pass: its rows' lag met a fault; a
    later row, posted and injected while all is well, did not."""
    s = make_scene(start=False)
    cid, alice, _ = two_party(conn)
    home = s.stop_home(cid)
    s.post(cid, alice, "during")
    s.injector.startService()
    s.run(0.2)
    s.net.wait(home.startService())
    s.run(10)
    s.run(60)  # past the start and the failure: the next row's span holds no fault
    s.post(cid, alice, "after")
    s.injector.wake()
    s.run(2)
    assert [met for _t, _lag, met in s.injector.recent_lags] == [True, False]


@pytest.mark.db
def test_a_claim_says_which_rows_went_back_before(conn, make_scene):  # noqa: F811
    """A row released after a failure (or handed back behind one) is claimed again as
    ``retried``, so whichever worker injects it tags its lag as the fault's; a fresh row and
    a row whose claim merely ran out are not."""
    from cloud.store import outbox as outbox_store
    from tests.dbfixture import tx

    s = make_scene(start=False)
    cid, alice, _ = two_party(conn)
    for body in ("first", "second"):
        s.post(cid, alice, body)
    now = s.now_ms()
    claimed = tx(conn, outbox_store.claim_outbox, now, 10, 1_000)
    assert [i.retried for i in claimed] == [False, False]
    tx(conn, outbox_store.release_outbox_items, claimed, "home unreachable", now, 1)
    again = tx(conn, outbox_store.claim_outbox, now + 1, 10, 1_000)
    assert [(i.seq, i.retried) for i in again] == [(1, True), (2, True)]
    s.post(cid, alice, "third")
    later = tx(conn, outbox_store.claim_outbox, now + 5_000, 10, 1_000)  # claims ran out
    assert [(i.seq, i.retried) for i in later] == [(1, True), (2, True), (3, False)]
