"""Failed logins at the cloud API are limited per account and per client address (429).

Real HTTP/1.1 bytes through the API's Site, a real store (the budgets are its
``login_buckets``), the harness of ``test_api``; the client address of each request is
chosen by the test, time is the harness's ``Clock``.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer

from cloud import api
from cloud.passwords import hash_password, verify_password
from cloud.ratelimit import PRUNE_INTERVAL_S, LoginLimits, retry_after_header
from cloud.store import accounts as accounts_store
from cloud.store import login_limits as login_limits_store
from tests.cloud.test_api import (
    PASSWORD,
    Connection,
    Harness,
    Response,
    make_harness,
    raw_request,
)


def login(h: Harness, body: dict, address: str = "10.0.0.1") -> Response:
    """POST /v1/login from *address*; the response must be complete at once."""
    connection = Connection(h.site, address)
    connection.send(raw_request(b"POST", b"/v1/login", body=json.dumps(body).encode()))
    response = connection.response()
    assert response is not None and response.headers["content-type"] == "application/json"
    return response


def wrong(handle: str = "alice") -> dict:
    return {"handle": handle, "password": "wrong"}


def right(handle: str = "alice") -> dict:
    return {"handle": handle, "password": PASSWORD}


@pytest.fixture(autouse=True)
def cheap_dummy_hash(monkeypatch) -> None:
    """Unknown accounts are checked against a dummy hash of the real cost (0.1 s each);
    these tests make hundreds of such logins, so theirs is as cheap as the test accounts'."""
    dummy = hash_password("not a password of anyone", iterations=10)
    monkeypatch.setattr(api, "_dummy_password_hash", lambda: dummy)


@pytest.fixture
def checks() -> list[str]:
    """Passwords the API checked (the expensive step), in order."""
    return []


@pytest.fixture
def h(conn, checks) -> Harness:
    def check(password: str, encoded: str) -> defer.Deferred:
        checks.append(password)
        return defer.succeed(verify_password(password, encoded))

    h = make_harness(conn, password_check=check)
    h.account("alice")
    h.account("bob")
    return h


def account_id(h: Harness, handle: str) -> str:
    return str(h.conn.execute("SELECT account_id FROM accounts WHERE handle = %s",
                              (handle,)).fetchone()[0])


def logins_total(result: str) -> float:
    return REGISTRY.get_sample_value("cloud_api_logins_total", {"result": result}) or 0.0


def test_ten_failures_make_the_account_429_before_any_password_work(h, checks):
    """After 10 wrong passwords even the right one is 429 rate_limited with Retry-After, its
    password unchecked, and nothing in the store changes."""
    before = logins_total("rate_limited")
    assert [login(h, wrong()).status for _ in range(10)] == [401] * 10
    checked = len(checks)
    snapshot = h.snapshot()
    r = login(h, right())
    assert (r.status, r.code) == (429, "rate_limited")
    assert r.headers["retry-after"] == "6"  # 10 per minute: one try back every 6 s
    assert "retry in 6 s" in r.json()["error"]["message"]
    assert "token" not in r.json()
    assert len(checks) == checked
    assert h.snapshot() == snapshot
    assert logins_total("rate_limited") == before + 1


def test_one_budget_per_account_whether_named_by_handle_or_id(h):
    """Failures by handle also count for logins by account id (and the other way round)."""
    for _ in range(5):
        login(h, wrong())
    for _ in range(5):
        login(h, {"account_id": account_id(h, "alice"), "password": "wrong"})
    assert login(h, {"account_id": account_id(h, "alice"), "password": PASSWORD}).status == 429
    assert login(h, right()).status == 429


def test_other_accounts_are_unaffected(h):
    """A throttled account does not stop another account from the same address."""
    for _ in range(10):
        login(h, wrong())
    assert login(h, right("bob")).status == 200
    assert login(h, right(), address="10.9.9.9").status == 429  # the budget is the account's


