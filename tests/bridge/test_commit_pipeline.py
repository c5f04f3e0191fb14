"""A feed commit of messages only sends its statements in one pipeline: the lease check,
the messages, the checkpoint and presence go in one round trip, and the lease's verdict is
still judged before the transaction can commit."""

from __future__ import annotations

import pytest

from bridge.mirror import MirrorPlan, commit_plan
from cloud.model import FeedCheckpoint, MirrorBatch, Presence
from cloud.store import coordination as coordination_store
from cloud.store.errors import StaleFence
from tests.cloud.store.storefixture import NOW, mirrored, table_rows
from tests.dbfixture import make_account, make_conversation, round_trips, tx

LEASE = "feed:sn-1"


def _plan(cid, alice, guids, *, fence, offset, version=1, checkpoint=True) -> MirrorPlan:
    batch = MirrorBatch(tuple(mirrored(cid, alice, "alice", g, NOW) for g in guids),
                        (FeedCheckpoint("sn-1", "e1", offset, fence),) if checkpoint else ())
    presence = (Presence(alice, "sn-1", "online", version, NOW + 60_000),)
    return MirrorPlan((), (), batch, presence, ())


def _store(conn):
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    return alice, make_conversation(conn, alice, bob)


def _taken_over(conn) -> tuple[int, int]:
    """The lease of sn-1's feed: held by "old", then taken over by "new"."""
    old = tx(conn, coordination_store.acquire_lease, LEASE, "old", NOW, 1000)
    new = tx(conn, coordination_store.acquire_lease, LEASE, "new", NOW + 2000, 1000)
    assert new == old + 1
    return old, new


def _presence_versions(conn) -> list[int]:
    return [r[0] for r in conn.execute("SELECT version FROM presence ORDER BY version")]


def test_a_messages_only_commit_takes_one_round_trip(conn):
    """Lease check, savepoint, insert, checkpoint and presence: one round trip inside the
    transaction, where each statement took one of its own before (six)."""
    alice, cid = _store(conn)
    fence = tx(conn, coordination_store.acquire_lease, LEASE, "w1", NOW, 60_000)
    with conn.transaction():
        with round_trips(conn) as trips:
            outcome = commit_plan(conn, _plan(cid, alice, ["g1", "g2"], fence=fence, offset=2),
                                  NOW, lease=(LEASE, "w1"), fence=fence)
    assert trips.count == 1
    assert [m.legacy_guid for m in outcome.result.inserted] == ["g1", "g2"]
    assert table_rows(conn, "messages") == 2
    assert tx(conn, coordination_store.load_checkpoint, "sn-1").offset == 2
    assert _presence_versions(conn) == [1]


def test_a_replayed_messages_only_commit_writes_its_checkpoint_and_presence_once_more(conn):
    """The fast insert meets a stored row: the pipeline's checkpoint and presence did not
    run (or were rolled back with the savepoint); the careful path writes them again."""
    alice, cid = _store(conn)
    fence = tx(conn, coordination_store.acquire_lease, LEASE, "w1", NOW, 60_000)
    with conn.transaction():
        commit_plan(conn, _plan(cid, alice, ["g1"], fence=fence, offset=1), NOW,
                    lease=(LEASE, "w1"), fence=fence)
    with conn.transaction():
        outcome = commit_plan(conn, _plan(cid, alice, ["g1", "g2"], fence=fence, offset=2,
                                          version=2),
                              NOW, lease=(LEASE, "w1"), fence=fence)
    assert [m.legacy_guid for m in outcome.result.inserted] == ["g2"]
    assert outcome.result.duplicates == 1
    assert [r[0] for r in conn.execute("SELECT legacy_guid FROM messages ORDER BY seq")] == [
        "g1", "g2"]
    assert tx(conn, coordination_store.load_checkpoint, "sn-1").offset == 2
    assert _presence_versions(conn) == [2]


@pytest.mark.parametrize("replayed", [False, True], ids=["new", "replayed"])
def test_a_stale_holders_messages_only_commit_writes_nothing(conn, replayed):
    """The lease was taken over: the old holder's pipelined commit raises StaleFence and
    the transaction rolls back what the pipeline wrote, new or replayed batch alike. Its
    batch carries no checkpoint, whose own fence would refuse it too: the lease's verdict
    alone must."""
    alice, cid = _store(conn)
    old, new = _taken_over(conn)
    if replayed:
        with conn.transaction():
            commit_plan(conn, _plan(cid, alice, ["g1"], fence=new, offset=1), NOW,
                        lease=(LEASE, "new"), fence=new)
    before = (table_rows(conn, "messages"), tx(conn, coordination_store.load_checkpoints),
              _presence_versions(conn))
    with pytest.raises(StaleFence), conn.transaction():
        commit_plan(conn, _plan(cid, alice, ["g1", "g2"], fence=old, offset=2, version=5,
                                checkpoint=False), NOW, lease=(LEASE, "old"), fence=old)
    assert (table_rows(conn, "messages"), tx(conn, coordination_store.load_checkpoints),
            _presence_versions(conn)) == before


def test_a_checkpoint_held_under_a_newer_fence_is_judged_in_the_pipeline(conn):
    """Without a lease, the checkpoint's own fence still refuses a stale commit whole."""
    alice, cid = _store(conn)
    tx(conn, coordination_store.save_checkpoint, FeedCheckpoint("sn-1", "e1", 10, 7), NOW)
    with pytest.raises(StaleFence), conn.transaction():
        commit_plan(conn, _plan(cid, alice, ["g1"], fence=6, offset=11), NOW)
    assert table_rows(conn, "messages") == 0 and _presence_versions(conn) == []
    assert tx(conn, coordination_store.load_checkpoint, "sn-1").offset == 10


def test_replayed_commits_go_through_wherever_psycopgs_prepare_count_stands(conn):
    """psycopg prepares a statement at its sixth run; in a replayed batch's pipeline the
    checkpoint and presence upserts follow the insert that fails, so the server skips their
    Parse. "NRNNR": the second replay's pipeline is the checkpoint's sixth run, after a
    ROLLBACK TO SAVEPOINT psycopg already knew (it clears its cache on that only the first
    time). Every commit goes through, each replay stores only its new message."""
    alice, cid = _store(conn)
    fence = tx(conn, coordination_store.acquire_lease, LEASE, "w1", NOW, 60_000)
    guids: list[str] = []
    for n, kind in enumerate("NRNNRNNNRR", start=1):
        guids.append(f"g{n}")
        batch = guids[-2:] if kind == "R" else guids[-1:]
        with conn.transaction():
            outcome = commit_plan(conn, _plan(cid, alice, batch, fence=fence, offset=n,
                                              version=n), NOW, lease=(LEASE, "w1"), fence=fence)
        assert [m.legacy_guid for m in outcome.result.inserted] == [f"g{n}"]
    assert [r[0] for r in conn.execute("SELECT legacy_guid FROM messages ORDER BY seq")] == \
        guids
    assert tx(conn, coordination_store.load_checkpoint, "sn-1").offset == len(guids)
    assert _presence_versions(conn) == [len(guids)]
