"""The notifications reconciler against a real PostgreSQL, driven through ``run_one``.

The dispatcher, the simulated gateway and the acknowledging devices of
``tests/cloud/test_notifications.py`` run on the same ``Clock`` as the reconciler, so a
re-send really goes out through the dispatcher and comes back as an acknowledgement.
"""

from __future__ import annotations

import uuid

import attrs
import psycopg
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from cloud import admin
from cloud.db import InlineDatabase
from cloud.model import Account
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from cloud.store import notifications as notifications_store
from reconcilers import runner
from reconcilers.notifications import NotificationsConfig, NotificationsReconciler
from tests.cloud.test_notifications import FAST, T0, owe_notifications, result_of, scene, tx

QUICK = NotificationsConfig(confirm_after_s=1.0)
#: The dispatcher re-sends on its own only after 10 minutes: what moves a row in these
#: tests is the reconciler.
LAZY = attrs.evolve(FAST, resend_after_s=600.0)


@pytest.fixture
def lock_conn(db_dsn):
    with psycopg.connect(db_dsn, autocommit=True) as c:
        yield c


def reconcile(conn, clock: Clock, lock_conn, *, config: NotificationsConfig = QUICK,
              dry_run: bool = False, max_seconds: float | None = None,
              step=None, stop: bool = False) -> runner.Report:
    """One run; the clock moves in 0.1 s steps (through *step*, e.g. acking devices);
    *stop* asks it to stop at its first check (as Ctrl-C would)."""
    d = defer.Deferred.fromCoroutine(runner.run_one(
        NotificationsReconciler(config), clock=clock, db=InlineDatabase(conn),
        lock_conn=lock_conn, dry_run=dry_run, max_seconds=max_seconds,
        stop_requested=lambda: stop))
    for _ in range(600):
        if d.called:
            break
        (step or clock.advance)(0.1)
    return result_of(d)


def notification(conn) -> tuple:
    return conn.execute("SELECT notification_id, state, attempts FROM notifications").fetchone()


def findings(conn) -> list[tuple]:
    return conn.execute("SELECT kind, state, detail->>'notification_id' FROM reconcile_findings "
                        "ORDER BY finding_id").fetchall()


def audit_actions(conn) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT action FROM audit_log WHERE actor = 'reconciler' ORDER BY audit_id")]


def make_stale(conn, *, attempts: int, sent_ago_s: float, now_s: float) -> None:
    """Every notification: pushed (and lost) *sent_ago_s* ago, not due again for an hour."""
    now_ms = round(now_s * 1000)
    conn.execute("UPDATE notifications SET state = 'sent', attempts = %s, sent_ms = %s, "
                 "next_attempt_ms = %s", (attempts, now_ms - round(sent_ago_s * 1000),
                                          now_ms + 3_600_000))


def test_a_lost_push_is_resent_with_the_same_id_and_then_acknowledged(conn, lock_conn):
    """Sent but never acknowledged past the SLA: made due, pushed again, same id, acked."""
    accounts = owe_notifications(conn, recipients=1, messages=1)
    s = scene(conn, accounts, config=LAZY, loss=1.0)
    s.devices.run(2.0)
    nid, state, attempts = notification(conn)
    assert (state, attempts) == ("sent", 1)
    s.devices.run(61.0)
    assert notification(conn) == (nid, "sent", 1)  # the dispatcher waits 10 minutes
    s.gateway.loss = 0.0
    report = reconcile(conn, s.clock, lock_conn, step=s.devices.step)
    s.devices.run(2.0)
    assert notification(conn) == (nid, "acked", 2)
    assert (report.suspects, report.confirmed, report.repaired, report.failed) == (1, 1, 1, 0)
    assert report.exit_code() == runner.EXIT_IN_SYNC and report.clean
    assert findings(conn) == [("notification_resent", "repaired", str(nid))]
    assert audit_actions(conn) == ["notification_resent"]


