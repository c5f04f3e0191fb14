"""Running transactions: psycopg 3 connections from a pool, in a dedicated thread pool.

Every piece of database work is one plain function ``fn(conn, *args)`` that runs inside one
transaction and is safe to run twice, under a short, stable description (Synapse's
``runInteraction(desc, fn, ...)`` shape). ``Database`` runs it in its own Twisted thread pool,
on the injected reactor, and returns a Deferred; ``InlineDatabase`` runs it at once on one
connection, for deterministic tests. Both satisfy ``TransactionRunner``.

Each transaction's duration is observed in ``cloud_db_transaction_seconds{desc}``, failures
and conflict re-runs included, so a slow query is one metric away; each re-run after a
conflict also counts in ``cloud_db_transaction_conflicts_total{desc}``.

Serialization failures and deadlocks are retried here, at once, a few times: they are the
database asking for exactly that. A lost connection or an unreachable server is not retried
here; it surfaces as ``DatabaseUnavailable`` so the caller's retry policy, on its injected
clock, decides when to try again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import psycopg
from prometheus_client import Counter, Histogram
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

T = TypeVar("T")

#: How many times a transaction that hit a serialization failure or deadlock is re-run.
CONFLICT_RETRIES = 5

TRANSACTION_SECONDS = Histogram(
    "cloud_db_transaction_seconds",
    "Time to run one transaction, conflict re-runs and failures included, by description.",
    ["desc"])
TRANSACTION_CONFLICTS = Counter(
    "cloud_db_transaction_conflicts_total",
    "Transactions run again after a serialization failure or deadlock, by description.", ["desc"])


class DatabaseUnavailable(Exception):
    """The server could not be reached or the connection broke; try again later."""


class TransactionRunner(Protocol):
    """Something that runs ``fn(conn, *args)`` in one transaction named *desc* (a short,
    stable, snake_case name such as ``"claim_outbox"``) and returns a Deferred."""

    def run(self, desc: str, fn: Callable[..., T], *args: Any,
            **kwargs: Any) -> defer.Deferred: ...


#: Statements psycopg keeps prepared on a connection. Its default, 100, is about as many as
#: the store's statements one connection runs often: a simulated day on one connection ran
#: 100 of them five times or more (psycopg prepares a statement at its sixth run). Past
#: the limit it evicts the least recently used, and statements used in turn may never stay
#: prepared (150 used round-robin: none prepared), each then parsed and planned every time.
PREPARED_MAX = 1000


def keep_prepared(conn: psycopg.Connection) -> None:
    """Let *conn* keep up to ``PREPARED_MAX`` statements prepared."""
    conn.prepared_max = PREPARED_MAX


@contextlib.contextmanager
def pipeline(conn: psycopg.Connection) -> Iterator[psycopg.Pipeline]:
    """``conn.pipeline()``, forgetting psycopg's prepared statements when it fails.

    In a pipeline psycopg counts a statement as prepared as soon as it has sent its Parse
    (at its sixth run), but the server skips every message after a failed statement up to
    the Sync, that Parse included: psycopg would then go on executing a name the server
    never had (``InvalidSqlStatementName``), on that connection until a psycopg transaction
    block rolls back, which clears the cache. So any error of the pipeline clears it here
    too, as that rollback does (psycopg deallocates them all after the next statement).
    """
    try:
        with conn.pipeline() as p:
            yield p
    except psycopg.Error:
        conn._prepared.clear()  # noqa: SLF001 - what psycopg's own rollback does
        raise


def one_statement(fn: Callable[..., T]) -> Callable[..., T]:
    """Mark *fn* as one whose writes are a single statement (or none): on an autocommit
    connection that statement is its own transaction, so the runner sends no BEGIN and
    COMMIT around it (two round trips and two statements for the server saved). *fn* must
    not leave a partial write behind if it fails between statements: every statement of it
    either is that write, or only reads."""
    fn.runs_as_one_statement = True  # type: ignore[attr-defined]
    return fn


def transaction_totals() -> dict[str, tuple[float, float]]:
    """Per transaction description: (count, seconds) of the transactions ``run_transaction``
    ran in this process so far, read from ``cloud_db_transaction_seconds``: what a run's
    database work was, for a report (the simulation's, a benchmark's)."""
    out: dict[str, list[float]] = {}
    for metric in TRANSACTION_SECONDS.collect():
        for sample in metric.samples:
            desc = sample.labels.get("desc")
            if sample.name.endswith("_count"):
                out.setdefault(desc, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(desc, [0.0, 0.0])[1] = sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def run_transaction(conn: psycopg.Connection, desc: str, fn: Callable[..., T], *args: Any,
                    **kwargs: Any) -> T:
    """Run *fn* in one transaction on *conn*, re-running it on serialization conflicts, and
    observe how long that took under *desc*. A ``one_statement`` function on an idle
    autocommit connection runs without BEGIN and COMMIT: its statement is the transaction."""
    if not isinstance(desc, str):  # a caller that forgot the description passed fn here
        raise TypeError(f"a transaction needs a description, not {desc!r}")
    bare = (getattr(fn, "runs_as_one_statement", False) and conn.autocommit
            and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)
    with TRANSACTION_SECONDS.labels(desc=desc).time():
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                if bare:
                    return fn(conn, *args, **kwargs)
                with conn.transaction():
                    return fn(conn, *args, **kwargs)
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
                if attempt == CONFLICT_RETRIES:
                    raise
                TRANSACTION_CONFLICTS.labels(desc=desc).inc()
                log.info("transaction {desc} conflicted; running it again", desc=desc,
                         fn=fn.__name__)
    raise AssertionError("unreachable")


class Database(Service):
    """A psycopg connection pool plus the thread pool that uses it, as a Twisted Service."""

    def __init__(self, reactor: Any, dsn: str, *, max_connections: int = 8,
                 name: str = "cloud-db", connect_timeout_s: float = 5.0) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._max = max_connections
        self._timeout = connect_timeout_s
        self.setName(name)
        self._threads: ThreadPool | None = None
        self._pool: ConnectionPool | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._threads = ThreadPool(minthreads=1, maxthreads=self._max, name=self.name)
        self._pool = ConnectionPool(
            self._dsn, min_size=1, max_size=self._max, open=False, timeout=self._timeout,
            name=self.name, kwargs={"autocommit": True}, configure=keep_prepared)
        self._pool.open(wait=False)
        self._threads.start()

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        threads_, pool = self._threads, self._pool
        self._threads = self._pool = None

        def close() -> None:
            if pool is not None:
                pool.close()

        # Closing the pool waits for connections in use, so do it off the reactor thread (on
        # our own pool, through the injected reactor: never the global one), then stop the
        # worker threads (which joins them once their work is done).
        d = (threads.deferToThreadPool(self._reactor, threads_, close)
             if pool is not None and threads_ is not None else defer.succeed(None))
        if threads_ is not None:
            d.addBoth(lambda r: (threads_.stop(), r)[1])
        return d

    def run(self, desc: str, fn: Callable[..., T], *args: Any,
            **kwargs: Any) -> defer.Deferred:
        """Run ``fn(conn, *args, **kwargs)`` in one transaction named *desc* on a pool
        thread."""
        if self._threads is None or self._pool is None:
            return defer.fail(DatabaseUnavailable("the database service is not running"))
        return threads.deferToThreadPool(
            self._reactor, self._threads, self._run_sync, desc, fn, args, kwargs)

    def _run_sync(self, desc: str, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable("the database service stopped")
        try:
            with pool.connection() as conn:
                return run_transaction(conn, desc, fn, *args, **kwargs)
        except PoolTimeout as e:
            raise DatabaseUnavailable(f"no database connection within {self._timeout}s") from e
        except psycopg.OperationalError as e:
            raise DatabaseUnavailable(str(e).strip() or type(e).__name__) from e


class InlineDatabase:
    """Runs each transaction immediately on one connection: deterministic, for tests."""

    def __init__(self, conn: psycopg.Connection) -> None:
        if not conn.autocommit:
            raise ValueError("InlineDatabase needs an autocommit connection")
        keep_prepared(conn)
        self.conn = conn

    def run(self, desc: str, fn: Callable[..., T], *args: Any,
            **kwargs: Any) -> defer.Deferred:
        """Run ``fn(conn, *args, **kwargs)`` in one transaction named *desc*, at once."""
        try:
            return defer.succeed(run_transaction(self.conn, desc, fn, *args, **kwargs))
        except psycopg.OperationalError as e:
            return defer.fail(DatabaseUnavailable(str(e)))
        except Exception:
            return defer.fail()