def test_the_account_recovers_on_the_clock(h):
    """6 s after the tenth failure one try is back; after a minute all ten are."""
    for _ in range(10):
        login(h, wrong())
    h.clock.advance(5.9)
    assert login(h, right()).status == 429
    h.clock.advance(0.1)
    assert login(h, right()).status == 200
    h.clock.advance(60)
    assert [login(h, wrong()).status for _ in range(11)] == [401] * 10 + [429]


def test_thirty_failures_from_one_address_refuse_that_address(h, checks, monkeypatch):
    """30 failures over unknown handles from one address: 429 for it, even for a right
    password of another account, before even the account lookup; another address logs
    in."""
    assert {login(h, wrong(f"guess-{i}"), address="10.6.6.6").status
            for i in range(30)} == {401}
    checked = len(checks)
    lookups = []
    lookup = accounts_store.account_for_login
    monkeypatch.setattr(accounts_store, "account_for_login",
                        lambda *args: (lookups.append(args[1:]), lookup(*args))[1])
    r = login(h, right("bob"), address="10.6.6.6")
    assert (r.status, r.code) == (429, "rate_limited") and len(checks) == checked
    assert lookups == []  # refused before it cost a query
    assert login(h, right("bob"), address="10.7.7.7").status == 200
    assert lookups == [("bob",)]  # (the counting wrapper does see lookups)


def test_successful_logins_spend_nothing(h):
    """50 right passwords from one address all succeed and leave no bucket behind."""
    assert {login(h, right()).status for _ in range(50)} == {200}
    h.account("old", "legacy")
    assert {login(h, right("old")).code for _ in range(15)} == {"not_migrated"}
    assert login_limits_store.bucket_count(h.conn) == {"account": 0, "address": 0}


def test_a_flood_of_distinct_handles_keeps_the_table_bounded(conn):
    """Failures over 300 distinct handles and addresses: the next pruning (within
    PRUNE_INTERVAL_S) keeps at most max_keys buckets per scope, those that hold most."""
    h = make_harness(conn, login_limits=LoginLimits(max_keys=50, window_s=600))
    for i in range(300):
        assert login(h, wrong(f"nobody-{i}"), address=f"10.1.{i // 256}.{i % 256}").status \
            == 401
    assert login_limits_store.bucket_count(conn) == {"account": 300, "address": 300}
    h.clock.advance(PRUNE_INTERVAL_S)
    assert login(h, wrong(), address="10.2.0.1").status == 401
    assert login_limits_store.bucket_count(conn) == {"account": 50, "address": 50}
    kept = {r[0] for r in conn.execute("SELECT key FROM login_buckets WHERE scope = 'address'")}
    assert "10.2.0.1" in kept  # the newest failure holds the most; the oldest went


def test_buckets_that_refilled_are_pruned(h):
    """A minute after its last failure a budget is full again: its row goes at the next
    pruning, and the account has all ten tries back."""
    for _ in range(10):
        login(h, wrong())
    h.clock.advance(60)
    assert login(h, wrong("bob"), address="10.3.3.3").status == 401  # prunes
    keys = {r[0] for r in h.conn.execute("SELECT key FROM login_buckets")}
    assert keys == {f"account:{account_id(h, 'bob')}", "10.3.3.3"}
    assert [login(h, wrong()).status for _ in range(11)] == [401] * 10 + [429]


def test_limits_are_configurable(conn):
    """CloudAPI takes its own LoginLimits (e.g. a stricter per-account budget)."""
    h = make_harness(conn, login_limits=LoginLimits(per_account=2, window_s=10))
    h.account("alice")
    assert [login(h, wrong()).status for _ in range(3)] == [401, 401, 429]
    assert login(h, right()).headers["retry-after"] == "5"


def test_retry_after_is_whole_seconds_and_never_zero():
    """Retry-After rounds up, and a refusal never says 0."""
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(6.0) == "6"
    assert retry_after_header(6.2) == "7"
