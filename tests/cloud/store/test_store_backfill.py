"""The back-fill of a move out of cloud-only against a real PostgreSQL: what it queues for
legacy and what it leaves alone, in the phase change's own transaction, and no post that
races the move falls between the two."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import psycopg
import pytest

from cloud import admin
from cloud.store import accounts as accounts_store
from cloud.store import digests as digests_store
from cloud.store import messages as messages_store
from cloud.store import outbox as outbox_store
from cloud.store import outbox_backfill
from cloud.store.outbox_backfill import Backfill
from tests.cloud.store.storefixture import NOW
from tests.dbfixture import failing_inserts, make_account, make_conversation, tx

DAY = 86_400_000
SINCE = NOW - 30 * DAY


def post(conn, cid, sender, body: str, at: int) -> messages_store.Message:
    message, created = tx(conn, messages_store.post_message, cid, sender, str(uuid.uuid4()),
                          body, at)
    assert created
    return message


def rows(conn, cid) -> list[tuple]:
    return conn.execute(
        "SELECT seq, state, skip_reason, attempts, created_ms, claim_token IS NULL "
        "FROM outbox_to_legacy WHERE conversation_id = %s ORDER BY seq", (cid,)).fetchall()


def guids(conn, cid) -> dict[int, bool]:
    """seq -> whether the message has the legacy GUID the store gives a cloud message."""
    return dict(conn.execute(
        "SELECT seq, legacy_guid IS NOT DISTINCT FROM 'cloud:' || message_id::text "
        "FROM messages WHERE conversation_id = %s", (cid,)).fetchall())


def skip(conn, reason: str) -> None:
    """Claim every due row and skip it for *reason*."""
    for item in tx(conn, outbox_store.claim_outbox, NOW, 100, 1000):
        assert tx(conn, outbox_store.complete_outbox, item, "chat", None, NOW,
                  skipped=True, skip_reason=reason)


def leave_cloud_only(conn, account, to: str = "cloud", at: int = NOW + 1000,
                     since: int = SINCE) -> admin.AppliedChange:
    return tx(conn, admin.apply_phase_change, account, "cloud-only", to, actor="test",
              now_ms=at, forced=True, backfill_since_ms=since)


@pytest.fixture
def pair(conn):
    """alice and bob, both cloud-only, in one conversation; carol and dave, cloud-only too,
    in another that alice is not in."""
    alice, bob = make_account(conn, "alice", "cloud-only"), make_account(conn, "bob", "cloud-only")
    carol, dave = (make_account(conn, "carol", "cloud-only"),
                   make_account(conn, "dave", "cloud-only"))
    return (make_conversation(conn, alice, bob), alice, bob,
            make_conversation(conn, carol, dave), carol)


def test_the_backfill_queues_only_what_legacy_missed(conn, pair):
    """Never-queued messages and rows skipped for want of legacy clients are queued (in the
    window), in seq order; done, refused, failed and other conversations' rows are not."""
    cid, alice, bob, other, carol = pair
    tx(conn, accounts_store.set_phase, bob, "cloud")           # bob still has legacy clients
    done = post(conn, cid, alice, "injected", NOW - 5000)
    [item] = tx(conn, outbox_store.claim_outbox, NOW, 100, 1000)
    tx(conn, outbox_store.complete_outbox, item, "chat", "cloud:g1", NOW)
    post(conn, cid, alice, "refused", NOW - 4000)
    skip(conn, outbox_store.REFUSED)
    post(conn, cid, bob, "given up", NOW - 3900)
    [item] = tx(conn, outbox_store.claim_outbox, NOW, 100, 1000)
    assert tx(conn, outbox_store.fail_outbox_item, item, "too many attempts", NOW)
    post(conn, cid, alice, "drained after bob left", NOW - 3000)
    tx(conn, accounts_store.set_phase, bob, "cloud-only")
    skip(conn, outbox_store.NO_LEGACY_CLIENTS)
    post(conn, cid, alice, "never queued", NOW - 2000)
    post(conn, cid, bob, "never queued either", NOW - 1000)
    post(conn, cid, alice, "too old", SINCE - 1)
    post(conn, other, carol, "not alice's", NOW - 500)
    assert [r[:3] for r in rows(conn, cid)] == [
        (1, "done", None), (2, "skipped", "refused"), (3, "failed", None),
        (4, "skipped", "no_legacy_clients")]
    # a message has its legacy GUID while queued and once injected; a row that ended
    # without reaching legacy took it back, and the digests follow
    assert guids(conn, cid) == {1: True, 2: False, 3: False, 4: False, 5: False, 6: False,
                                7: False}
    assert tx(conn, digests_store.maintained_slots) == tx(conn, digests_store.scratch_slots)

    expected = Backfill(conversations=1, queued=2, requeued=1, too_old=1)
    assert tx(conn, outbox_backfill.preview_backfill, alice, SINCE) == expected
    assert len(rows(conn, cid)) == 4  # the preview wrote nothing
    applied = leave_cloud_only(conn, alice)
    assert applied == admin.AppliedChange(True, expected)
    assert tx(conn, outbox_backfill.preview_backfill, alice, SINCE) == Backfill(1, 0, 0, 1)
    assert guids(conn, cid) == {1: True, 2: False, 3: False, 4: True, 5: True, 6: True,
                                7: False}  # the queued ones have theirs again
    assert tx(conn, digests_store.maintained_slots) == tx(conn, digests_store.scratch_slots)
    assert rows(conn, cid) == [
        (1, "done", None, 1, NOW - 5000, False), (2, "skipped", "refused", 1, NOW - 4000, False),
        (3, "failed", None, 1, NOW - 3900, False),
        # queued now, unclaimed, with a fresh attempt budget
        (4, "pending", None, 0, NOW + 1000, True), (5, "pending", None, 0, NOW + 1000, True),
        (6, "pending", None, 0, NOW + 1000, True)]
    assert rows(conn, other) == []
    assert done.seq == 1
    claimed = tx(conn, outbox_store.claim_outbox, NOW + 2000, 100, 1000)
    assert [(i.seq, i.body, i.legacy_client_members) for i in claimed] == [
        (4, "drained after bob left", 1), (5, "never queued", 1), (6, "never queued either", 1)]
    audit = conn.execute("SELECT detail->'backfill' FROM audit_log").fetchone()[0]
    assert audit == {"conversations": 1, "queued": 2, "requeued": 1, "queued_for_legacy": 3,
                     "older_than_window": 1, "since_ms": SINCE}


