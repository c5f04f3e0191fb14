"""The transaction runner against a real PostgreSQL: every transaction is timed under its
description, and the Database service closes its pool on the injected reactor."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import psycopg
import pytest
from prometheus_client import REGISTRY
from twisted.trial.unittest import SynchronousTestCase

from cloud.db import (
    PREPARED_MAX,
    Database,
    InlineDatabase,
    one_statement,
    pipeline,
    run_transaction,
)
from cloud.store import accounts as accounts_store
from cloud.store.errors import NotFound

_CASE = SynchronousTestCase()


def observed(desc: str) -> float:
    """How many transactions ``cloud_db_transaction_seconds`` has seen under *desc*."""
    return REGISTRY.get_sample_value("cloud_db_transaction_seconds_count", {"desc": desc}) or 0.0


def conflicts(desc: str) -> float:
    return REGISTRY.get_sample_value("cloud_db_transaction_conflicts_total", {"desc": desc}) or 0.0


def test_a_committed_transaction_is_observed_under_its_description(conn):
    """A transaction that commits adds one observation to its desc, and to no other."""
    before, other = observed("test_db_count_accounts"), observed("test_db_other")
    db = InlineDatabase(conn)
    counts = _CASE.successResultOf(
        db.run("test_db_count_accounts", accounts_store.accounts_by_phase))
    assert counts["legacy"] == 0
    assert observed("test_db_count_accounts") == before + 1
    assert observed("test_db_other") == other


def test_a_failed_transaction_is_observed_under_its_description(conn):
    """A transaction that raises is timed too, and its failure reaches the caller."""
    before = observed("test_db_set_phase_of_nobody")
    db = InlineDatabase(conn)
    failure = _CASE.failureResultOf(
        db.run("test_db_set_phase_of_nobody", accounts_store.set_phase, uuid.uuid4(), "dual"))
    failure.trap(NotFound)
    assert observed("test_db_set_phase_of_nobody") == before + 1


def test_a_conflict_rerun_is_counted_once_per_rerun_and_timed_once(conn):
    """A serialization failure re-runs the function: one conflict counted, one duration."""
    calls = []

    def conflicts_once(c: psycopg.Connection) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise psycopg.errors.SerializationFailure("could not serialize access")
        return c.execute("SELECT 1").fetchone()[0]

    before, reruns = observed("test_db_conflicts_once"), conflicts("test_db_conflicts_once")
    assert run_transaction(conn, "test_db_conflicts_once", conflicts_once) == 1
    assert len(calls) == 2
    assert conflicts("test_db_conflicts_once") == reruns + 1
    assert observed("test_db_conflicts_once") == before + 1


def test_a_transaction_without_a_description_is_refused(conn):
    """Forgetting the description is a TypeError, not a transaction named after a function."""
    with pytest.raises(TypeError, match="description"):
        run_transaction(conn, accounts_store.accounts_by_phase, 0)  # type: ignore[arg-type]


class RecordingReactor:
    """Just enough of a reactor for deferToThreadPool: calls from threads are queued for the
    test to run, so only this reactor can fire the Database's Deferreds."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable, tuple, dict]] = []
        self.called = threading.Event()

    def callFromThread(self, f: Callable, *args: object, **kwargs: object) -> None:  # noqa: N802
        self.calls.append((f, args, kwargs))
        self.called.set()

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        self.called.clear()
        for f, args, kwargs in calls:
            f(*args, **kwargs)


def test_database_runs_and_closes_on_the_injected_reactor(db_dsn):
    """Transactions and the pool's close report back through the injected reactor, never the
    global one: stopService fires only once the injected reactor runs the close's result."""
    reactor = RecordingReactor()
    db = Database(reactor, db_dsn, max_connections=2)
    db.startService()
    d = db.run("test_db_select_one", lambda c: c.execute("SELECT 1").fetchone()[0])
    assert reactor.called.wait(30), "the transaction never reported to the injected reactor"
    reactor.run_calls()
    assert _CASE.successResultOf(d) == 1
    stopped = db.stopService()
    assert reactor.called.wait(30), "the pool's close never reported to the injected reactor"
    _CASE.assertNoResult(stopped)
    reactor.run_calls()
    _CASE.successResultOf(stopped)


