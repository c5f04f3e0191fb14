"""A bridge killed between any two steps of a batch, restarted from its checkpoint:
nothing lost, nothing duplicated (invariant 4)."""

from __future__ import annotations

import pytest

from bridge.mirror import COMMIT_STEPS
from cloud.db import InlineDatabase
from cloud.store import coordination as coordination_store
from tests.bridge.test_follower import Bridge, chat_messages, send_some
from tests.legacy.netfixture import LegacyNet


class SimulatedCrash(BaseException):
    """The process dies here (BaseException: no handler in the bridge catches it)."""


def crash_once_at(point: str):
    fired = []

    def fault(step: str) -> None:
        if step == point and not fired:
            fired.append(step)
            raise SimulatedCrash(step)

    return fault, fired


def kill(bridge: Bridge) -> None:
    """SIGKILL: connections drop, nothing is drained, nothing more is committed."""
    for follower in bridge.followers.values():
        follower.running = False
        for call in (follower._linger, follower._sleep_call):
            if call is not None and call.active():
                call.cancel()
        if follower.peer is not None:
            follower.peer.disconnect()


@pytest.mark.parametrize("point", [*COMMIT_STEPS, "committed"])
def test_killed_at_any_step_then_restarted_loses_and_duplicates_nothing(point, conn):
    """Crash at each fault point of the write path; a restart converges exactly once."""
    net = LegacyNet(3, seed=11).start()
    guids, _ = send_some(net, 15)
    db = InlineDatabase(conn)
    first = Bridge(net, db)
    fault, fired = crash_once_at(point)
    for follower in first.followers.values():
        follower.fault = fault
    first.start()
    net.run(3.0)
    assert fired == [point]
    kill(first)
    net.run(1.0)
    second = Bridge(net, db).start()
    net.run(4.0)
    rows = chat_messages(conn, "chat-1")
    assert sorted(r[1] for r in rows) == sorted(guids)  # every message, exactly once
    assert [r[0] for r in rows] == list(range(1, len(guids) + 1))  # seq gapless
    per_message = conn.execute("SELECT count(*), count(DISTINCT (account_id, message_id)) "
                               "FROM notifications").fetchone()
    assert per_message[0] == per_message[1]
    for sn, node in net.supernodes.items():  # every feed checkpointed at its end
        if node.mem.feed.next_offset:
            assert coordination_store.load_checkpoints(conn)[sn].offset == node.mem.feed.next_offset
    kill(second)