def test_a_deleted_notification_row_is_recreated_and_delivered(conn, lock_conn):
    """Owed but missing: the row is created again (due now) and the device acknowledges it."""
    accounts = owe_notifications(conn, recipients=2, messages=3)
    s = scene(conn, accounts, config=LAZY)
    s.devices.run(2.0)
    assert tx(conn, notifications_store.notification_counts)["acked"] == 6
    gone = conn.execute("DELETE FROM notifications WHERE notification_id = "
                        "(SELECT notification_id FROM notifications ORDER BY 1 LIMIT 1) "
                        "RETURNING account_id, message_id").fetchone()
    report = reconcile(conn, s.clock, lock_conn, step=s.devices.step)
    s.devices.run(2.0)
    assert (report.suspects, report.confirmed, report.repaired) == (1, 1, 1)
    assert report.detail["messages"] == 3 and report.compared == 1  # one conversation
    assert tx(conn, notifications_store.notification_counts) == {"pending": 0, "sent": 0,
                                                                 "acked": 6, "failed": 0}
    back = conn.execute("SELECT notification_id FROM notifications WHERE account_id = %s "
                        "AND message_id = %s", gone).fetchone()
    assert findings(conn) == [("notification_missing", "repaired", str(back[0]))]
    again = reconcile(conn, s.clock, lock_conn, step=s.devices.step)
    assert again.clean and again.confirmed == 0


def test_a_member_promoted_after_the_message_is_not_owed_it(conn, lock_conn):
    """Messages from before an account left the legacy phase owe it nothing now."""
    now_ms = round(T0 * 1000)
    sender, member = uuid.uuid4(), uuid.uuid4()
    with conn.transaction():
        accounts_store.create_account(conn, Account(sender, "sender", "cloud-only"), None)
        accounts_store.create_account(conn, Account(member, "member", "legacy", "member"), None)
        cid = uuid.uuid4()
        conversations_store.create_conversation(conn, cid, [sender, member])
        messages_store.post_message(conn, cid, sender, "c-1", "before the move", now_ms)
        admin.apply_phase_change(conn, member, "legacy", "dual", actor="test",
                                 now_ms=now_ms + 1000)
        messages_store.post_message(conn, cid, sender, "c-2", "after the move", now_ms + 2000)
    conn.execute("DELETE FROM notifications")
    clock = Clock()
    clock.advance(T0 + 3)
    report = reconcile(conn, clock, lock_conn)
    assert (report.confirmed, report.repaired) == (1, 1)  # only the second message
    assert conn.execute("SELECT seq FROM notifications").fetchall() == [(2,)]


def test_max_attempts_reached_fails_the_notification_with_an_open_finding(conn, lock_conn):
    """Out of attempts and still unacknowledged: failed, with the dispatcher's finding."""
    owe_notifications(conn, recipients=1, messages=1)
    make_stale(conn, attempts=5, sent_ago_s=120, now_s=T0 + 200)
    clock = Clock()
    clock.advance(T0 + 200)
    report = reconcile(conn, clock, lock_conn)
    nid, state, _ = notification(conn)
    assert state == "failed"
    assert (report.confirmed, report.repaired, report.failed) == (1, 0, 1)
    assert report.exit_code() == runner.EXIT_DIFFERENCES and not report.clean
    assert findings(conn) == [("notification_failed", "open", str(nid))]
    # a late acknowledgement still counts and answers the finding
    # (notifications_store.ack_notification)
    tx(conn, notifications_store.ack_notification,
       conn.execute("SELECT account_id FROM notifications").fetchone()[0], nid,
       round(clock.seconds() * 1000))
    assert findings(conn) == [("notification_failed", "repaired", str(nid))]