def test_a_connection_keeps_more_statements_prepared_than_psycopgs_default(conn, db_dsn):
    """The store's connections keep up to PREPARED_MAX statements prepared: 150 statements run
    six times each on an InlineDatabase's connection are all still prepared on the server
    (psycopg's default keeps 100 and deallocates the least recently used, which are then
    parsed and planned again). The pool's connections are set the same way."""
    db = InlineDatabase(conn)
    conn.execute("DEALLOCATE ALL")
    for _ in range(6):  # psycopg prepares a statement on its sixth run
        for i in range(150):
            _CASE.successResultOf(db.run("test_db_prepared", lambda c, i=i: c.execute(
                f"SELECT {i} + %s::int", [i]).fetchone()))
    (prepared,) = conn.execute("SELECT count(*) FROM pg_prepared_statements "
                               "WHERE statement LIKE 'SELECT % + $1::int'").fetchone()
    assert prepared == 150
    reactor = RecordingReactor()
    pool = Database(reactor, db_dsn, max_connections=1)
    pool.startService()
    d = pool.run("test_db_prepared_max", lambda c: c.prepared_max)
    assert reactor.called.wait(30), "the transaction never reported to the injected reactor"
    reactor.run_calls()
    assert _CASE.successResultOf(d) == PREPARED_MAX
    stopped = pool.stopService()
    assert reactor.called.wait(30)
    reactor.run_calls()
    _CASE.successResultOf(stopped)


def test_a_one_statement_function_runs_without_begin_and_commit(conn):
    """Marked ``one_statement``, a function runs on the idle autocommit connection as it is
    (its statement is the transaction); unmarked, inside BEGIN ... COMMIT; and marked but
    called inside a caller's transaction, it stays inside it."""
    idle = psycopg.pq.TransactionStatus.IDLE

    def status(c: psycopg.Connection) -> psycopg.pq.TransactionStatus:
        return c.info.transaction_status

    assert run_transaction(conn, "test_db_status", status) != idle
    assert run_transaction(conn, "test_db_status", one_statement(status)) == idle
    with conn.transaction():
        assert run_transaction(conn, "test_db_status", one_statement(status)) != idle


_SIXTH_RUN = "SELECT %s::int + 1"


def _five_runs(conn: psycopg.Connection) -> None:
    for i in range(5):
        conn.execute(_SIXTH_RUN, (i,))


def test_a_failed_implicit_pipeline_leaves_no_statement_psycopg_thinks_prepared(conn):
    """A statement at its sixth run (the one psycopg prepares at) sent in a pipeline after a
    failing one: the server skips its Parse. ``pipeline`` forgets psycopg's prepared
    statements then, so the next run parses it again; with ``conn.pipeline()`` alone every
    later run failed with InvalidSqlStatementName (nothing on an idle connection clears
    psycopg's cache)."""
    _five_runs(conn)
    with pytest.raises(psycopg.errors.DivisionByZero), pipeline(conn):
        conn.execute("SELECT 1 / 0")
        conn.execute(_SIXTH_RUN, (1,))
    for i in range(3):
        assert conn.execute(_SIXTH_RUN, (i,)).fetchone() == (i + 1,)


def test_a_failed_pipeline_rolled_back_to_its_savepoint_leaves_no_statement_unprepared(conn):
    """The same inside a transaction that goes on after ``ROLLBACK TO SAVEPOINT`` (a replayed
    feed batch): psycopg clears its cache on that ROLLBACK only the first time it sees the
    statement, so a connection that had rolled back to a savepoint before failed there."""
    with conn.transaction():
        conn.execute("SAVEPOINT s")
        conn.execute("ROLLBACK TO SAVEPOINT s")
    _five_runs(conn)
    with conn.transaction():
        conn.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.DivisionByZero), pipeline(conn):
            conn.execute("SELECT 1 / 0")
            conn.execute(_SIXTH_RUN, (1,))
        conn.execute("ROLLBACK TO SAVEPOINT s")
        assert conn.execute(_SIXTH_RUN, (5,)).fetchone() == (6,)
    assert conn.execute(_SIXTH_RUN, (6,)).fetchone() == (7,)
