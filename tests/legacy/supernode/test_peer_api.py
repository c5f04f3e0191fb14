"""The privileged peer API of supernodes and the login server, over the memory network."""

from __future__ import annotations

from typing import Any

import pytest

from legacy import auth, digest, wire
from legacy.peer import PeerRefused, PeerRequestFailed
from tests.legacy.netfixture import LegacyNet

ALL_TIME = (0, 1 << 62)


def whole(chat_id: str, start_ms: int = ALL_TIME[0], end_ms: int = ALL_TIME[1]) -> wire.Range:
    return wire.Range(chat_id=chat_id, start_ms=start_ms, end_ms=end_ms, prefix_bits=0, prefix=0)


def cloud_message(chat_id: str, guid: str, sender: str = "alice", body: str = "from the cloud",
                  origin: str = "cloud", ts_ms: int = 1234) -> wire.ChatMessage:
    return wire.ChatMessage(chat_id=chat_id, guid=guid, legacy_seq=0, sender=sender,
                            ts_ms=ts_ms, body=body, origin=origin)


def request_failure(net: LegacyNet, d: Any) -> PeerRequestFailed:
    with pytest.raises(PeerRequestFailed) as e:
        net.wait(d)
    return e.value


@pytest.mark.parametrize("target", ["supernode", "login"])
def test_wrong_peer_secret_is_refused_with_bad_proof(target):
    """A peer proving a different secret is refused (PeerRefused bad_proof) and disconnected."""
    net = LegacyNet(3).start()
    with pytest.raises(PeerRefused) as e:
        if target == "supernode":
            net.peer("sn0", secret=b"not-the-peer-secret")
        else:
            net.login_peer(secret=b"not-the-peer-secret")
    assert e.value.code == "bad_proof"


def test_digests_list_and_fetch_on_the_home_agree_with_the_messages_sent():
    """On the home SN, list_guids, fetch and digests describe exactly the messages sent."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn1")
    members = ("alice", "bob")
    alice = net.device(net.add_user("alice"), at="sn0")
    bob = net.device(net.add_user("bob"), at="sn2")
    net.online(alice, bob)
    sent = {}
    for i in range(6):
        dev = (alice, bob)[i % 2]
        body = f"message {i} from {dev.user.handle}"
        sent[dev.send(chat, members, body)] = (dev.user.handle, body)
        net.run(0.5)
    net.run(2)

    peer = net.peer("sn1")
    listed = net.wait(peer.list_guids(whole(chat)))
    assert sorted(listed.guids) == sorted(sent)
    assert not listed.truncated

    fetched = net.wait(peer.fetch(chat, list(listed.guids) + ["no-such-guid"]))
    assert {m.guid: (m.sender, m.body) for m in fetched.messages} == sent
    assert sorted(m.legacy_seq for m in fetched.messages) == [1, 2, 3, 4, 5, 6]
    assert {m.origin for m in fetched.messages} == {"legacy"}
    assert fetched.missing == ("no-such-guid",)

    [total] = net.wait(peer.digests(whole(chat)))
    assert total == digest.digest_of(fetched.messages)
    assert total.count == 6
    parts = net.wait(peer.digests(whole(chat), split_bits=2))
    assert len(parts) == 4
    assert sum(p.count for p in parts) == 6
    assert sum(p.total for p in parts) % digest.MOD == total.total

    # a time window selects by the messages' own timestamps
    by_ts = sorted(fetched.messages, key=lambda m: m.ts_ms)
    window = whole(chat, start_ms=by_ts[3].ts_ms)
    assert sorted(net.wait(peer.list_guids(window)).guids) == sorted(m.guid for m in by_ts[3:])
    [tail] = net.wait(peer.digests(window))
    assert tail == digest.digest_of(by_ts[3:])
    assert net.wait(peer.list_guids(whole(chat), limit=2)).truncated


def test_a_non_home_supernode_answers_not_home():
    """History requests and injects for a chat sent to another SN fail with not_home."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn1")
    peer = net.peer("sn0")
    requests = [
        peer.digests(whole(chat)),
        peer.list_guids(whole(chat)),
        peer.fetch(chat, ["g"]),
        peer.inject_message(cloud_message(chat, "g"), ("alice", "bob")),
    ]
    for d in requests:
        assert request_failure(net, d).code == "not_home"
    # the connection stays usable after a failed request
    assert net.wait(peer.chats()).chats == ()
    assert net.supernodes["sn0"].history(chat) == []