def test_the_backfill_is_safe_to_run_twice(conn, pair):
    """A second back-fill (a re-run) finds nothing more to queue: no row twice."""
    cid, alice, bob, *_ = pair
    for i in range(3):
        post(conn, cid, alice, f"m{i}", NOW - 1000 + i)
    first = tx(conn, outbox_backfill.backfill_outbox, alice, SINCE, NOW)
    again = tx(conn, outbox_backfill.backfill_outbox, bob, SINCE, NOW + 5)
    assert (first.queued, again.queued, again.requeued) == (3, 0, 0)
    assert [r[0] for r in rows(conn, cid)] == [1, 2, 3]


def test_a_failed_phase_change_queues_nothing_and_a_rerun_queues_once(conn, pair):
    """The back-fill commits with the phase or not at all; the next attempt does all of it,
    and a re-run after that changes nothing."""
    cid, alice, *_ = pair
    post(conn, cid, alice, "missed", NOW - 1000)
    with failing_inserts(conn, "audit_log", "killed before commit"), \
            pytest.raises(psycopg.errors.RaiseException):
        leave_cloud_only(conn, alice)
    assert rows(conn, cid) == [] and accounts_store.get_account(conn, alice).phase == "cloud-only"
    assert leave_cloud_only(conn, alice).backfill.queued == 1
    assert leave_cloud_only(conn, alice) == admin.AppliedChange(False)  # moved already
    assert [r[:2] for r in rows(conn, cid)] == [(1, "pending")]


def test_only_a_move_out_of_cloud_only_backfills_and_it_needs_its_window(conn, pair):
    """Other moves queue nothing; leaving cloud-only without a window is refused."""
    cid, alice, bob, *_ = pair
    post(conn, cid, alice, "missed", NOW - 1000)
    with pytest.raises(ValueError, match="backfill_since_ms"):
        tx(conn, admin.apply_phase_change, alice, "cloud-only", "dual", actor="t", now_ms=NOW)
    tx(conn, accounts_store.set_phase, bob, "cloud")
    assert tx(conn, admin.apply_phase_change, bob, "cloud", "dual", actor="t",
              now_ms=NOW) == admin.AppliedChange(True, None)
    assert rows(conn, cid) == []


def run_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


def wait_until_blocked(conn, pid: int) -> None:
    """Until backend *pid* waits for a lock (bounded)."""
    for _ in range(500):
        waiting = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                               (pid,)).fetchone()[0]
        if waiting == "Lock":
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")