def test_a_stuck_pending_row_is_made_due_and_failed_after_the_give_up_time(conn, lock_conn):
    """Nothing claims a pending row: re-sent (made due) each run, failed once it is too old."""
    owe_notifications(conn, recipients=1, messages=1)
    conn.execute("UPDATE notifications SET next_attempt_ms = next_attempt_ms + 86400000")
    clock = Clock()
    clock.advance(T0 + 90)
    config = attrs.evolve(QUICK, give_up_s=600.0)
    first = reconcile(conn, clock, lock_conn, config=config)
    assert (first.confirmed, first.repaired, first.detail["suspects"]["stuck_pending"]) == (
        1, 1, 1)
    due = conn.execute("SELECT next_attempt_ms FROM notifications").fetchone()[0]
    assert round((T0 + 90) * 1000) < due <= round(clock.seconds() * 1000)  # due now
    clock.advance(600)
    second = reconcile(conn, clock, lock_conn, config=config)
    assert (second.confirmed, second.failed) == (1, 1)
    assert notification(conn)[1] == "failed"
    assert [f[:2] for f in findings(conn)] == [("notification_resent", "repaired"),
                                               ("notification_failed", "open")]


def test_an_ack_between_the_first_and_second_look_is_not_a_problem(conn, lock_conn):
    """A suspect acknowledged before the second look is not confirmed, repaired or recorded."""
    [account] = owe_notifications(conn, recipients=1, messages=1)
    make_stale(conn, attempts=1, sent_ago_s=120, now_s=T0 + 200)
    nid = notification(conn)[0]
    clock = Clock()
    clock.advance(T0 + 200)
    clock.callLater(0.5, lambda: tx(conn, notifications_store.ack_notification, account, nid,
                                    round(clock.seconds() * 1000)))
    report = reconcile(conn, clock, lock_conn)
    assert (report.suspects, report.confirmed, report.repaired) == (1, 0, 0)
    assert report.clean and notification(conn)[1] == "acked"
    assert findings(conn) == [] and audit_actions(conn) == []


def test_dry_run_reports_and_changes_no_row(conn, lock_conn):
    """--dry-run: every difference confirmed and reported, no row written, exit 3."""
    owe_notifications(conn, recipients=2, messages=2)
    make_stale(conn, attempts=1, sent_ago_s=120, now_s=T0 + 200)
    conn.execute("DELETE FROM notifications WHERE notification_id = "
                 "(SELECT notification_id FROM notifications ORDER BY 1 LIMIT 1)")
    before = conn.execute("SELECT * FROM notifications ORDER BY notification_id").fetchall()
    clock = Clock()
    clock.advance(T0 + 200)
    report = reconcile(conn, clock, lock_conn, dry_run=True)
    assert (report.suspects, report.confirmed, report.repaired, report.failed) == (4, 4, 0, 0)
    assert report.detail["would"] == {"created": 1, "resent": 3, "failed": 0}
    assert report.exit_code() == runner.EXIT_DIFFERENCES
    assert conn.execute("SELECT * FROM notifications ORDER BY notification_id").fetchall() \
        == before
    assert findings(conn) == [] and audit_actions(conn) == []


def test_a_second_concurrent_run_exits_locked(conn, lock_conn, db_dsn):
    """While another run holds the kind's lock, a run does nothing and exits 4."""
    owe_notifications(conn, recipients=1, messages=1)
    with psycopg.connect(db_dsn, autocommit=True) as holder:
        assert runner.try_lock(holder, "notifications")
        clock = Clock()
        clock.advance(T0)
        report = reconcile(conn, clock, lock_conn)
    assert report.locked and report.exit_code() == runner.EXIT_LOCKED
    assert conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] == 0