def test_inject_message_is_idempotent_and_reaches_legacy_recipients_and_the_feed():
    """An injected GUID is appended, delivered and fed once; re-injecting it is a 'duplicate'."""
    net = LegacyNet(4).start()
    chat = net.chat_homed_at("sn1")
    bob0 = net.device(net.add_user("bob"), "d0", at="sn2")
    bob1 = net.device(net.add_user("bob"), "d1", at="sn3")
    net.online(bob0, bob1)
    net.run(1)
    home = net.supernodes["sn1"]
    peer = net.peer("sn1")
    feed: list[Any] = []
    peer.subscribe(home.epoch, home.mem.feed.next_offset, 100, feed.append)

    msg = cloud_message(chat, "cloud-guid-1")
    first = net.wait(peer.inject_message(msg, ("alice", "bob")))
    again = net.wait(peer.inject_message(msg, ("alice", "bob")))
    assert (first.status, first.value) == ("new", 1)
    assert (again.status, again.value) == ("duplicate", 1)
    net.run(2)

    [stored] = home.history(chat)
    assert (stored.guid, stored.legacy_seq, stored.origin, stored.ts_ms) == (
        "cloud-guid-1", 1, "cloud", 1234)
    for dev in (bob0, bob1):
        assert dev.deliveries == [stored]
    fed = [f.message for f in feed if isinstance(f, wire.FeedMessage)]
    assert fed == [stored]

    second = net.wait(peer.inject_message(cloud_message(chat, "cloud-guid-2"),
                                          ("alice", "bob")))
    assert (second.status, second.value) == ("new", 2)


def results_of(results: tuple) -> list[tuple]:
    """InjectResults as (status, legacy_seq, code) tuples."""
    return [(r.status, r.legacy_seq, r.code) for r in results]


def test_inject_batch_appends_in_order_and_reinjecting_it_is_all_duplicates():
    """One InjectBatch appends its messages in order (fed and delivered as InjectMessage's
    would be), with one result each; sent again, every item is a duplicate, nothing new."""
    net = LegacyNet(4).start()
    chat = net.chat_homed_at("sn1")
    bob = net.device(net.add_user("bob"), at="sn2")
    net.online(bob)
    net.run(1)
    home = net.supernodes["sn1"]
    peer = net.peer("sn1")
    feed: list[Any] = []
    peer.subscribe(home.epoch, home.mem.feed.next_offset, 100, feed.append)
    batch = [cloud_message(chat, f"g{i}", body=f"m{i}") for i in range(5)]
    first = net.wait(peer.inject_batch(chat, ("alice", "bob"), batch))
    assert results_of(first) == [("new", i, "") for i in range(1, 6)]
    again = net.wait(peer.inject_batch(chat, ("alice", "bob"), batch))
    assert results_of(again) == [("duplicate", i, "") for i in range(1, 6)]
    net.run(2)
    history = home.history(chat)
    assert [(m.guid, m.legacy_seq, m.body) for m in history] == [
        (f"g{i}", i + 1, f"m{i}") for i in range(5)]
    assert [f.message for f in feed if isinstance(f, wire.FeedMessage)] == history
    assert bob.deliveries == history


