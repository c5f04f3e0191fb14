"""What ``bridgectl accounts show`` reads of one account, on real PostgreSQL: its phase
history, its cohorts, and the newest messages mirrored either way in its conversations only."""

from __future__ import annotations

from cloud import admin
from cloud.model import MirrorBatch
from cloud.store import cohorts as cohorts_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from cloud.store import mirror as mirror_store
from tests.cloud.store.storefixture import NOW, mirrored
from tests.dbfixture import make_account, make_conversation, tx


def scene(conn):
    """alice (dual) with bob and with carol (legacy); dave and erin's conversation has
    nothing to do with alice."""
    alice = make_account(conn, "alice", "dual")
    bob, carol = make_account(conn, "bob"), make_account(conn, "carol")
    dave, erin = make_account(conn, "dave", "dual"), make_account(conn, "erin")
    return (alice, bob, carol, make_conversation(conn, alice, bob),
            make_conversation(conn, alice, carol), dave, make_conversation(conn, dave, erin))


def test_the_newest_messages_from_legacy_across_its_conversations_only(conn):
    """Legacy-origin messages of alice's two conversations, newest written first, at most
    the limit; cloud messages and other conversations are left out."""
    alice, bob, carol, ab, ac, dave, de = scene(conn)
    for i, (cid, sender, handle) in enumerate([(ab, bob, "bob"), (ac, carol, "carol"),
                                               (de, dave, "dave"), (ab, bob, "bob")]):
        tx(conn, mirror_store.write_mirrored_batch,
           MirrorBatch((mirrored(cid, sender, handle, f"g{i}", NOW + i),)), NOW)
    tx(conn, messages_store.post_message, ab, alice, "c1", "from the cloud", NOW + 10)
    got = tx(conn, messages_store.latest_from_legacy, alice, 10)
    assert [m["legacy_guid"] for m in got] == ["g3", "g1", "g0"]
    assert {m["conversation_id"] for m in got} == {str(ab), str(ac)}
    assert [m["legacy_guid"] for m in tx(conn, messages_store.latest_from_legacy, alice, 2)
            ] == ["g3", "g1"]
    assert tx(conn, messages_store.latest_from_legacy, dave, 10)[0]["sender"] == "dave"


def test_the_newest_outbox_rows_of_its_conversations_in_any_state_messages_only(conn):
    """Outbox rows of alice's conversations, newest queued first, pending and done alike;
    a membership change's row and another conversation's rows are left out."""
    alice, bob, carol, ab, ac, dave, de = scene(conn)
    for i, (cid, sender) in enumerate([(ab, alice), (ac, alice), (de, dave), (ab, alice)]):
        tx(conn, messages_store.post_message, cid, sender, f"c{i}", f"m{i}", NOW + i)
    conn.execute("UPDATE outbox_to_legacy SET state = 'done', done_ms = %s "
                 "WHERE conversation_id = %s", (NOW + 50, ac))
    make_account(conn, "fred")
    tx(conn, conversations_store.add_member, ab, alice, "fred", NOW + 60)
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy WHERE kind = 'members'"
                        ).fetchone()[0] == 1
    got = tx(conn, messages_store.latest_to_legacy, alice, 10)
    assert [(m["conversation_id"], m["queued_ms"], m["state"]) for m in got] == [
        (str(ab), NOW + 3, "pending"), (str(ac), NOW + 1, "done"),
        (str(ab), NOW + 0, "pending")]
    assert all(m["sender"] == "alice" for m in got)


def test_phase_history_and_cohort_memberships(conn):
    """Its phase_change audit rows oldest first, with the cohort and what was forced; its
    cohorts with the last advance that recorded it and the gates that held it."""
    alice, *_ = scene(conn)
    tx(conn, admin.apply_phase_change, alice, "dual", "cloud", actor="ops", now_ms=NOW,
       forced=True, gates=[{"name": "mirror_lag", "passed": False, "reason": "x"},
                           {"name": "frozen", "passed": True, "reason": "y"}],
       cohort="pilot")
    tx(conn, admin.apply_phase_change, alice, "cloud", "dual", actor="ops2", now_ms=NOW + 1)
    assert [(h["from"], h["to"], h["actor"], h["forced"], h["cohort"], h["failed_gates"])
            for h in tx(conn, admin.phase_history, alice)] == [
        ("dual", "cloud", "ops", True, "pilot", ["mirror_lag"]),
        ("cloud", "dual", "ops2", False, None, [])]
    assert tx(conn, admin.phase_history, alice, 1)[0]["actor"] == "ops2"
    assert tx(conn, cohorts_store.account_memberships, alice) == []
    cohort = tx(conn, cohorts_store.create_cohort, "pilot", {"handles": ["alice"]}, [alice],
                actor="ops", now_ms=NOW)
    assert tx(conn, cohorts_store.account_memberships, alice) == [
        {"name": "pilot", "state": "active", "active": True, "created_ms": NOW,
         "ended_ms": None, "last_advance": None}]
    tx(conn, cohorts_store.begin_advance, cohort.cohort_id, "cloud", {alice: "dual"},
       {alice: [{"name": "mirror_lag", "passed": False, "reason": "x"}]}, forced=False,
       actor="ops", now_ms=NOW + 5)
    got = tx(conn, cohorts_store.account_memberships, alice)
    assert got[0]["last_advance"] == {"advance": 1, "to": "cloud", "before": "dual",
                                      "reversed_ms": None, "held_by": ["mirror_lag"]}
