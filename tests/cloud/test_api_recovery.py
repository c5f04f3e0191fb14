"""``POST /v1/recover`` over real HTTP bytes against a real store: a right code sets the new
password (it logs in, the old one does not), once; every bad input is a 4xx with a clear
reason that changes nothing; failures are audited and rate-limited per account and address.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer

from cloud import recovery
from cloud.passwords import hash_password
from cloud.store import recovery as recovery_store
from tests.cloud.test_api import (
    NOW_MS,
    PASSWORD,
    Connection,
    Harness,
    Response,
    make_harness,
    raw_request,
)

CODE = "K7QM-3XWD-PN8A"
NEW = "correct horse battery"


@pytest.fixture
def h(conn) -> Harness:
    """The API with cheap hashing (the test accounts' cost), the dummy hash included."""
    harness = make_harness(conn, password_hash=lambda p: defer.succeed(
        hash_password(p, iterations=10)))
    return harness


@pytest.fixture(autouse=True)
def cheap_dummy(monkeypatch) -> None:
    dummy = hash_password("nobody's code", iterations=10)
    monkeypatch.setattr(recovery, "_dummy_hash", lambda: dummy)


def issue(h: Harness, handle: str = "alice", code: str = CODE, *, ttl_ms: int = 3_600_000,
          now_ms: int = NOW_MS) -> None:
    with h.conn.transaction():
        recovery_store.issue_code(h.conn, handle, recovery.hash_code(code, iterations=10),
                                  now_ms=now_ms, expires_ms=now_ms + ttl_ms, actor="test")


def recover(h: Harness, body: object, address: str = "10.0.0.1", *,
            raw: bytes | None = None) -> Response:
    c = Connection(h.site, address)
    c.send(raw_request(b"POST", b"/v1/recover",
                       body=raw if raw is not None else json.dumps(body).encode()))
    r = c.response()
    assert r is not None and r.headers["content-type"] == "application/json"
    return r


def login(h: Harness, handle: str, password: str) -> int:
    return h.request("POST", "/v1/login",
                     json_body={"handle": handle, "password": password}).status


def audit(h: Harness) -> list[tuple]:
    return h.conn.execute("SELECT action, detail FROM audit_log WHERE action IN "
                          "('recovery_refused', 'account_recovered') ORDER BY audit_id"
                          ).fetchall()


def test_a_right_code_sets_the_new_password_once(h):
    """200; the new password logs in and the old is refused; the code does not work twice;
    the change is queued for the legacy login server and audited."""
    alice = h.account("alice")
    issue(h)
    r = recover(h, {"handle": "alice", "code": CODE.lower().replace("-", ""),
                    "new_password": NEW})
    assert r.status == 200, r.body
    assert r.json() == {"account_id": str(alice), "handle": "alice", "recovered": True,
                        "legacy": "queued"}
    assert login(h, "alice", NEW) == 200
    assert login(h, "alice", PASSWORD) == 401
    again = recover(h, {"handle": "alice", "code": CODE, "new_password": "another one 2"})
    assert (again.status, again.code) == (401, "code_used")
    assert login(h, "alice", NEW) == 200
    pending = h.conn.execute("SELECT legacy_handle, state FROM credential_changes").fetchall()
    assert pending == [("alice", "pending")]
    assert [(a, d.get("result")) for a, d in audit(h)] == [
        ("account_recovered", None), ("recovery_refused", "code_used")]


@pytest.mark.parametrize("body, status, code", [
    ({"handle": "alice", "code": "WRON-GCOD-E222", "new_password": NEW}, 401,
     "bad_recovery_code"),
    ({"handle": "nobody", "code": CODE, "new_password": NEW}, 401, "bad_recovery_code"),
    ({"handle": "alice", "code": CODE, "new_password": "short"}, 400, "weak_password"),
    ({"handle": "alice", "code": CODE, "new_password": "ALICE"}, 400, "weak_password"),
    ({"handle": "alice", "code": CODE, "new_password": "aaaaaaaaaaaa"}, 400, "weak_password"),
    ({"handle": "alice", "code": CODE}, 400, "missing_field"),
    ({"handle": "alice", "code": CODE, "new_password": NEW, "x": 1}, 400, "unknown_field"),
    ({"handle": "alice", "code": 7, "new_password": NEW}, 400, "invalid_field"),
    ({"handle": ["alice"], "code": CODE, "new_password": NEW}, 400, "invalid_field"),
    ({"handle": "alice", "code": CODE, "new_password": None}, 400, "invalid_field"),
    ({"handle": "alice", "code": "c" * 65, "new_password": NEW}, 400, "invalid_field"),
    ({"handle": "alice", "code": CODE, "new_password": "nul\x00in it"}, 400, "invalid_field"),
    ([1, 2], 400, "malformed_json"),
])
def test_bad_input_is_a_4xx_with_a_reason_and_changes_nothing(h, body, status, code):
    h.account("alice")
    issue(h)
    before = h.snapshot()
    r = recover(h, body)
    assert (r.status, r.code) == (status, code), r.body
    assert r.json()["error"]["message"]
    assert h.snapshot() == before
    assert login(h, "alice", PASSWORD) == 200


def test_malformed_json_and_an_empty_body_change_nothing(h):
    h.account("alice")
    issue(h)
    before = h.snapshot()
    assert recover(h, None, raw=b'{"handle": "alice",').code == "malformed_json"
    assert recover(h, None, raw=b"").code == "missing_body"
    assert h.snapshot() == before


def test_an_expired_code_is_refused_as_expired_and_audited(h):
    h.account("alice")
    issue(h, ttl_ms=60_000)
    h.clock.advance(61)
    before = h.snapshot()
    r = recover(h, {"handle": "alice", "code": CODE, "new_password": NEW})
    assert (r.status, r.code) == (401, "code_expired")
    assert "expired" in r.json()["error"]["message"]
    assert h.snapshot() == before
    assert [d["result"] for _a, d in audit(h)] == ["code_expired"]


def test_a_new_code_replaces_the_earlier_unused_one(h):
    h.account("alice")
    issue(h, code="AAAA-BBBB-CCCC")
    issue(h, code=CODE)
    r = recover(h, {"handle": "alice", "code": "AAAA-BBBB-CCCC", "new_password": NEW})
    assert (r.status, r.code) == (401, "bad_recovery_code")
    assert recover(h, {"handle": "alice", "code": CODE, "new_password": NEW}).status == 200


def test_an_unknown_handle_and_a_wrong_code_get_the_same_answer(h):
    h.account("alice")
    issue(h)
    a = recover(h, {"handle": "alice", "code": "XXXX-XXXX-XXXX", "new_password": NEW})
    b = recover(h, {"handle": "nobody", "code": CODE, "new_password": NEW})
    assert (a.status, a.body) == (b.status, b.body)
    assert [(act, d["handle"], d["result"]) for act, d in audit(h)] == [
        ("recovery_refused", "alice", "bad_recovery_code"),
        ("recovery_refused", "nobody", "bad_recovery_code")]


def test_failed_recoveries_are_limited_per_account_and_per_address(h):
    """5 failures per account per minute (from any address), then 429 even for the right
    code; 20 per address; login budgets are untouched; the window refills them."""
    h.account("alice")
    issue(h)
    for i in range(5):
        assert recover(h, {"handle": "alice", "code": "XXXX-XXXX-XXXX", "new_password": NEW},
                       f"10.0.1.{i}").status == 401
    r = recover(h, {"handle": "alice", "code": CODE, "new_password": NEW}, "10.0.2.1")
    assert (r.status, r.code) == (429, "rate_limited") and int(r.headers["retry-after"]) >= 1
    assert login(h, "alice", PASSWORD) == 200  # recovery budgets are not the logins'
    for i in range(20):
        recover(h, {"handle": f"nobody{i}", "code": CODE, "new_password": NEW}, "10.0.3.3")
    r = recover(h, {"handle": "someone", "code": CODE, "new_password": NEW}, "10.0.3.3")
    assert r.code == "rate_limited"
    h.clock.advance(61)
    assert recover(h, {"handle": "alice", "code": CODE, "new_password": NEW},
                   "10.0.3.3").status == 200