def test_inject_batch_checks_each_item_as_inject_message_does():
    """Each item is checked on its own, with InjectMessage's checks (and its chat must be the
    batch's): a refused item fails alone (bad_message, with the reason InjectMessage would
    give), the items around it are appended, in order."""
    net = LegacyNet(3, retention_seconds=60.0).start()
    net.run_until(100.0)
    chat = net.chat_homed_at("sn0")
    home = net.supernodes["sn0"]
    peer = net.peer("sn0")
    stale = home.now_ms() - 61_000
    bad = {
        "origin": cloud_message(chat, "b-origin", origin="legacy"),
        "sender": cloud_message(chat, "b-sender", sender="mallory"),
        "control": cloud_message(chat, "b\x1fcontrol"),
        "nul": cloud_message(chat, "b-nul", body="a\x00b"),
        "long": cloud_message(chat, "b-long", body="x" * (wire.MAX_MESSAGE_CHARS + 1)),
        "stale": cloud_message(chat, "b-stale", ts_ms=stale),
        "chat": cloud_message(net.chat_homed_at("sn0", prefix="other"), "b-chat"),
    }
    items = []
    for i, message in enumerate(bad.values()):
        items += [cloud_message(chat, f"ok{i}", ts_ms=home.now_ms()), message]
    results = net.wait(peer.inject_batch(chat, ("alice", "bob"), items))
    assert [r.status for r in results] == ["new", "failed"] * len(bad)
    assert [r.legacy_seq for r in results[::2]] == list(range(1, len(bad) + 1))
    refused = dict(zip(bad, results[1::2], strict=True))
    assert {r.code for r in refused.values()} == {"bad_message"}
    for case, message in bad.items():
        if case == "chat":
            assert refused[case].reason == "the message's chat_id is not the batch's"
            continue
        single = request_failure(net, peer.inject_message(message, ("alice", "bob")))
        assert (single.code, single.reason) == ("bad_message", refused[case].reason), case
    assert [m.guid for m in home.history(chat)] == [f"ok{i}" for i in range(len(bad))]


@pytest.mark.parametrize("members,reason", [
    (("alice",), "the sender must be one of 2 or more members"),
    (("alice", "bob", "bob"), "members must be distinct"),
    (("alice", "bo\x1fb"), "ids must not contain control characters"),
])
def test_inject_batch_with_a_bad_member_list_refuses_every_item(members, reason):
    """The member list is the batch's: one that InjectMessage would refuse refuses every
    item (bad_message), and nothing is appended."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn0")
    results = net.wait(net.peer("sn0").inject_batch(
        chat, members, [cloud_message(chat, f"g{i}") for i in range(3)]))
    assert [(r.status, r.code, r.reason) for r in results] == [
        ("failed", "bad_message", reason)] * 3
    assert net.supernodes["sn0"].mem.chats == {}


def test_inject_batch_to_a_supernode_that_is_not_home_fails_whole():
    """A batch for a chat homed elsewhere fails as one request (not_home); nothing of it is
    appended anywhere, and the connection stays usable."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn1")
    peer = net.peer("sn0")
    failure = request_failure(net, peer.inject_batch(
        chat, ("alice", "bob"), [cloud_message(chat, "g1"), cloud_message(chat, "g2")]))
    assert failure.code == "not_home"
    assert all(sn.history(chat) == [] for sn in net.supernodes.values())
    own = net.chat_homed_at("sn0")
    assert results_of(net.wait(peer.inject_batch(own, ("alice", "bob"),
                                                 [cloud_message(own, "g")]))) == [("new", 1, "")]


