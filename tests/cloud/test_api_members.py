"""The cloud API's conversation and membership routes (issue 16): create a conversation,
add and remove members; each change is queued for legacy in order with the messages, and
bad input gets a 4xx and changes nothing."""

from __future__ import annotations

import uuid

import pytest

from cloud.model import MAX_MEMBERS
from tests.cloud.test_api import Harness, make_harness, post


@pytest.fixture
def h(conn) -> Harness:
    return make_harness(conn)


def outbox(h: Harness, cid: uuid.UUID) -> list[tuple]:
    return h.conn.execute(
        "SELECT seq, sub, kind, add_handles, remove_handles, member_handles "
        "FROM outbox_to_legacy WHERE conversation_id = %s ORDER BY seq, sub", (cid,)).fetchall()


def members_of(h: Harness, cid: uuid.UUID) -> set[uuid.UUID]:
    return {r[0] for r in h.conn.execute(
        "SELECT account_id FROM members WHERE conversation_id = %s", (cid,)).fetchall()}


# ---------------------------------------------------------------- create

def test_a_client_creates_a_conversation_with_itself_and_the_handles_it_names(h):
    """POST /v1/conversations: 201, the creator and the named accounts are its members, it
    is listed for them, and nothing is queued for legacy before its first message."""
    alice, bob, carol = h.account("alice"), h.account("bob", "legacy"), h.account("carol")
    r = h.request("POST", "/v1/conversations", token=h.token(alice),
                  json_body={"members": ["bob", "carol"], "title": "plans"})
    assert r.status == 201
    cid = uuid.UUID(r.json()["conversation_id"])
    assert r.json()["title"] == "plans"
    assert set(r.json()["members"]) == {str(alice), str(bob), str(carol)}
    assert members_of(h, cid) == {alice, bob, carol}
    listed = h.request("GET", "/v1/conversations", token=h.token(carol)).json()
    assert [c["conversation_id"] for c in listed["conversations"]] == [str(cid)]
    assert outbox(h, cid) == []


@pytest.mark.parametrize(("body", "status"), [
    ({"members": []}, 400),
    ({"members": ["alice"]}, 400),                  # only the creator: fewer than 2
    ({"members": ["bob", "bob"]}, 400),
    ({"members": ["bob", "nobody"]}, 404),          # an unknown handle
    ({"members": "bob"}, 400),
    ({"members": [7]}, 400),
    ({"members": ["bo\x00b"]}, 400),
    ({"members": ["x" * 257]}, 400),
    ({"members": [f"u{i}" for i in range(MAX_MEMBERS + 1)]}, 400),
    ({"members": ["bob"], "title": "t" * 201}, 400),
    ({"members": ["bob"], "title": "a\x07b"}, 400),
    ({"members": ["bob"], "title": 5}, 400),
    ({"members": ["bob"], "topic": "x"}, 400),
    ({"title": "no members"}, 400),
    (None, 400),
])
def test_bad_new_conversations_get_a_4xx_and_create_nothing(h, body, status):
    """Every flaw in a new conversation is refused before anything is written."""
    alice = h.account("alice")
    h.account("bob")
    before = h.snapshot()
    r = h.request("POST", "/v1/conversations", token=h.token(alice), json_body=body)
    assert r.status == status and r.code
    assert h.snapshot() == before


def test_too_many_members_by_handle_is_400_and_creates_nothing(h):
    """MAX_MEMBERS distinct handles plus the creator is one too many."""
    alice = h.account("alice")
    for i in range(MAX_MEMBERS):
        h.account(f"u{i}")
    before = h.snapshot()
    r = h.request("POST", "/v1/conversations", token=h.token(alice),
                  json_body={"members": [f"u{i}" for i in range(MAX_MEMBERS)]})
    assert (r.status, r.code) == (400, "invalid_request")
    assert h.snapshot() == before


# ---------------------------------------------------------------- add and remove

def test_adding_a_member_is_queued_for_legacy_after_the_last_message(h):
    """A member adds carol: 200 added; an outbox row of kind members follows the last
    message's row; adding her again changes nothing and queues nothing."""
    alice, bob = h.account("alice"), h.account("bob", "legacy")
    carol = h.account("carol", "legacy")
    cid = h.conversation(alice, bob)
    post(h, h.token(alice), cid, "m1")
    r = h.request("POST", f"/v1/conversations/{cid}/members", token=h.token(alice),
                  json_body={"handle": "carol"})
    assert (r.status, r.json()) == (200, {"handle": "carol", "added": True})
    assert carol in members_of(h, cid)
    again = h.request("POST", f"/v1/conversations/{cid}/members", token=h.token(alice),
                      json_body={"handle": "carol"})
    assert (again.status, again.json()["added"]) == (200, False)
    assert [(seq, sub, kind, add, remove) for seq, sub, kind, add, remove, _ in
            outbox(h, cid)] == [(1, 0, "message", None, None), (1, 1, "members", ["carol"], [])]


