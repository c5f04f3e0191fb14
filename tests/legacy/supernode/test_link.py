"""The supernode-to-supernode link: its states, its legal transitions, its reconnects."""

from __future__ import annotations

import pytest

from legacy import wire
from legacy.supernode.link import LEGAL_TRANSITIONS, LinkState
from tests.legacy.netfixture import LegacyNet


def _frame(sn: str) -> wire.HoldNote:
    return wire.HoldNote(recipient="nobody", home_sn=sn)


def test_a_link_connects_on_first_send_and_is_ready_after_the_welcome():
    """idle --send--> connecting --Welcome--> ready; what was queued meanwhile goes out."""
    net = LegacyNet(2).start()
    a = net.supernodes["sn0"]
    link = a._link("sn1")
    assert link.state is LinkState.IDLE
    link.send(_frame("sn0"))
    assert link.state is LinkState.CONNECTING and len(link.queue) == 1
    net.run(1.0)
    assert link.state is LinkState.READY and link.queue == []
    assert net.supernodes["sn1"].mem.held_notes == {"nobody": {"sn0": None}}


def test_a_dropped_link_waits_then_reconnects_and_resyncs_a_restarted_peer():
    """ready --lost--> waiting --timer--> connecting; a new epoch in the Welcome is a peer
    that lost its memory, and it gets back what it owns."""
    net = LegacyNet(2).start()
    a, b = net.supernodes["sn0"], net.supernodes["sn1"]
    resynced: list[str] = []
    a.on_peer_restarted = resynced.append
    link = a._link("sn1")
    link.send(_frame("sn0"))
    net.run(1.0)
    first_epoch = link.known_epoch
    net.wait(b.crash())
    net.run(0.1)
    assert link.state in (LinkState.WAITING, LinkState.IDLE, LinkState.CONNECTING)
    net.wait(b.restart())
    net.run(30.0)
    assert link.state is LinkState.READY
    assert link.known_epoch == b.epoch != first_epoch
    assert resynced == ["sn1"]


def test_close_is_final_and_drops_the_queue():
    """Any state --close--> closed; a closed link sends, queues and retries nothing."""
    net = LegacyNet(2).start()
    a = net.supernodes["sn0"]
    link = a._link("sn1")
    link.send(_frame("sn0"))
    link.close()
    assert link.state is LinkState.CLOSED and link.queue == []
    link.send(_frame("sn0"))
    net.run(30.0)
    assert link.state is LinkState.CLOSED and link.queue == [] and link.proto is None


def test_an_illegal_transition_is_refused():
    """The machine refuses a move its table does not list (here: idle straight to ready)."""
    net = LegacyNet(2).start()
    link = net.supernodes["sn0"]._link("sn1")
    with pytest.raises(RuntimeError, match="no transition from idle to ready"):
        link._move(LinkState.READY)
    assert LEGAL_TRANSITIONS[LinkState.CLOSED] == frozenset()
    assert set(LEGAL_TRANSITIONS) == set(LinkState)