def test_an_empty_inject_batch_is_answered_with_no_results():
    """A batch of no messages is a valid request: an empty reply."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn0")
    assert net.wait(net.peer("sn0").inject_batch(chat, ("alice", "bob"), [])) == ()


def test_an_inject_batch_the_wire_can_not_carry_is_not_sent():
    """inject_batch raises WireError at once for a batch too large for a frame, and leaves
    nothing pending: the next request on the connection is answered as usual."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn0")
    peer = net.peer("sn0")
    big = [cloud_message(chat, f"g{i}", body="x" * wire.MAX_MESSAGE_CHARS) for i in range(20)]
    with pytest.raises(wire.WireError) as e:
        peer.inject_batch(chat, ("alice", "bob"), big)
    assert e.value.code == "too_large"
    assert peer._pending == {}
    assert results_of(net.wait(peer.inject_batch(chat, ("alice", "bob"), big[:3]))) == [
        ("new", i, "") for i in (1, 2, 3)]


@pytest.mark.parametrize("origin", ["legacy", ""])
def test_inject_without_a_foreign_origin_mark_is_refused(origin):
    """An injected message must carry an origin other than 'legacy' (else bad_message)."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn0")
    peer = net.peer("sn0")
    failure = request_failure(net, peer.inject_message(
        cloud_message(chat, "g-1", origin=origin), ("alice", "bob")))
    assert failure.code == "bad_message"
    assert net.supernodes["sn0"].history(chat) == []


def test_inject_presence_reaches_a_subscriber_and_expires_with_its_ttl():
    """Injected presence reaches a legacy subscriber of the handle and lapses after ttl_ms."""
    net = LegacyNet(4, sweep_interval=1.0).start()
    cloudy = net.handle_indexed_at("sn1", "cloudy")
    sub = net.device(net.add_user("sub", contacts=(cloudy,)), at="sn2")
    net.online(sub)
    net.run(1)
    peer = net.peer("sn0")
    ack = net.wait(peer.inject_presence(cloudy, "away", ttl_ms=20_000, origin="cloud"))
    injected_at = net.clock.seconds()
    assert ack.status == "ok"
    net.run(1)
    assert sub.presence[cloudy] == "away"
    net.run_until(injected_at + 19.0)
    assert sub.presence[cloudy] == "away"
    net.run_until(injected_at + 22.0)
    assert sub.presence[cloudy] == "offline"


@pytest.mark.parametrize(("status", "ttl_ms", "origin", "code"), [
    ("away", 20_000, "legacy", "bad_presence"),
    ("dancing", 20_000, "cloud", "bad_presence"),
    ("online", 0, "cloud", "bad_ttl"),
    ("online", 3_600_001, "cloud", "bad_ttl"),
])
def test_inject_presence_rejects_bad_requests(status, ttl_ms, origin, code):
    """Injected presence with a legacy origin, unknown status or out-of-range ttl is refused."""
    net = LegacyNet(3).start()
    peer = net.peer("sn0")
    assert request_failure(net, peer.inject_presence("h", status, ttl_ms, origin)).code == code


def test_chats_pages_through_every_chat_homed_at_the_supernode():
    """chats() pages in chat-id order with a done flag, each with its members and last_seq."""
    net = LegacyNet(3).start()
    peer = net.peer("sn0")
    homed = sorted({net.chat_homed_at("sn0", prefix=f"room{i}") for i in range(5)})
    assert len(homed) == 5
    for n, chat in enumerate(homed, start=1):
        for k in range(n):
            net.wait(peer.inject_message(cloud_message(chat, f"{chat}-{k}"), ("alice", "bob")))

    pages, after = [], ""
    while True:
        page = net.wait(peer.chats(after=after, limit=2))
        pages.append(page)
        if page.done:
            break
        after = page.chats[-1].chat_id
    assert [len(p.chats) for p in pages] == [2, 2, 1]
    infos = [c for p in pages for c in p.chats]
    assert [c.chat_id for c in infos] == homed
    assert [c.last_seq for c in infos] == [1, 2, 3, 4, 5]
    assert {c.members for c in infos} == {("alice", "bob")}


def test_login_server_pages_accounts_for_peers():
    """accounts() pages every legacy account in handle order with its hash and moved flag."""
    net = LegacyNet(3).start()
    handles = [f"user{i}" for i in range(5)]
    for h in handles:
        net.add_user(h)
    net.login.set_moved("user3", True)
    peer = net.login_peer()
    records, after, dones = [], "", []
    while True:
        page = net.wait(peer.accounts(after=after, limit=2))
        records.extend(page.accounts)
        dones.append(page.done)
        if page.done:
            break
        after = page.accounts[-1].handle
    assert dones == [False, False, True]
    assert [r.handle for r in records] == handles
    assert [r.moved for r in records] == [h == "user3" for h in handles]
    assert all(r.password_hash == net.login.accounts[r.handle][0] for r in records)


def test_set_moved_over_the_peer_api_refuses_then_readmits_legacy_logins():
    """A peer's set_moved refuses logins with 'moved', is reversible, rejects unknown handles."""
    net = LegacyNet(3).start()
    user = net.add_user("hana")
    peer = net.login_peer()
    assert net.wait(peer.set_moved("hana", True)).status == "ok"
    dev = net.device(user)
    dev.start()
    net.run(3)
    assert dev.last_error is not None and dev.last_error[0] == "moved"
    assert net.wait(peer.set_moved("hana", False)).status == "ok"
    net.online(net.device(user, "d1"))
    assert request_failure(net, peer.set_moved("nobody", True)).code == "unknown_handle"