def test_removal_is_queued_in_order_and_later_messages_go_only_to_who_is_left(h):
    """post, remove bob, post: the rows keep that order; the first message's row names bob,
    the second's does not; bob can no longer read the conversation nor is owed the second
    message's notification."""
    alice, bob = h.account("alice"), h.account("bob")
    h.account("lena", "legacy")
    lena = h.conn.execute("SELECT account_id FROM accounts WHERE handle = 'lena'").fetchone()[0]
    cid = h.conversation(alice, bob, lena)
    post(h, h.token(alice), cid, "m1")
    r = h.request("DELETE", f"/v1/conversations/{cid}/members/bob", token=h.token(alice))
    assert (r.status, r.json()) == (200, {"handle": "bob", "removed": True})
    post(h, h.token(alice), cid, "m2")
    assert outbox(h, cid) == [
        (1, 0, "message", None, None, ["alice", "bob", "lena"]),
        (1, 1, "members", [], ["bob"], None),
        (2, 0, "message", None, None, ["alice", "lena"])]
    owed = h.conn.execute("SELECT seq FROM notifications WHERE account_id = %s ORDER BY seq",
                          (bob,)).fetchall()
    assert owed == [(1,)]
    sync = h.request("GET", f"/v1/conversations/{cid}/messages", token=h.token(bob))
    assert (sync.status, sync.code) == (403, "not_member")


def test_a_member_may_leave_and_a_change_with_nobody_on_legacy_is_not_queued(h):
    """Removing oneself is leaving; with no member on legacy clients nothing is queued."""
    alice, bob, carol = (h.account(n, "cloud-only") for n in ("alice", "bob", "carol"))
    cid = h.conversation(alice, bob, carol)
    r = h.request("DELETE", f"/v1/conversations/{cid}/members/carol", token=h.token(carol))
    assert r.status == 200
    assert members_of(h, cid) == {alice, bob}
    assert outbox(h, cid) == []


@pytest.mark.parametrize(("who", "path", "body", "status", "code"), [
    ("outsider", "members", {"handle": "carol"}, 403, "not_member"),
    ("alice", "members", {"handle": "nobody"}, 404, "not_found"),
    ("alice", "members", {"handle": ""}, 400, "invalid_field"),
    ("alice", "members", {"handle": "ca\x1frol"}, 400, "invalid_field"),
    ("alice", "members", {"handle": ["carol"]}, 400, "invalid_field"),
    ("alice", "members", {"handle": "carol", "role": "admin"}, 400, "unknown_field"),
    ("alice", "members", {}, 400, "missing_field"),
    ("alice", "members", None, 400, "missing_body"),
    ("alice", "unknown conversation", {"handle": "carol"}, 404, "not_found"),
    ("outsider", "members/bob", None, 403, "not_member"),
    ("alice", "members/carol", None, 404, "not_found"),     # not a member
    ("alice", "members/nobody", None, 404, "not_found"),
    ("alice", "members/%FF", None, 404, "not_found"),       # not UTF-8
    ("alice", "members/b%00ob", None, 404, "not_found"),
    ("alice", "members/bob", {"why": "x"}, 400, "unknown_field"),
    ("alice", "unknown conversation/bob", None, 404, "not_found"),
])
def test_bad_membership_changes_get_a_4xx_and_change_nothing(h, who, path, body, status,
                                                             code):
    """Outsiders, unknown handles or conversations, non-members and malformed input are
    refused before anything is written: members and outbox stay as they were."""
    alice, bob = h.account("alice"), h.account("bob", "legacy")
    outsider = h.account("outsider")
    h.account("carol")
    cid = h.conversation(alice, bob)
    actor = {"alice": alice, "outsider": outsider}[who]
    if path.startswith("unknown conversation"):
        target = (f"/v1/conversations/{uuid.uuid4()}/members"
                  + path[len("unknown conversation"):])
    else:
        target = f"/v1/conversations/{cid}/{path}"
    method = "POST" if path in ("members", "unknown conversation") else "DELETE"
    before = h.snapshot()
    r = h.request(method, target, token=h.token(actor), json_body=body)
    assert (r.status, r.code) == (status, code)
    assert h.snapshot() == before


def test_adding_past_the_member_limit_is_400_and_changes_nothing(h):
    """A conversation that has MAX_MEMBERS members takes no more."""
    ids = [h.account(f"u{i}") for i in range(MAX_MEMBERS)]
    h.account("late")
    cid = h.conversation(*ids)
    before = h.snapshot()
    r = h.request("POST", f"/v1/conversations/{cid}/members", token=h.token(ids[0]),
                  json_body={"handle": "late"})
    assert (r.status, r.code) == (400, "invalid_request")
    assert h.snapshot() == before