def test_a_stopped_run_is_partial_and_the_next_run_resumes(conn, lock_conn):
    """A run stopped after a page is saved as 'interrupted' and partial (exit 3); the next
    resumes after it."""
    sender, member = uuid.uuid4(), uuid.uuid4()
    with conn.transaction():
        accounts_store.create_account(conn, Account(sender, "sender", "cloud"), None)
        accounts_store.create_account(conn, Account(member, "member", "cloud"), None)
        for i in range(3):
            cid = uuid.uuid4()
            conversations_store.create_conversation(conn, cid, [sender, member])
            messages_store.post_message(conn, cid, sender, f"c-{i}", "hello", round(T0 * 1000))
    conn.execute("DELETE FROM notifications")
    clock = Clock()
    clock.advance(T0 + 10)
    config = attrs.evolve(QUICK, batch=1)
    first = reconcile(conn, clock, lock_conn, config=config, stop=True)
    assert not first.completed and first.repaired == 1 and not first.resumed
    assert first.exit_code() == runner.EXIT_DIFFERENCES and not first.clean
    second = reconcile(conn, clock, lock_conn, config=config)
    assert second.completed and second.resumed and second.repaired == 2
    assert conn.execute("SELECT count(*) FROM notifications").fetchone()[0] == 3
    runs = conn.execute("SELECT state, progress FROM reconcile_runs ORDER BY run_id").fetchall()
    assert [r[0] for r in runs] == ["failed", "finished"]  # the first superseded by its resume
    assert runs[0][1]["done"] == 1 and runs[1][1] == {"dry_run": False}  # a fresh pass next


def test_a_run_that_compared_nothing_is_an_error(conn, lock_conn):
    """An empty store is not 'in sync': nothing was compared, exit 1."""
    clock = Clock()
    clock.advance(T0)
    report = reconcile(conn, clock, lock_conn)
    assert report.completed and report.compared == 0
    assert report.exit_code() == runner.EXIT_ERROR and not report.clean


def test_config_is_validated():
    """Nonsensical thresholds fail when the config is built, naming the field."""
    for kwargs, name in (({"ack_sla_s": 0}, "ack_sla_s"), ({"batch": -1}, "batch"),
                         ({"max_attempts": 0}, "max_attempts"),
                         ({"since_ms": float("nan")}, "since_ms")):
        with pytest.raises(ValueError, match=name):
            NotificationsConfig(**kwargs)


def _cli_notifications(argv: list[str]) -> NotificationsReconciler:
    """The notifications reconciler ``bridgectl <argv>`` builds (parsed by the real CLI)."""
    from bridgectl import cmd_reconcile
    from bridgectl import main as cli

    return cmd_reconcile._reconciler("notifications", cli.build_parser().parse_args(argv), None)


@pytest.mark.parametrize("argv,created", [
    (["reconcile", "all", "--since", "30d"], 0),          # the gaps window, not theirs
    (["reconcile", "all", "--since", "30d", "--notifications-since", "30d"], 1),
    (["reconcile", "notifications", "--since", "30d"], 1),  # asked for explicitly
    (["reconcile", "notifications"], 0),                   # their own window: 24 h
])
def test_since_never_widens_the_notifications_window_unless_asked(conn, lock_conn, argv,
                                                                  created):
    """A message two days old whose notification is missing: only an explicit
    notifications window (--since for notifications, --notifications-since for all) makes
    the reconciler owe it now; reconcile all --since 30d leaves it alone."""
    sender, member = uuid.uuid4(), uuid.uuid4()
    two_days_ago = T0 - 2 * 86400
    with conn.transaction():
        accounts_store.create_account(conn, Account(sender, "sender", "cloud"), None)
        accounts_store.create_account(conn, Account(member, "member", "cloud"), None)
        cid = uuid.uuid4()
        conversations_store.create_conversation(conn, cid, [sender, member])
        messages_store.post_message(conn, cid, sender, "old", "hello",
                                    round(two_days_ago * 1000))
    conn.execute("DELETE FROM notifications")
    clock = Clock()
    clock.advance(T0)
    rec = _cli_notifications(argv)
    d = defer.Deferred.fromCoroutine(runner.run_one(
        rec, clock=clock, db=InlineDatabase(conn), lock_conn=lock_conn, dry_run=False,
        max_seconds=None))
    for _ in range(100):
        if d.called:
            break
        clock.advance(0.1)
    report = result_of(d)
    assert report.error is None and report.repaired == created
    assert conn.execute("SELECT count(*) FROM notifications").fetchone()[0] == created