def test_set_password_hash_replaces_the_password_on_the_login_server():
    """A peer's set_password_hash makes the new password log in and refuses the old; an
    unknown handle and a hash the login server could never check are refused, unchanged."""
    net = LegacyNet(3).start()
    user = net.add_user("hana")
    peer = net.login_peer()
    new_hash = auth.hash_password("a new password", iterations=10)
    assert net.wait(peer.set_password_hash("hana", new_hash)).status == "ok"
    assert isinstance(net.login.login("hana", "a new password"), wire.Credential)
    assert net.login.login("hana", user.password) == ("bad_login",
                                                      "unknown handle or wrong password")
    assert request_failure(net, peer.set_password_hash("nobody", new_hash)).code == \
        "unknown_handle"
    for junk in ("", "plain text", "pbkdf2_sha256$0$AAAA$" + "A" * 43 + "=",
                 new_hash[:-2], "md5$1$AA==$" + "A" * 43 + "="):
        assert request_failure(net, peer.set_password_hash("hana", junk)).code == "bad_hash"
    assert net.login.accounts["hana"][0] == new_hash


@pytest.mark.parametrize("frame", [
    wire.SetMoved(req_id=1, handle="ivan", moved=True),
    wire.AccountsRequest(req_id=1, after="", limit=10),
    wire.SetPasswordHash(req_id=1, handle="ivan", password_hash="pbkdf2_sha256$1$AA==$x"),
])
def test_login_server_peer_requests_need_peer_authentication(frame):
    """SetMoved and AccountsRequest from an unauthenticated connection are refused (forbidden)."""
    net = LegacyNet(3).start()
    net.add_user("ivan")
    conn = net.raw(net.login_port)
    net.run(0.1)
    conn.send(frame)
    net.run(1)
    assert isinstance(conn.frames[0], wire.Challenge)
    assert [(f.code) for f in conn.frames[1:]] == ["forbidden"]
    assert conn.lost
    assert net.login.accounts["ivan"][1] is False
    assert net.login.accounts["ivan"][0].startswith("pbkdf2_sha256$10$")