@pytest.mark.parametrize("first", ["post", "move"])
def test_a_post_racing_the_move_is_queued_once(db_dsn, conn, pair, first):
    """Whichever takes the conversation's lock first, a post made while the account leaves
    cloud-only ends up with exactly one outbox row: the back-fill's or its own."""
    cid, alice, bob, *_ = pair
    post(conn, cid, alice, "before", NOW - 1000)
    with psycopg.connect(db_dsn, autocommit=True) as poster, \
            psycopg.connect(db_dsn, autocommit=True) as mover:
        work = {
            "post": (poster, lambda: messages_store.post_message(
                poster, cid, bob, "racing", "during", NOW)),
            "move": (mover, lambda: admin.apply_phase_change(
                mover, alice, "cloud-only", "cloud", actor="t", now_ms=NOW, forced=True,
                backfill_since_ms=SINCE))}
        (holder, hold), (waiter, wait) = work[first], work["move" if first == "post" else "post"]

        def in_transaction() -> object:
            with waiter.transaction():
                return wait()

        with holder.transaction():
            hold()  # not committed yet: it holds the conversation's lock
            thread, result = run_in_thread(in_transaction)
            wait_until_blocked(conn, waiter.info.backend_pid)
        thread.join(10)
        assert not thread.is_alive() and result
    assert [r[:2] for r in rows(conn, cid)] == [(1, "pending"), (2, "pending")]
    assert accounts_store.get_account(conn, alice).phase == "cloud"


def test_a_move_out_of_cloud_only_waits_for_the_conversations_before_the_account(db_dsn, conn,
                                                                                  pair):
    """The move takes its conversations' locks before its account's, the order a post takes
    them in (conversations, then the members' accounts): while a post's transaction holds a
    conversation, the waiting move holds no lock on the account, so the post can finish
    (the other order deadlocked them, and PostgreSQL killed one after deadlock_timeout)."""
    cid, alice, bob, *_ = pair
    with psycopg.connect(db_dsn, autocommit=True) as poster, \
            psycopg.connect(db_dsn, autocommit=True) as mover:

        def move() -> object:
            with mover.transaction():
                return admin.apply_phase_change(mover, alice, "cloud-only", "cloud", actor="t",
                                                now_ms=NOW, forced=True,
                                                backfill_since_ms=SINCE)

        with poster.transaction():
            poster.execute("SELECT 1 FROM conversations WHERE conversation_id = %s "
                           "FOR NO KEY UPDATE", (cid,))  # a post's first lock
            thread, result = run_in_thread(move)
            wait_until_blocked(conn, mover.info.backend_pid)
            # what the post takes next: its members' accounts, share-locked
            assert len(poster.execute("SELECT 1 FROM accounts WHERE account_id = ANY(%s) "
                                      "FOR SHARE NOWAIT", ([alice, bob],)).fetchall()) == 2
        thread.join(10)
        assert not thread.is_alive() and result and result[0].moved
    assert accounts_store.get_account(conn, alice).phase == "cloud"


def test_a_late_skip_after_the_move_hands_the_row_back(conn, pair):
    """The injector counted no legacy clients when it claimed the row, and the account left
    cloud-only before it skipped it: the skip writes nothing but hands the row back, due at
    once and untried, and the next claim sees the legacy client."""
    cid, alice, bob, *_ = pair
    tx(conn, accounts_store.set_phase, bob, "cloud")
    post(conn, cid, alice, "in flight", NOW - 1000)
    tx(conn, accounts_store.set_phase, bob, "cloud-only")
    [item] = tx(conn, outbox_store.claim_outbox, NOW, 100, 5000)
    assert item.legacy_client_members == 0
    assert leave_cloud_only(conn, alice).backfill.total == 0  # pending: not the back-fill's
    assert tx(conn, outbox_store.complete_outbox, item, "chat", None, NOW + 2000,
              skipped=True, skip_reason=outbox_store.NO_LEGACY_CLIENTS) is False
    assert conn.execute("SELECT state, claimed_until_ms, claim_token, attempts "
                        "FROM outbox_to_legacy").fetchall() == [("pending", NOW + 2000, None, 0)]
    [again] = tx(conn, outbox_store.claim_outbox, NOW + 2000, 100, 5000)
    assert (again.seq, again.legacy_client_members, again.attempts) == (1, 1, 1)


def test_a_skip_needs_a_known_reason(conn, pair):
    """A skip without a reason (or with an unknown one) is refused before anything is
    written; the schema refuses a skipped row without one too."""
    cid, alice, bob, *_ = pair
    tx(conn, accounts_store.set_phase, bob, "cloud")
    post(conn, cid, alice, "m", NOW)
    [item] = tx(conn, outbox_store.claim_outbox, NOW, 100, 1000)
    for reason in (None, "bored"):
        with pytest.raises(ValueError, match="needs a reason"):
            tx(conn, outbox_store.complete_outbox, item, "chat", None, NOW, skipped=True,
               skip_reason=reason)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE outbox_to_legacy SET state = 'skipped'")
    assert [r[1] for r in rows(conn, cid)] == ["pending"]
