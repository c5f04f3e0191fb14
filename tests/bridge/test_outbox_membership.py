"""Cloud -> legacy membership changes through the outbox injector (bridge/outbox_membership.py)
on the in-memory legacy network and a real PostgreSQL (the Scene of test_outbox)."""

from __future__ import annotations

from typing import Any

from bridge import ids
from cloud.store import conversations as conversations_store
from legacy import wire
from tests.bridge.test_outbox import (  # noqa: F401 - make_scene is the fixture
    Scene,
    ScriptedPeers,
    findings,
    make_scene,
)
from tests.dbfixture import make_account, make_conversation, tx


def three(conn) -> tuple[Any, Any, Any, Any]:
    """alice (dual), bob and carol (legacy) in one conversation."""
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob", "legacy")
    carol = make_account(conn, "carol", "legacy")
    return make_conversation(conn, alice, bob, carol), alice, bob, carol


def home_feed(s: Scene, chat_id: str) -> list[Any]:
    """The chat's home feed from now on, as it arrives."""
    sn = s.net.ring.home_of(chat_id)
    home = s.net.supernodes[sn]
    frames: list[Any] = []
    s.net.peer(sn).subscribe(home.epoch, home.mem.feed.next_offset, 100, frames.append)
    return frames


def test_a_change_is_applied_in_order_with_the_messages_even_after_a_failure(
        conn, make_scene):  # noqa: F811
    """post, remove carol, post, with the home unreachable at the first pass: the three
    rows wait together, then the home applies message, change, message in that order
    (pipelined on one connection); carol is off the chat's list and the second message
    went to the others only."""
    s = make_scene(start=False, wrap_peers=lambda peers: ScriptedPeers(peers, ["down"]))
    cid, alice, _bob, _carol = three(conn)
    chat_id = ids.chat_for_cloud_conversation(cid)
    feed = home_feed(s, chat_id)
    s.post(cid, alice, "before")
    tx(conn, conversations_store.remove_member, cid, alice, "carol", s.now_ms())
    s.post(cid, alice, "after")
    s.injector.startService()
    s.run(5)
    home = s.net.supernodes[s.net.ring.home_of(chat_id)]
    assert home.mem.chats[chat_id].members == ("alice", "bob")
    order = [("chat", f.members, f.origin) if isinstance(f, wire.FeedChat)
             else ("message", f.message.body) for f in feed
             if isinstance(f, (wire.FeedChat, wire.FeedMessage))]
    assert order == [("chat", ("alice", "bob", "carol"), "cloud"), ("message", "before"),
                     ("chat", ("alice", "bob"), "cloud"), ("message", "after")]
    assert s.injector.membership_changes == 1 and s.injector.injected == 2
    assert s.injector.failures == 1  # the first pass, with the home down
    assert conn.execute("SELECT kind, state FROM outbox_to_legacy ORDER BY seq, sub"
                        ).fetchall() == [("message", "done"), ("members", "done"),
                                         ("message", "done")]


def test_a_change_legacy_can_never_carry_is_refused_with_a_finding_and_the_rest_goes_on(
        conn, make_scene):  # noqa: F811
    """A handle longer than the wire's 128 bytes, added then removed: both changes are
    skipped with inject_refused findings naming them; the message after them is injected."""
    s = make_scene(start=False)
    cid, alice, _bob, _carol = three(conn)
    long = "x" * 130
    make_account(conn, long, "legacy")
    tx(conn, conversations_store.add_member, cid, alice, long, s.now_ms())
    tx(conn, conversations_store.remove_member, cid, alice, long, s.now_ms())
    s.post(cid, alice, "after the changes")
    s.injector.startService()
    s.run(2)
    assert conn.execute("SELECT kind, state FROM outbox_to_legacy ORDER BY seq, sub"
                        ).fetchall() == [("members", "skipped"), ("members", "skipped"),
                                         ("message", "done")]
    refused = findings(conn)
    assert [(k, state, c) for k, state, c, _ in refused] == [
        ("inject_refused", "open", cid)] * 2
    assert [(d["kind"], d["add"], d["remove"]) for *_, d in refused] == [
        ("members", [long], []), ("members", [], [long])]
    assert all("not encodable" in d["reason"] for *_, d in refused)
    assert [m.body for m in s.history(ids.chat_for_cloud_conversation(cid))] == [
        "after the changes"]