def test_inject_message_older_than_the_retention_window_is_refused():
    """An injected ts_ms past the retention horizon is bad_message; history and feed unchanged."""
    net = LegacyNet(3, retention_seconds=60.0, sweep_interval=5.0).start()
    net.run_until(100.0)
    chat = net.chat_homed_at("sn0")
    members = ("alice", "bob")
    home = net.supernodes["sn0"]
    peer = net.peer("sn0")
    feed: list[Any] = []
    peer.subscribe(home.epoch, home.mem.feed.next_offset, 100, feed.append)
    horizon = home.now_ms() - 60_000
    inside = net.wait(peer.inject_message(cloud_message(chat, "inside", ts_ms=horizon + 1000),
                                          members))
    assert (inside.status, inside.value) == ("new", 1)
    net.run(0.1)
    history, offset, fed = home.history(chat), home.mem.feed.next_offset, len(feed)

    for guid, ts_ms in (("stale", horizon - 1), ("ancient", 1)):
        failure = request_failure(net, peer.inject_message(
            cloud_message(chat, guid, ts_ms=ts_ms), members))
        assert failure.code == "bad_message"
    net.run(1)
    assert home.history(chat) == history
    assert home.mem.feed.next_offset == offset
    assert len(feed) == fed


@pytest.mark.parametrize("case", ["guid", "chat_id", "sender", "other_member"])
def test_inject_message_with_a_control_character_in_an_id_is_refused(case):
    """A guid, chat_id or member holding a control character is bad_message; nothing appended."""
    net = LegacyNet(3).start()
    home = net.supernodes["sn0"]
    chat = net.chat_homed_at("sn0", prefix="room\x1f" if case == "chat_id" else "room")
    sender = "ali\x1fce" if case == "sender" else "alice"
    members = (sender, "bob\x00" if case == "other_member" else "bob")
    guid = "cloud\x1fguid" if case == "guid" else "cloud-guid"
    peer = net.peer("sn0")
    offset = home.mem.feed.next_offset
    failure = request_failure(net, peer.inject_message(
        cloud_message(chat, guid, sender=sender), members))
    assert failure.code == "bad_message"
    assert home.mem.chats == {}
    assert home.mem.feed.next_offset == offset
    # the connection stays usable for a well-formed message
    ok = net.wait(peer.inject_message(cloud_message(net.chat_homed_at("sn0"), "fine"),
                                      ("alice", "bob")))
    assert ok.status == "new"


def test_an_unanswered_request_times_out_instead_of_hanging():
    """A supernode that never answers (stuck, half-open) fails the request after the bound."""
    from twisted.internet import defer
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from legacy.peer import PeerConnection

    clock = Clock()
    peer = PeerConnection("p", b"secret-0123456789abcdef", clock=clock, request_timeout=30)
    peer.makeConnection(StringTransport())
    d = peer.fetch("chat", ["g1"])
    hosts = peer.host_cache()
    clock.advance(29)
    assert not d.called and not hosts.called
    clock.advance(2)
    failures = []
    d.addErrback(failures.append)
    hosts.addErrback(failures.append)
    assert [f.check(defer.TimeoutError) for f in failures] == [defer.TimeoutError] * 2
    assert peer._pending == {}


# ---------------------------------------------------------------- membership (issue 16)

def _feed(net: LegacyNet, sn: str) -> list[Any]:
    """Subscribe a fresh peer to *sn*'s feed from now on; the list fills as frames arrive."""
    home = net.supernodes[sn]
    frames: list[Any] = []
    net.peer(sn).subscribe(home.epoch, home.mem.feed.next_offset, 100, frames.append)
    return frames


def test_an_injected_message_never_changes_an_existing_chats_members():
    """An injected list other than the chat's changes nothing: no FeedChat, the chat keeps
    its list, and the message reaches only members of both lists."""
    net = LegacyNet(4).start()
    chat = net.chat_homed_at("sn1")
    alice, bob, carol = (net.add_user(h) for h in ("alice", "bob", "carol"))
    da, db, dc = net.device(alice), net.device(bob), net.device(carol)
    net.online(da, db, dc)
    da.send(chat, ("alice", "bob"), "legacy list: alice and bob")  # carol was removed
    net.run(1)
    home = net.supernodes["sn1"]
    feed = _feed(net, "sn1")
    peer = net.peer("sn1")
    ack = net.wait(peer.inject_message(cloud_message(chat, "cloud-1"),
                                       ("alice", "bob", "carol")))
    net.run(2)
    assert ack.status == "new"
    assert home.mem.chats[chat].members == ("alice", "bob")
    assert not [f for f in feed if isinstance(f, wire.FeedChat)]
    assert "cloud-1" in {m.guid for m in db.deliveries}
    assert "cloud-1" not in {m.guid for m in dc.deliveries}


