"""The presence merge rule: most available live source wins, with a grace against flapping."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from cloud.model import PRESENCE_STATUSES, Presence
from cloud.presence import GRACE_MS, effective_status

A = uuid.uuid4()


def test_most_available_live_source_wins():
    """Online on one stack and offline on the other is online."""
    sources = [Presence(A, "cloud", "offline", 2, 10_000),
               Presence(A, "legacy:sn1", "online", 1, 10_000)]
    assert effective_status(sources, 5_000) == "online"


def test_expired_sources_drop_out_after_the_grace_only():
    """A source just past expiry still counts (no flicker); past the grace it is gone."""
    sources = [Presence(A, "legacy:sn1", "busy", 1, 10_000)]
    assert effective_status(sources, 10_000 + GRACE_MS - 1) == "busy"
    assert effective_status(sources, 10_000 + GRACE_MS) == "offline"


@given(st.lists(st.tuples(st.sampled_from(PRESENCE_STATUSES), st.integers(0, 100_000)),
                max_size=6), st.integers(0, 100_000))
def test_order_of_sources_does_not_matter(entries, now):
    """The rule is a function of the set of sources, not their order."""
    sources = [Presence(A, f"s{i}", s, i, e) for i, (s, e) in enumerate(entries)]
    assert effective_status(sources, now) == effective_status(list(reversed(sources)), now)
