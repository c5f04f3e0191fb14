"""Failed logins at the legacy login server are limited per handle and per peer address.

Logins go through a real ``LoginProtocol`` on a ``StringTransport`` whose peer address the
test chooses (the memory network gives every client 127.0.0.1), against the ``LoginServer``
of a ``LegacyNet``; time is the net's ``SimClock``.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from prometheus_client import REGISTRY
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from legacy import auth, login, wire
from legacy.ratelimit import LoginLimits
from tests.legacy.netfixture import LegacyNet


def frames_in(data: bytes) -> list[Any]:
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(wire.decode(data[4:4 + n]))
        data = data[4 + n:]
    return out


def attempt(net: LegacyNet, handle: str, password: str, address: str = "10.0.0.1") -> Any:
    """One LoginRequest from *address*: the Credential, or the Error the server closed with."""
    transport = StringTransport(peerAddress=IPv4Address("TCP", address, 50000))
    proto = login.LoginProtocol(net.login)
    proto.makeConnection(transport)
    transport.clear()  # the Challenge
    body = wire.encode(wire.LoginRequest(handle=handle, password=password))
    proto.dataReceived(struct.pack(">I", len(body)) + body)
    (answer,) = frames_in(transport.value())
    assert transport.disconnecting  # either way, the login server closes the connection
    return answer


def code_of(answer: Any) -> str:
    return "ok" if isinstance(answer, wire.Credential) else answer.code


@pytest.fixture
def net() -> LegacyNet:
    net = LegacyNet(2).start()
    for handle in ("alice", "bob"):
        net.add_user(handle)
    return net


@pytest.fixture
def password_checks(monkeypatch) -> list[str]:
    """The handles whose password the login server checked (its expensive step)."""
    checked: list[str] = []
    verify = auth.verify_password

    def counting(password: str, encoded: str) -> bool:
        checked.append(password)
        return verify(password, encoded)

    monkeypatch.setattr(login.auth, "verify_password", counting)
    return checked


def logins_total(result: str) -> float:
    return REGISTRY.get_sample_value("legacy_logins_total", {"result": result}) or 0.0


def test_ten_failures_refuse_the_handle_as_rate_limited_without_password_work(
        net, password_checks):
    """After 10 wrong passwords even the right one is refused 'rate_limited', unchecked."""
    before = logins_total("rate_limited")
    assert [code_of(attempt(net, "alice", "wrong")) for _ in range(10)] == ["bad_login"] * 10
    checked = len(password_checks)
    refused = attempt(net, "alice", "pw-alice")
    assert isinstance(refused, wire.Error) and refused.code == "rate_limited"
    assert "retry in 6 s" in refused.reason  # 10 per minute: one try back every 6 s
    assert len(password_checks) == checked
    assert logins_total("rate_limited") == before + 1


def test_other_handles_and_addresses_are_unaffected(net):
    """A throttled handle does not stop other handles, from its address or another; its own
    budget holds whichever address it is tried from."""
    for _ in range(10):
        attempt(net, "alice", "wrong")
    assert code_of(attempt(net, "bob", "pw-bob")) == "ok"
    assert code_of(attempt(net, "bob", "pw-bob", address="10.9.9.9")) == "ok"
    assert code_of(attempt(net, "alice", "pw-alice", address="10.9.9.9")) == "rate_limited"


def test_the_handle_recovers_on_the_clock(net):
    """6 s after the tenth failure one try is back; after a minute all ten are."""
    for _ in range(10):
        attempt(net, "alice", "wrong")
    net.run(5.9)
    assert code_of(attempt(net, "alice", "pw-alice")) == "rate_limited"
    net.run(0.1)
    assert code_of(attempt(net, "alice", "pw-alice")) == "ok"
    net.run(60)
    assert [code_of(attempt(net, "alice", "wrong")) for _ in range(11)] == \
        ["bad_login"] * 10 + ["rate_limited"]


def test_thirty_failures_from_one_address_refuse_that_address(net):
    """30 failures over distinct handles from one address refuse it; other addresses log in."""
    codes = [code_of(attempt(net, f"guess-{i}", "x", address="10.6.6.6")) for i in range(30)]
    assert codes == ["bad_login"] * 30
    assert code_of(attempt(net, "alice", "pw-alice", address="10.6.6.6")) == "rate_limited"
    assert code_of(attempt(net, "alice", "pw-alice", address="10.7.7.7")) == "ok"


def test_successful_and_moved_logins_spend_nothing(net):
    """Right passwords never count, even 100 from one address, nor a 'moved' refusal."""
    assert {code_of(attempt(net, "alice", "pw-alice")) for _ in range(100)} == {"ok"}
    net.login.set_moved("bob", True)
    assert {code_of(attempt(net, "bob", "pw-bob")) for _ in range(20)} == {"moved"}
    assert len(net.login.limiter.handles) == 0 and len(net.login.limiter.addresses) == 0


def login_server(limits: LoginLimits) -> login.LoginServer:
    net = LegacyNet(1)
    return login.LoginServer(network=net.net, host="127.0.0.1", port=1, secrets=net.secrets,
                             directory=net.directory, rng=net.rng, login_limits=limits)


def test_a_flood_of_distinct_handles_keeps_memory_bounded():
    """50,000 failures over distinct handles and addresses keep at most max_keys buckets."""
    server = login_server(LoginLimits(max_keys=1000))
    for i in range(50_000):
        assert server.login(f"nobody-{i}", "x", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
                            )[0] == "bad_login"
    assert len(server.limiter.handles) == 1000
    assert len(server.limiter.addresses) == 1000


def test_limits_are_configurable():
    """A LoginServer takes its own LoginLimits (e.g. stricter ones)."""
    server = login_server(LoginLimits(per_handle=1))
    server.add_account("x", auth.hash_password("p", salt=b"s", iterations=1))
    assert server.login("x", "wrong", "a") == ("bad_login", "unknown handle or wrong password")
    assert server.login("x", "p", "a")[0] == "rate_limited"


# ---------------------------------------------------------------- the simulated client

def test_a_rate_limited_device_backs_off_then_comes_online(net):
    """A device refused 'rate_limited' keeps wanting to be online, waits at least 10 s
    between tries instead of hammering, and is attached once the handle recovers."""
    for _ in range(10):
        attempt(net, "alice", "wrong")
    seen: list[float] = []
    real_login = net.login.login

    def watched(*args: Any) -> Any:
        seen.append(net.clock.seconds())
        return real_login(*args)

    net.login.login = watched
    device = net.device(net.add_user("alice"))
    net.online(device, timeout=120)
    assert net.stats.login_rate_limited >= 1 and net.stats.login_refused == 0
    assert len(seen) == net.stats.login_rate_limited + 1
    assert all(b - a >= 10.0 for a, b in zip(seen, seen[1:], strict=False))
    assert device.last_error[0] == "rate_limited"


def test_a_wrong_password_is_still_final_for_a_device(net):
    """Only 'rate_limited' is retried: a bad password stops the simulated user."""
    from legacy.client import UserAccount

    device = net.device(UserAccount(handle="alice", password="not-hers"))
    device.start()
    net.run(120)
    assert device.state == "offline" and not device.want_online
    assert net.stats.login_refused == 1 and net.stats.login_rate_limited == 0


def test_login_server_serves_the_host_cache_only_to_peers(net):
    """HostCacheRequest is a peer frame: unauthenticated it is 'forbidden', as a peer it works."""
    conn = net.raw(net.login_port)
    net.run(0.1)
    conn.send(wire.HostCacheRequest())
    net.run(1)
    assert [type(f) for f in conn.frames] == [wire.Challenge, wire.Error]
    assert conn.frames[1].code == "forbidden" and conn.lost
    peer = net.login_peer()
    assert {a.sn_id for a in net.wait(peer.host_cache())} == {"sn0", "sn1"}