def test_an_injected_message_creates_a_missing_chat_with_its_members_marked_with_its_origin():
    """A chat the home does not have is created with the injected list; its FeedChat carries
    the injector's origin (so the bridge does not mirror it back as a change)."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn0")
    feed = _feed(net, "sn0")
    net.wait(net.peer("sn0").inject_message(cloud_message(chat, "g"), ("alice", "bob")))
    net.run(1)
    [announced] = [f for f in feed if isinstance(f, wire.FeedChat)]
    assert (announced.members, announced.origin) == (("alice", "bob"), "cloud")
    assert net.supernodes["sn0"].mem.chats[chat].members == ("alice", "bob")


def test_inject_membership_applies_a_delta_and_announces_it():
    """InjectMembership removes and adds members of an existing chat, answers the count, and
    appends one FeedChat per change with the peer's origin; a no-op changes nothing."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn2")
    home = net.supernodes["sn2"]
    peer = net.peer("sn2")
    net.wait(peer.inject_message(cloud_message(chat, "g"), ("alice", "bob", "carol")))
    feed = _feed(net, "sn2")
    removed = net.wait(peer.inject_membership(chat, (), ("carol",), "cloud"))
    added = net.wait(peer.inject_membership(chat, ("dave",), (), "cloud"))
    again = net.wait(peer.inject_membership(chat, ("dave",), ("carol",), "cloud"))
    net.run(1)
    assert [(a.status, a.value) for a in (removed, added, again)] == [
        ("changed", 2), ("changed", 3), ("unchanged", 3)]
    assert home.mem.chats[chat].members == ("alice", "bob", "dave")
    assert [(f.members, f.origin) for f in feed if isinstance(f, wire.FeedChat)] == [
        (("alice", "bob"), "cloud"), (("alice", "bob", "dave"), "cloud")]


def test_inject_membership_creates_a_chat_only_with_two_or_more_members():
    """On a chat the home does not have, the delta's adds make it, if 2 or more remain."""
    net = LegacyNet(3).start()
    peer = net.peer("sn0")
    lone, pair = net.chat_homed_at("sn0", "lone"), net.chat_homed_at("sn0", "pair")
    assert net.wait(peer.inject_membership(lone, ("alice",), (), "cloud")).status == "no_chat"
    made = net.wait(peer.inject_membership(pair, ("alice", "bob"), ("carol",), "cloud"))
    assert (made.status, made.value) == ("changed", 2)
    chats = net.supernodes["sn0"].mem.chats
    assert lone not in chats and chats[pair].members == ("alice", "bob")


def test_a_member_a_peer_removed_is_not_added_back_by_a_legacy_clients_stale_list():
    """After a peer removed carol, a legacy client that still lists her does not bring her
    back (nor deliver to her); a peer adding her back lifts that."""
    net = LegacyNet(4).start()
    chat = net.chat_homed_at("sn1")
    alice, carol = net.add_user("alice"), net.add_user("carol")
    da, dc = net.device(alice), net.device(carol)
    net.online(da, dc)
    everyone = ("alice", "bob", "carol")
    da.send(chat, everyone, "before")
    net.run(1)
    peer = net.peer("sn1")
    net.wait(peer.inject_membership(chat, (), ("carol",), "cloud"))
    stale = da.send(chat, everyone, "after, from a stale list")
    net.run(1)
    home = net.supernodes["sn1"]
    assert home.mem.chats[chat].members == ("alice", "bob")
    assert stale not in {m.guid for m in dc.deliveries}
    net.wait(peer.inject_membership(chat, ("carol",), (), "cloud"))
    back = da.send(chat, everyone, "carol is back")
    net.run(1)
    assert home.mem.chats[chat].members == everyone
    assert back in {m.guid for m in dc.deliveries}


