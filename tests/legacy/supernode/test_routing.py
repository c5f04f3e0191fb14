"""Message routing, offline holds, presence and login on a hand-wired in-memory network."""

from __future__ import annotations

import attrs
import pytest

from legacy import wire
from tests.legacy.netfixture import LegacyNet


def seqs(messages: list[wire.ChatMessage], chat_id: str) -> list[int]:
    return [m.legacy_seq for m in messages if m.chat_id == chat_id]


def test_online_recipients_get_every_message_on_every_device_in_legacy_seq_order():
    """Each online recipient device gets every message of a chat once, in legacy_seq order."""
    net = LegacyNet(4).start()
    chats = [net.chat_homed_at("sn0"), net.chat_homed_at("sn1")]
    members = ("alice", "bob", "carol")
    users = {h: net.add_user(h) for h in members}
    alice = net.device(users["alice"], at="sn1")
    bob0 = net.device(users["bob"], "d0", at="sn2")
    bob1 = net.device(users["bob"], "d1", at="sn3")
    carol = net.device(users["carol"], at="sn0")
    devices = (alice, bob0, bob1, carol)
    net.online(*devices)
    net.run(1)  # let every attach reach the global index before routing depends on it

    sent = {}
    for burst in range(5):
        # burst 0 is sent in one instant from three supernodes; later bursts are spaced out
        for i, dev in enumerate((alice, bob0, carol, bob1, alice, carol)):
            chat = chats[(burst + i) % 2]
            sent[dev.send(chat, members, f"b{burst} m{i}")] = dev.user.handle
            net.run(0.0005 * burst)
    net.run(5)

    for chat in chats:
        history = net.supernodes[net.ring.home_of(chat)].history(chat)
        assert [m.legacy_seq for m in history] == list(range(1, len(history) + 1))
        for dev in devices:
            expected = [m.legacy_seq for m in history if m.sender != dev.user.handle]
            assert expected, "every device should have something to receive"
            assert seqs(dev.deliveries, chat) == expected, (dev.user.handle, dev.device_id)
    stored = {m.guid for chat in chats
              for m in net.supernodes[net.ring.home_of(chat)].history(chat)}
    assert stored == set(sent)


