"""The notification outbox against a real PostgreSQL: claims, attempts, visible failure,
acknowledgements.
"""

from __future__ import annotations

from cloud.store import messages as messages_store
from cloud.store import notifications as notifications_store
from tests.cloud.store.storefixture import NOW
from tests.dbfixture import make_account, make_conversation, tx


def test_claiming_notifications_counts_attempts_then_fails_visibly(conn):
    """After max attempts unacked: failed with an open finding; a late ack resolves both."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    tx(conn, messages_store.post_message, cid, a, "c", "x", NOW)
    now = NOW
    for attempt in range(1, 4):
        push, failed = tx(conn, notifications_store.claim_due_notifications, now, 10, 1000, 3)
        assert [n.attempts for n in push] == [attempt] and failed == []
        assert tx(conn, notifications_store.claim_due_notifications, now, 10, 1000, 3) == ([], [])
        now += 1000
    push, failed = tx(conn, notifications_store.claim_due_notifications, now, 10, 1000, 3)
    assert push == [] and len(failed) == 1
    assert tx(conn, notifications_store.notification_counts)["failed"] == 1
    assert conn.execute("SELECT kind, state FROM reconcile_findings").fetchall() == [
        ("notification_failed", "open")]
    # a late ack still counts: the device did get it
    assert tx(conn, notifications_store.ack_notification, b, failed[0].notification_id, now)
    assert tx(conn, notifications_store.notification_counts)["acked"] == 1
    assert conn.execute("SELECT state FROM reconcile_findings").fetchall() == [("repaired",)]


def test_ack_is_per_account_and_idempotent(conn):
    """Only the owner can ack; acking twice is the same as once."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    tx(conn, messages_store.post_message, cid, a, "c", "x", NOW)
    nid = conn.execute("SELECT notification_id FROM notifications").fetchone()[0]
    assert not tx(conn, notifications_store.ack_notification, a, nid, NOW)
    assert tx(conn, notifications_store.ack_notification, b, nid, NOW + 1)
    assert tx(conn, notifications_store.ack_notification, b, nid, NOW + 2)
    assert conn.execute("SELECT state, acked_ms FROM notifications").fetchone() == (
        "acked", NOW + 1)


def test_an_ack_racing_the_failure_waits_for_it_and_answers_its_finding(conn, db_dsn):
    """The ack is one statement (no BEGIN or COMMIT), yet it reads the state as it is once
    the row is free: an ack arriving while the dispatcher's claim is marking the
    notification failed waits for that claim's commit, then marks it acked and answers the
    finding the claim recorded (read from its statement's snapshot, the ack would see the
    state before the failure and leave the finding open)."""
    import threading

    import psycopg

    from cloud.db import run_transaction

    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, a, b)
    tx(conn, messages_store.post_message, cid, a, "c", "x", NOW)
    now = NOW
    for _attempt in range(3):
        [pushed], _ = tx(conn, notifications_store.claim_due_notifications, now, 10, 1000, 3)
        now += 1000
    acked: list[bool] = []
    with psycopg.connect(db_dsn, autocommit=True) as dispatcher:
        with dispatcher.transaction():
            _, [failed] = notifications_store.claim_due_notifications(dispatcher, now, 10,
                                                                       1000, 3)
            ack = threading.Thread(target=lambda: acked.append(run_transaction(
                conn, "ack_notification", notifications_store.ack_notification, b,
                pushed.notification_id, now)))
            ack.start()
            ack.join(0.5)
            assert ack.is_alive()  # waiting for the row the claim is failing
        ack.join(10)
    assert acked == [True] and failed.notification_id == pushed.notification_id
    assert conn.execute("SELECT state, acked_ms FROM notifications").fetchone() == (
        "acked", now)
    assert conn.execute("SELECT kind, state FROM reconcile_findings").fetchall() == [
        ("notification_failed", "repaired")]