@pytest.mark.parametrize("add, remove, origin, chat_ok", [
    (("bob",), (), "legacy", True),            # a peer change must not claim to be legacy
    (("bob",), (), "", True),
    (("bob", "bob"), (), "cloud", True),       # not distinct
    ((), ("bob", "bob"), "cloud", True),
    (("bob",), ("bob",), "cloud", True),       # both added and removed
    (("",), (), "cloud", True),                # an empty handle
    (("bo\x1fb",), (), "cloud", True),         # a control character
    ((), ("bob\x00",), "cloud", True),
    (("bob",), (), "cloud", False),            # an empty chat id
])
def test_inject_membership_rejects_bad_requests_and_changes_nothing(add, remove, origin,
                                                                    chat_ok):
    """A malformed delta is bad_members: the chat's list and the feed stay as they were."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn0")
    home = net.supernodes["sn0"]
    peer = net.peer("sn0")
    net.wait(peer.inject_message(cloud_message(chat, "g"), ("alice", "carol")))
    offset = home.mem.feed.next_offset
    failure = request_failure(net, peer.inject_membership(chat if chat_ok else "", add, remove,
                                                          origin))
    assert failure.code == "bad_members"
    assert home.mem.chats[chat].members == ("alice", "carol")
    assert home.mem.chats[chat].removed == set()
    assert home.mem.feed.next_offset == offset


def test_inject_membership_past_the_member_limit_is_refused_and_changes_nothing():
    """A delta that would take a chat past MAX_MEMBERS is bad_members, nothing changed."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn0")
    home = net.supernodes["sn0"]
    peer = net.peer("sn0")
    crowd = tuple(f"u{i}" for i in range(wire.MAX_MEMBERS))
    net.wait(peer.inject_message(cloud_message(chat, "g", sender="u0"), crowd))
    offset = home.mem.feed.next_offset
    failure = request_failure(net, peer.inject_membership(chat, ("one-more",), ("u1x",),
                                                          "cloud"))
    assert failure.code == "bad_members"
    assert home.mem.chats[chat].members == crowd and home.mem.chats[chat].removed == set()
    assert home.mem.feed.next_offset == offset


def test_inject_membership_on_a_non_home_supernode_answers_not_home():
    """Only a chat's home changes its members."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn1")
    failure = request_failure(net, net.peer("sn0").inject_membership(chat, ("a", "b"), (),
                                                                     "cloud"))
    assert failure.code == "not_home"
    assert chat not in net.supernodes["sn1"].mem.chats


def test_digests_are_answered_from_the_chats_tree_after_appends_and_the_retention_sweep():
    """The home answers a DigestRequest from the chat's maintained tree, which the retention
    sweep keeps in step: the answer is a scan of what the history still holds."""
    net = LegacyNet(3, retention_seconds=20.0).start()
    chat = net.chat_homed_at("sn1")
    alice = net.device(net.add_user("alice"), at="sn0")
    bob = net.device(net.add_user("bob"), at="sn2")
    net.online(alice, bob)
    for i in range(8):
        alice.send(chat, ("alice", "bob"), f"message {i}")
        net.run(3)
    net.run(10)
    home = net.supernodes["sn1"]
    state = home.mem.chats[chat]
    assert 0 < len(state.history) < 8  # the sweep (every 10 s) dropped the oldest
    assert len(state.digests) == len(state.history)
    peer = net.peer("sn1")
    before = state.digests.work.nodes
    parts = net.wait(peer.digests(whole(chat), split_bits=4))
    assert parts == digest.split_digests(home.history(chat), whole(chat), 4)
    assert state.digests.work.nodes > before
