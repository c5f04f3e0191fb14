"""cloud.ratelimit: the cloud API's failed-login budgets live in the store, so two API
processes on one database share them. Real PostgreSQL; each limiter has its own
connection and its own clock, as two processes would."""

from __future__ import annotations

import threading

import psycopg
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from cloud.db import InlineDatabase, run_transaction
from cloud.ratelimit import LoginLimiter, LoginLimits
from cloud.store import login_limits as store

#: the tests' clock, in seconds
T0 = 1_700_000_000.0


def result(d) -> object:
    """The result of a coroutine or Deferred that, on an InlineDatabase, has one at once."""
    d = defer.ensureDeferred(d)
    out: list = []
    d.addBoth(out.append)
    assert out, "no result at once"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def processes(conn, db_dsn):
    """Two API processes' limiters on one store: separate connections, separate clocks."""
    made, conns = [], []

    def make(limits: LoginLimits | None = None) -> tuple[LoginLimiter, Clock]:
        c = psycopg.connect(db_dsn, autocommit=True)
        conns.append(c)
        clock = Clock()
        clock.advance(T0)
        made.append((LoginLimiter(InlineDatabase(c), clock, limits), clock))
        return made[-1]

    yield make
    for c in conns:
        c.close()


def test_two_processes_share_one_budget(processes, conn):
    """Failures spent through either process count against the same account budget: after
    six on one and four on the other, both refuse, with the same wait."""
    (a, _), (b, _) = processes(), processes()
    assert [result(a.attempt("account:alice", f"10.0.0.{i}")) for i in range(6)] == [0.0] * 6
    assert [result(b.attempt("account:alice", f"10.0.1.{i}")) for i in range(4)] == [0.0] * 4
    assert result(a.attempt("account:alice", "10.9.9.9")) == pytest.approx(6.0)
    assert result(b.attempt("account:alice", "10.9.9.8")) == pytest.approx(6.0)
    assert store.bucket_count(conn)["account"] == 1


def test_an_address_spent_through_one_process_is_refused_by_the_other(processes):
    """The address budget is shared too, and the pre-check reads it without spending."""
    (a, _), (b, _) = processes(LoginLimits(per_address=3)), processes(LoginLimits(per_address=3))
    for name in ("x", "y", "z"):
        assert result(a.attempt(f"name:{name}", "10.6.6.6")) == 0.0
    assert result(b.address_wait_s("10.6.6.6")) == pytest.approx(20.0)  # 3 per minute
    assert result(b.address_wait_s("10.6.6.6")) == pytest.approx(20.0)  # nothing spent
    assert result(b.address_wait_s("10.7.7.7")) == 0.0


def test_a_refusal_takes_from_neither_budget_and_a_success_gives_both_back(processes):
    """A refusal by either budget spends nothing; a right password returns both tries
    (the same rules as the legacy login server's in-memory limiter)."""
    (a, _), (b, _) = processes(LoginLimits(per_account=2, per_address=3)), \
        processes(LoginLimits(per_account=2, per_address=3))
    assert result(a.attempt("alice", "10.0.0.1")) == 0.0
    assert result(b.attempt("alice", "10.0.0.1")) == 0.0
    assert result(a.attempt("alice", "10.0.0.1")) == pytest.approx(30.0)  # alice is spent
    assert result(b.attempt("bob", "10.0.0.1")) == 0.0  # the address had one more
    assert result(a.attempt("carol", "10.0.0.1")) == pytest.approx(20.0)  # now it has none
    assert result(b.attempt("carol", "10.0.0.2")) == 0.0  # the refusal took none of carol's
    result(a.succeeded("bob", "10.0.0.1"))  # bob's password was right after all
    assert result(b.attempt("dave", "10.0.0.1")) == 0.0


def test_budgets_refill_on_each_processes_clock(processes, conn):
    """One try comes back every window/capacity; a budget full again holds no row once
    pruned, whichever process prunes."""
    (a, clock_a), (b, clock_b) = processes(), processes()
    for _ in range(10):
        result(a.attempt("account:alice", "10.0.0.1"))
    clock_b.advance(5.9)
    assert result(b.attempt("account:alice", "10.0.0.2")) == pytest.approx(0.1)
    clock_b.advance(0.1)
    assert result(b.attempt("account:alice", "10.0.0.2")) == 0.0
    clock_a.advance(61)
    # the two addresses are full again; alice only at T0 + 66 (b's try at T0 + 6 took one
    # more interval of 6 s after her tenth failure's T0 + 60)
    assert result(a.prune()) == 2
    assert store.bucket_count(conn) == {"account": 1, "address": 0}
    clock_b.advance(61)
    assert result(b.prune()) == 1  # T0 + 67 on b's clock
    assert store.bucket_count(conn) == {"account": 0, "address": 0}


def test_racing_processes_never_get_more_than_the_budget(conn, db_dsn):
    """Two processes spending one account's budget at the same moment, 20 tries each, from
    fresh addresses: the row lock serialises them, and exactly the tries left succeed."""
    budget = LoginLimits()
    now_ms = T0 * 1000

    def both(address: str) -> list[store.Budget]:
        return [store.Budget("account", "account:alice", budget.per_account, 60_000.0),
                store.Budget("address", address, budget.per_address, 60_000.0)]

    run_transaction(conn, "take", store.try_take, both("10.0.0.0"), now_ms)  # the row exists
    taken: list[float] = []
    start = threading.Barrier(2)

    def spend(prefix: str) -> None:
        with psycopg.connect(db_dsn, autocommit=True) as c:
            start.wait()
            for i in range(20):
                taken.append(run_transaction(c, "take", store.try_take,
                                             both(f"{prefix}.{i}"), now_ms))

    threads = [threading.Thread(target=spend, args=(p,)) for p in ("10.1", "10.2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(taken) == 40 and taken.count(0.0) == budget.per_account - 1
    full_at = conn.execute("SELECT full_at_ms FROM login_buckets WHERE scope = 'account'"
                           ).fetchone()[0]
    assert full_at == pytest.approx(now_ms + 60_000)  # spent exactly to capacity


def test_the_clock_is_a_parameter_never_the_servers(conn):
    """A limiter whose clock says 1970 writes 1970, and its bucket is not full at the
    server's now: the store's clock plays no part."""
    clock = Clock()
    clock.advance(1000)
    limiter = LoginLimiter(InlineDatabase(conn), clock)
    result(limiter.attempt("account:alice", "10.0.0.1"))
    full_at = conn.execute("SELECT full_at_ms FROM login_buckets WHERE scope = 'account'"
                           ).fetchone()[0]
    assert full_at == 1000 * 1000 + 6000
    assert result(limiter.prune()) == 0
