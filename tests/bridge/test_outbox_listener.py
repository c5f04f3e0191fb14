"""Cloud -> legacy: the NOTIFY listener that wakes the outbox injector, against a real
PostgreSQL."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable

import pytest

from bridge.outbox_listener import OutboxListener
from cloud.store import messages as messages_store
from servicekit.retry import RetryPolicy
from tests.bridge.test_outbox import two_party
from tests.dbfixture import _with_dbname, tx


class QueueReactor:
    """Stands in for the reactor: ``callFromThread`` queues the call for the test to run."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f: Callable, *args) -> None:  # noqa: N802 - Twisted's name
        self.calls.put((f, args))

    def run_next(self, timeout: float = 5.0) -> None:
        f, args = self.calls.get(timeout=timeout)
        f(*args)


def stop_listener(listener: OutboxListener, reactor: QueueReactor) -> None:
    stopped = listener.stopService()
    while not stopped.called:
        reactor.run_next(timeout=3.0)
    listener.thread.join(timeout=3.0)
    assert not listener.thread.is_alive()


def test_listener_wakes_on_notify_reconnects_and_stops_promptly(conn, db_dsn):
    """Each committed post NOTIFYs a wake on the reactor, with its conversation; a broken
    connection is reopened."""
    reactor = QueueReactor()
    wakes: list[str | None] = []
    listener = OutboxListener(reactor, db_dsn, wakes.append, wait_s=0.2,
                              retry=RetryPolicy(initial_s=0.05, factor=2, cap_s=0.5))
    listener.startService()
    try:
        reactor.run_next()  # LISTEN is active: the catch-up wake
        assert wakes == [None] and listener.connects == 1
        cid, alice, _ = two_party(conn)
        tx(conn, messages_store.post_message, cid, alice, "c1", "hi", 1)
        reactor.run_next()
        assert wakes == [None, str(cid)] and listener.notifications == 1
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                     "AND query ILIKE 'LISTEN%'")
        reactor.run_next()  # listening again: another catch-up wake
        assert wakes == [None, str(cid), None] and listener.connects == 2
    finally:
        stop_listener(listener, reactor)


def test_listener_keeps_retrying_an_unreachable_database_and_still_stops(db_server):
    """No database: the thread backs off without calling back, and a stop still ends it."""
    reactor = QueueReactor()
    dsn = _with_dbname(db_server, f"no_such_database_{uuid.uuid4().hex[:8]}")
    listener = OutboxListener(reactor, dsn, lambda payload: None, wait_s=0.2,
                              retry=RetryPolicy(initial_s=0.05, factor=2, cap_s=0.2))
    listener.startService()
    with pytest.raises(queue.Empty):
        reactor.calls.get(timeout=0.5)
    assert listener.connects == 0 and listener.thread.is_alive()
    stop_listener(listener, reactor)


def test_notifications_that_come_before_the_reactor_takes_them_go_over_in_one_call(conn, db_dsn):
    """A burst of NOTIFYs that arrives while the reactor has not run the hand-over yet goes
    over in that one call, each distinct payload once, in the order of its first arrival."""
    reactor = QueueReactor()
    wakes: list[str | None] = []
    listener = OutboxListener(reactor, db_dsn, wakes.append, wait_s=0.2)
    listener.startService()
    try:
        reactor.run_next()
        assert wakes == [None]
        for payload in ("a", "b", "a", "c"):  # each its own transaction: four NOTIFYs
            conn.execute("SELECT pg_notify('outbox_to_legacy', %s)", (payload,))
        deadline = time.monotonic() + 5
        while listener.notifications < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.notifications == 4
        assert reactor.calls.qsize() == 1
        reactor.run_next()
        assert wakes == [None, "a", "b", "c"]
        conn.execute("SELECT pg_notify('outbox_to_legacy', 'a')")  # after it: a call again
        reactor.run_next()
        assert wakes == [None, "a", "b", "c", "a"]
    finally:
        stop_listener(listener, reactor)
