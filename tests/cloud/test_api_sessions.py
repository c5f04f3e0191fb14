"""What keeps a web session going: ``POST /v1/token`` renews a valid token before it
expires, and ``GET .../messages?before=`` pages back through history older than a client
first loaded. Over real HTTP bytes against a real store, as ``tests/cloud/test_api.py``."""

from __future__ import annotations

import pytest

from cloud import tokens
from cloud.store import accounts as accounts_store
from tests.cloud.test_api import NOW_MS, SECRET, Harness, make_harness, page_through, post


@pytest.fixture
def h(conn) -> Harness:
    return make_harness(conn)


def renew(h: Harness, token: str | None):
    return h.request("POST", "/v1/token", token=token)


def test_a_valid_token_is_renewed_with_a_full_lifetime(h):
    """A token near its end gets a new one that lasts a full lifetime from now and
    authenticates; the old one still expires when it did."""
    alice = h.account("alice")
    old = tokens.issue(SECRET, alice, NOW_MS, 3_600_000)
    h.clock.advance(3500)
    r = renew(h, old)
    assert r.status == 200, r.body
    got = r.json()
    now_ms = NOW_MS + 3_500_000
    assert got["account_id"] == str(alice) and got["phase"] == "dual"
    assert got["expires_ms"] == now_ms + 3_600_000 and got["expires_in_ms"] == 3_600_000
    assert tokens.verify(SECRET, got["token"], now_ms) == alice
    h.clock.advance(200)  # past the old token's end, well within the new one's
    assert h.request("GET", "/v1/conversations", token=old).status == 401
    assert h.request("GET", "/v1/conversations", token=got["token"]).status == 200


def test_an_expired_token_is_not_renewed(h):
    """Past its expiry a token gets 401 unauthorized (expired): the user logs in again."""
    alice = h.account("alice")
    old = tokens.issue(SECRET, alice, NOW_MS, 60_000)
    h.clock.advance(60)
    r = renew(h, old)
    assert (r.status, r.code) == (401, "unauthorized")
    assert "expired" in r.json()["error"]["message"]


def test_a_token_from_before_a_recovery_is_not_renewed(h):
    """A password set by a recovery after the token was issued ends that session at its
    expiry: renewal is 401 with the reason; a token issued after the change renews."""
    alice = h.account("alice")
    old = h.token(alice)
    h.clock.advance(10)
    with h.conn.transaction():
        h.conn.execute("INSERT INTO recovery_codes (account_id, code_hash, issued_ms, "
                       "expires_ms, issued_by, used_ms) VALUES (%s, 'x', %s, %s, 't', %s)",
                       (alice, NOW_MS, NOW_MS + 600_000, NOW_MS + 10_000))
    r = renew(h, old)
    assert (r.status, r.code) == (401, "unauthorized")
    assert "password changed" in r.json()["error"]["message"]
    h.clock.advance(1)
    fresh = h.token(alice)
    assert renew(h, fresh).status == 200


def test_a_legacy_change_of_the_password_counts_too(h):
    """The credential change queued for legacy (a linked account's recovery) is a password
    change as well, even after the code row was replaced by a newer, unused code."""
    alice = h.account("alice")
    old = h.token(alice)
    h.clock.advance(5)
    with h.conn.transaction():
        h.conn.execute("INSERT INTO credential_changes (account_id, legacy_handle, "
                       "password_hash, changed_ms, next_try_ms) VALUES (%s, 'alice', 'h', "
                       "%s, %s)", (alice, NOW_MS + 5_000, NOW_MS + 5_000))
    assert renew(h, old).status == 401


def test_an_account_moved_back_to_legacy_is_not_renewed(h):
    """403 not_migrated, as on every other route."""
    alice = h.account("alice")
    token = h.token(alice)
    with h.conn.transaction():
        accounts_store.set_phase(h.conn, alice, "legacy")
    r = renew(h, token)
    assert (r.status, r.code) == (403, "not_migrated")


@pytest.mark.parametrize("body", [b'{"ttl_s": 99999}', b'{"x": 1}', b"[]", b"nope"])
def test_a_renewal_takes_no_body_or_query(h, body):
    """A body (any body but nothing or ``{}``) or a query parameter is 400, and no token."""
    alice = h.account("alice")
    r = h.request("POST", "/v1/token", token=h.token(alice), body=body)
    assert r.status == 400 and "token" not in r.json()
    r = h.request("POST", "/v1/token?ttl=9", token=h.token(alice))
    assert (r.status, r.code) == (400, "unknown_parameter")


def test_renewal_changes_nothing_in_the_store(h):
    """Tokens are stateless: a renewal writes no row."""
    alice = h.account("alice")
    before = h.snapshot()
    assert renew(h, h.token(alice)).status == 200
    assert h.snapshot() == before


# ---------------------------------------------------------------- older history

def test_before_pages_back_through_history_in_order(h):
    """From the newest page back, ``before=next_before`` gives each older page in seq
    order, until an empty page whose cursor stays put."""
    alice = h.account("alice")
    cid = h.conversation(alice)
    token = h.token(alice)
    for i in range(1, 8):
        assert post(h, token, cid, f"c{i}", f"m{i}").status == 201
    pages, before = page_through(h, token, cid, "before", 8, 3)
    assert [[m["seq"] for m in page] for page in pages] == [[5, 6, 7], [2, 3, 4], [1]]
    assert before == 1


def test_before_with_after_reads_the_newest_of_a_range(h):
    """``after`` bounds a backward page from below: the newest messages between both."""
    alice = h.account("alice")
    cid = h.conversation(alice)
    token = h.token(alice)
    for i in range(1, 10):
        post(h, token, cid, f"c{i}", f"m{i}")
    page = h.request("GET", f"/v1/conversations/{cid}/messages?after=2&before=9&limit=4",
                     token=token).json()
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7, 8]
    assert page["next_before"] == 5 and page["next_after"] == 8


def test_before_is_for_members_only(h):
    """A non-member gets 403 for older history as for newer."""
    alice, bob = h.account("alice"), h.account("bob")
    cid = h.conversation(alice)
    post(h, h.token(alice), cid, "c1", "secret")
    r = h.request("GET", f"/v1/conversations/{cid}/messages?before=5", token=h.token(bob))
    assert (r.status, r.code) == (403, "not_member")