def test_sender_gets_send_ack_with_the_legacy_seq_the_home_assigned():
    """A sending device gets one SendAck per message carrying its home-assigned legacy_seq."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn2")
    members = ("alice", "bob")
    alice = net.device(net.add_user("alice"), at="sn0")
    bob = net.device(net.add_user("bob"), at="sn1")
    net.online(alice, bob)

    guids = [alice.send(chat, members, f"hello {i}") for i in range(4)]
    net.run(3)

    by_guid = {m.guid: m for m in net.supernodes["sn2"].history(chat)}
    assert [a.guid for a in alice.acks] == guids
    for ack in alice.acks:
        assert ack.chat_id == chat
        assert ack.legacy_seq == by_guid[ack.guid].legacy_seq
        assert ack.ts_ms == by_guid[ack.guid].ts_ms
    assert [a.legacy_seq for a in alice.acks] == [1, 2, 3, 4]
    assert alice.pending == {}


@pytest.mark.parametrize("how", ["never_logged_in", "logged_off"])
def test_offline_recipient_gets_held_messages_when_it_logs_in_elsewhere(how):
    """Messages for an offline user are held at the home SN and flushed to the SN it logs in at."""
    net = LegacyNet(4).start()
    chat = net.chat_homed_at("sn0")
    dave = net.handle_indexed_at("sn2", "dave")  # home sn0, index sn2, dave attaches at sn3
    members = ("erin", dave)
    erin = net.device(net.add_user("erin"), at="sn1")
    dave_dev = net.device(net.add_user(dave), at="sn3")
    net.online(erin)
    if how == "logged_off":
        net.online(dave_dev)
        dave_dev.stop()
        net.run(2)
        assert dave not in net.supernodes["sn3"].mem.sessions

    guids = [erin.send(chat, members, f"while away {i}") for i in range(3)]
    net.run(5)
    home = net.supernodes["sn0"]
    assert home.held_pairs() == {(g, dave) for g in guids}
    assert dave_dev.deliveries == []

    net.online(dave_dev)
    net.run(5)
    assert sorted(m.guid for m in dave_dev.deliveries) == sorted(guids)
    assert len(dave_dev.deliveries) == len(guids)
    assert home.held_count() == 0
    assert erin.deliveries == []  # the sender never gets its own messages back


def test_duplicate_send_of_one_guid_appends_once():
    """A client retry with the same GUID is acknowledged again but appended and delivered once."""
    net = LegacyNet(3).start()
    chat = net.chat_homed_at("sn1")
    members = ("alice", "bob")
    alice = net.device(net.add_user("alice"), at="sn0")
    bob = net.device(net.add_user("bob"), at="sn2")
    net.online(alice, bob)

    frame = wire.Send(guid="retry-guid-1", chat_id=chat, members=members, body="once")
    alice.proto.send(frame)
    net.run(0.5)
    alice.proto.send(frame)
    net.run(2)
    alice.send(chat, members, "next")
    net.run(2)

    history = net.supernodes["sn1"].history(chat)
    assert [(m.guid, m.legacy_seq) for m in history][0] == ("retry-guid-1", 1)
    assert [m.legacy_seq for m in history] == [1, 2]
    assert [(a.guid, a.legacy_seq) for a in alice.acks[:2]] == [("retry-guid-1", 1)] * 2
    assert [m.guid for m in bob.deliveries].count("retry-guid-1") == 1


def test_subscriber_sees_a_contact_come_online():
    """A device subscribed to a contact gets 'online' whether it subscribed before or after."""
    net = LegacyNet(4).start()
    x = net.handle_indexed_at("sn2", "xavier")
    early = net.device(net.add_user("early", contacts=(x,)), at="sn3")
    late = net.device(net.add_user("late", contacts=(x,)), at="sn0")
    x_dev = net.device(net.add_user(x), at="sn1")
    net.online(early)
    net.run(1)
    assert x not in early.presence
    net.online(x_dev)
    net.run(1)
    assert early.presence[x] == "online"
    net.online(late)
    net.run(1)
    assert late.presence[x] == "online"


def test_presence_of_a_contact_on_a_crashed_supernode_expires_after_the_ttl_not_before():
    """After the contact's SN crashes, subscribers keep 'online' until the TTL, then 'offline'."""
    ttl, refresh, sweep = 30.0, 10.0, 1.0
    net = LegacyNet(4, presence_ttl=ttl, refresh_interval=refresh,
                    sweep_interval=sweep).start()
    x = net.handle_indexed_at("sn2", "xavier")  # hub sn2, x at sn1, subscriber at sn3
    sub = net.device(net.add_user("sub", contacts=(x,)), at="sn3")
    x_dev = net.device(net.add_user(x), at="sn1")
    net.online(sub, x_dev)
    net.run_until(25.5)  # past two refreshes, so expiry is set by a refresh, not the login
    assert sub.presence[x] == "online"

    net.supernodes["sn1"].crash()
    x_dev.stop()  # the user does not come back elsewhere
    expires = net.supernodes["sn2"].mem.hub[x].expires_ms / 1000
    assert expires >= 20.0 + ttl

    net.run_until(expires - 0.5)
    assert sub.presence[x] == "online"
    net.run_until(expires + sweep + 0.5)
    assert sub.presence[x] == "offline"
    # the hub's own entry expired too: someone who starts watching now is told offline
    assert net.supernodes["sn2"].mem.hub[x].status == "offline"
    late = net.device(net.add_user("late", contacts=(x,)), at="sn0")
    net.online(late)
    net.run(1)
    assert late.presence[x] == "offline"


def test_presence_seen_through_a_crashed_hub_expires_after_its_ttl_not_before():
    """The hub crashes: the subscriber's supernode keeps what it saw until that expires (its
    sweep takes the newest expiry, not a stale one of an earlier refresh), then 'offline'."""
    ttl, refresh, sweep = 30.0, 10.0, 1.0
    net = LegacyNet(4, presence_ttl=ttl, refresh_interval=refresh,
                    sweep_interval=sweep).start()
    x = net.handle_indexed_at("sn2", "xavier")  # hub sn2, x at sn1, subscriber at sn3
    sub = net.device(net.add_user("sub", contacts=(x,)), at="sn3")
    net.online(sub, net.device(net.add_user(x), at="sn1"))
    net.run_until(45.5)  # refreshes fanned out since the login: older expiries went stale
    seen = net.supernodes["sn3"].mem.seen[x]
    assert seen.status == "online" and seen.expires_ms / 1000 > 45.5 + ttl / 2
    net.supernodes["sn2"].crash()
    expires = seen.expires_ms / 1000
    net.run_until(expires - 0.5)
    assert sub.presence[x] == "online"
    net.run_until(expires + sweep + 0.5)
    assert sub.presence[x] == "offline"
    assert net.supernodes["sn3"].mem.seen[x].status == "offline"


