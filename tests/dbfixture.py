"""A real PostgreSQL for tests: ``BRIDGE_TEST_DSN`` when set, the embedded server otherwise.

Each test run creates its own database (``bridge_test_<pid>_<random>``) on that server,
applies the migrations once, and drops it at the end. Each test gets an empty store: every
table but ``schema_migrations`` that was written since is truncated before it runs. The
run's database commits with ``synchronous_commit = off``: no test crashes the server, so a
commit need not wait for its WAL flush (about 1 ms of each of the suite's many thousands;
what a commit makes visible, and in what order, is the same). Any test that uses one of these
fixtures is marked ``db`` (see ``tests/conftest.py``), so ``pytest -m db`` runs exactly the
database tests, which is how ``.ci/run`` repeats them against the machine's own server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import conninfo, sql
from twisted.internet import defer

from cloud import embedded, schema
from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.model import Account
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store


def _with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)


@pytest.fixture(scope="session")
def db_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a maintenance database on the server the tests use."""
    dsn = os.environ.get("BRIDGE_TEST_DSN")
    if dsn:
        yield dsn
        return
    home = tmp_path_factory.mktemp("embedded-pg")
    try:
        yield embedded.admin_dsn(home)
    finally:
        embedded.stop(home)


@pytest.fixture(scope="session")
def db_dsn(db_server: str) -> Iterator[str]:
    """DSN of this run's own, migrated database; dropped when the run ends."""
    name = f"bridge_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(db_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    dsn = _with_dbname(db_server, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.upgrade(conn)
        yield dsn
    finally:
        with psycopg.connect(db_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_dsn(db_server: str) -> Iterator[str]:
    """DSN of a brand-new, empty database (no schema), dropped after the test."""
    name = f"bridge_empty_{secrets.token_hex(4)}"
    with psycopg.connect(db_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(db_server, name)
    finally:
        with psycopg.connect(db_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: Each table of the store (less ``schema_migrations``) that is not as a TRUNCATE left it:
#: its heap has a page (a truncated one has none, and a row, even one deleted since, leaves
#: at least one), it was analyzed since (``reltuples`` is -1 after a TRUNCATE, and the
#: planner plans for a table analyzed empty as it does not for a fresh one), or a sequence it
#: owns was advanced.
_WRITTEN_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'schema_migrations'
   AND (pg_relation_size(c.oid) > 0 OR c.reltuples >= 0
        OR EXISTS (SELECT 1 FROM pg_depend d JOIN pg_sequences s
                     ON s.schemaname = 'public'
                    AND s.sequencename = (SELECT relname FROM pg_class WHERE oid = d.objid)
                    WHERE d.refobjid = c.oid AND d.deptype IN ('a', 'i')
                      AND s.last_value IS NOT NULL))
"""


def truncate_all(conn: psycopg.Connection) -> None:
    """Empty every table but ``schema_migrations`` and restart their sequences, as one
    TRUNCATE of them all would; only the tables written since their last truncation are
    truncated, with the tables that refer to them (a TRUNCATE of all twenty takes about
    75 ms, of the accounts and their referrers about 16 ms, and the suite runs this before
    each of its 1,200 database tests)."""
    tables = [r[0] for r in conn.execute(_WRITTEN_TABLES)]
    if tables:
        # CASCADE: a written table's referrers go too (they are empty unless written, and
        # then they are in the list anyway)
        conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables)
                     + " RESTART IDENTITY CASCADE")


@pytest.fixture
def conn(db_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to an empty, migrated store."""
    with psycopg.connect(db_dsn, autocommit=True) as c:
        truncate_all(c)
        yield c


# ---------------------------------------------------------------- helpers for store tests

def tx(conn: psycopg.Connection, fn: Callable, *args: object, **kwargs: object) -> object:
    """Run one store function in its own transaction on *conn*."""
    with conn.transaction():
        return fn(conn, *args, **kwargs)


@contextlib.contextmanager
def failing_inserts(conn: psycopg.Connection, table: str, error: str) -> Iterator[None]:
    """Every INSERT into *table* raises *error* (a RaiseException) while inside."""
    conn.execute(sql.SQL("CREATE OR REPLACE FUNCTION failing_insert() RETURNS trigger "
                         "LANGUAGE plpgsql AS {} ").format(
        sql.Literal(f"BEGIN RAISE EXCEPTION {sql.Literal(error).as_string(conn)}; END")))
    conn.execute(sql.SQL("CREATE TRIGGER failing_insert BEFORE INSERT ON {} "
                         "FOR EACH ROW EXECUTE FUNCTION failing_insert()").format(
        sql.Identifier(table)))
    try:
        yield
    finally:
        conn.execute(sql.SQL("DROP TRIGGER failing_insert ON {}").format(sql.Identifier(table)))


class RoundTrips:
    """How many times a connection sent and then waited for the server (``round_trips``)."""

    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def round_trips(conn: psycopg.Connection) -> Iterator[RoundTrips]:
    """Count *conn*'s round trips while inside: libpq's protocol trace of the connection,
    read afterwards, counts each turn from messages the client sent (``F``) to messages
    the server sent (``B``). A pipeline's statements sent together take one."""
    seen = RoundTrips()
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield seen
        finally:
            conn.pgconn.untrace()
            trace.seek(0)
            last = ""
            for line in trace.read().decode(errors="replace").splitlines():
                side = line[:1]
                if side == "B" and last == "F":
                    seen.count += 1
                if side in ("B", "F"):
                    last = side


def make_account(conn: psycopg.Connection, handle: str, phase: str = "dual") -> uuid.UUID:
    """A new account (random id) whose handle is also its legacy handle."""
    account_id = uuid.uuid4()
    tx(conn, accounts_store.create_account, Account(account_id, handle, phase, handle), None)
    return account_id


def make_conversation(conn: psycopg.Connection, *members: uuid.UUID,
                      chat: str | None = None) -> uuid.UUID:
    cid = uuid.uuid4()
    tx(conn, conversations_store.create_conversation, cid, members, legacy_chat_id=chat)
    return cid


class ScriptedDatabase:
    """A TransactionRunner whose next calls of *fn* (of any function when None) fail as
    scripted: a DatabaseUnavailable fails the Deferred, any other exception is raised (a bug
    that raises instead of failing the Deferred), None runs normally."""

    def __init__(self, inner: TransactionRunner, fn: Callable | None,
                 faults: list[Exception | None]) -> None:
        self.inner = inner
        self.fn = fn
        self.faults = list(faults)

    @classmethod
    def down_for(cls, inner: TransactionRunner, n: int) -> ScriptedDatabase:
        """The server is unreachable for the next *n* transactions, whatever they are."""
        return cls(inner, None, [DatabaseUnavailable("server closed the connection")] * n)

    def run(self, desc: str, fn: Callable, *args: object, **kwargs: object) -> defer.Deferred:
        if (self.fn is None or fn is self.fn) and self.faults:
            fault = self.faults.pop(0)
            if isinstance(fault, DatabaseUnavailable):
                return defer.fail(fault)
            if fault is not None:
                raise fault
        return self.inner.run(desc, fn, *args, **kwargs)