def test_login_server_refuses_a_wrong_password_with_bad_login():
    """A wrong password or an unknown handle is refused with Error bad_login; no session."""
    net = LegacyNet(3).start()
    user = net.add_user("frank")
    wrong = net.device(attrs.evolve(user, password="not-it"))
    unknown = net.device(attrs.evolve(user, handle="nobody"))
    for dev in (wrong, unknown):
        dev.start()
    net.run(3)
    for dev in (wrong, unknown):
        assert dev.last_error is not None and dev.last_error[0] == "bad_login"
        assert dev.state == "offline"
    assert all("frank" not in sn.mem.sessions for sn in net.supernodes.values())
    right = net.device(user)
    net.online(right)


def test_login_server_refuses_a_moved_account_with_moved():
    """An account marked moved is refused with Error moved, and accepted again once unmarked."""
    net = LegacyNet(3).start()
    user = net.add_user("gina")
    assert net.login.set_moved("gina", True)
    assert not net.login.set_moved("nobody", True)
    dev = net.device(user)
    dev.start()
    net.run(3)
    assert dev.last_error is not None and dev.last_error[0] == "moved"
    assert dev.state == "offline"
    assert net.login.set_moved("gina", False)
    net.online(net.device(user, "d1"))


def test_history_older_than_retention_is_pruned():
    """The home SN forgets messages older than retention_seconds, and only those."""
    net = LegacyNet(3, retention_seconds=60.0, sweep_interval=5.0).start()
    chat = net.chat_homed_at("sn0")
    members = ("alice", "bob")
    alice = net.device(net.add_user("alice"), at="sn1")
    net.online(alice)
    old = alice.send(chat, members, "old")
    net.run_until(30.0)
    new = alice.send(chat, members, "new")
    home = net.supernodes["sn0"]

    net.run_until(59.0)
    assert [m.guid for m in home.history(chat)] == [old, new]
    net.run_until(70.0)
    assert [m.guid for m in home.history(chat)] == [new]
    net.run_until(89.0)
    assert [m.guid for m in home.history(chat)] == [new]
    net.run_until(100.0)
    assert home.history(chat) == []


@pytest.mark.parametrize("first_off", ["sn0", "sn1"])
def test_a_user_online_on_two_supernodes_stays_online_until_its_last_device_logs_off(first_off):
    """A device logging off on one SN does not hide the user's device online on another SN."""
    net = LegacyNet(5, presence_ttl=30.0, refresh_interval=10.0, sweep_interval=1.0).start()
    x = net.handle_indexed_at("sn2", "xavier")  # hub sn2, x's devices at sn0 and sn1
    user = net.add_user(x)
    devices = {sn: net.device(user, f"d-{sn}", at=sn) for sn in ("sn0", "sn1")}
    sub = net.device(net.add_user("sub", contacts=(x,)), at="sn3")
    net.online(sub, *devices.values())
    net.run(1)
    assert sub.presence[x] == "online"
    hub = net.supernodes["sn2"]
    changes = hub.presence_changes

    devices[first_off].stop()
    for _ in range(100):  # 50 s: past the other device's refreshes and the logged-off TTL
        net.run(0.5)
        assert sub.presence[x] == "online"
    assert hub.mem.hub[x].status == "online"
    assert hub.presence_changes == changes
    late = net.device(net.add_user("late", contacts=(x,)), at="sn4")
    net.online(late)
    net.run(1)
    assert late.presence[x] == "online"

    last = next(dev for sn, dev in devices.items() if sn != first_off)
    last.stop()
    net.run(2)  # well inside the TTL of the last refresh: the log-off itself, not expiry
    assert sub.presence[x] == "offline"
    assert late.presence[x] == "offline"
