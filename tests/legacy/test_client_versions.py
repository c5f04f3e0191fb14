"""Client versions at the legacy login server, on the deterministic in-memory network: clients
report them, the server tallies them, and a minimum (for everyone or one cohort's handles)
refuses older clients with ``upgrade_required``, which a simulated client takes as final."""

from __future__ import annotations

import random
import struct

import pytest
from prometheus_client import REGISTRY

from legacy import versions, wire
from legacy.client import UserAccount
from legacy.login import MAX_COHORT_RULES
from legacy.peer import PeerRequestFailed
from legacy.sim import RunConfig, simulate
from tests.legacy.netfixture import LegacyNet


def refusals() -> float:
    return REGISTRY.get_sample_value("legacy_logins_total",
                                     {"result": "upgrade_required"}) or 0.0


@pytest.fixture
def net() -> LegacyNet:
    return LegacyNet(2).start()


def device(net: LegacyNet, handle: str, version: str | None, device_id: str = "d0"):
    """A device of *handle* (the account made on first use) that reports *version*."""
    user = (net.add_user(handle) if handle not in net.login.accounts
            else UserAccount(handle=handle, password=f"pw-{handle}"))
    dev = net.device(user, device_id)
    dev.version = version
    return dev


# -- versions ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "newer"), [
    ("8.0", "7.4", True), ("7.4", "7.4", True), ("7.4.0", "7.4", True), ("7.4", "7.4.1", False),
    ("10.0", "9.9", True), ("0", "7.1", False)])
def test_versions_compare_as_numbers(a, b, newer):
    """8.0 >= 7.4, 7.4.0 == 7.4, 10 > 9 (numbers, not text), 0 (none reported) < all."""
    assert versions.at_least(a, b) is newer


@pytest.mark.parametrize("bad", ["", "8.", ".8", "8.x", "v8", "1.2.3.4.5", "70000",
                                 "８.0", " 8.0", "-1"])
def test_bad_versions_are_refused_with_a_reason(bad):
    with pytest.raises(ValueError, match="bad version"):
        versions.parse_version(bad)


def test_a_spread_is_parsed_checked_and_drawn_by_weight():
    spread = versions.parse_spread("7.1:0.2, 7.4:0.5,08.0:0.3")
    assert spread.entries == (("7.1", 0.2), ("7.4", 0.5), ("8.0", 0.3))
    rng = random.Random(4)
    drawn = [spread.pick(rng) for _ in range(2000)]
    assert 0.15 < drawn.count("7.1") / 2000 < 0.25 and 0.45 < drawn.count("7.4") / 2000 < 0.55
    assert versions.parse_spread("8.0").entries == (("8.0", 1.0),)
    for bad, why in [("7.1:x", "bad weight"), ("7.1:-1", "bad weight"), ("7.1,7.1", "twice"),
                     ("7.1:0", "sum to zero"), ("seven", "bad version")]:
        with pytest.raises(ValueError, match=why):
            versions.parse_spread(bad)


# -- the login server ----------------------------------------------------------------------------

def test_below_the_minimum_gets_upgrade_required_and_stops_trying(net):
    """A device older than the minimum is refused with upgrade_required (naming the
    minimum), counted, enters its final state and never logs in again; one at the minimum and
    one newer log in; an old client that reports no version is held to it too."""
    net.login.set_min_version("", "7.4")
    before = refusals()
    old, at, new = (device(net, "old", "7.1"), device(net, "at", "7.4"),
                    device(net, "new", "8.0"))
    silent = device(net, "silent", None)
    net.online(at, new)
    old.start()
    silent.start()
    net.run(120)  # long enough for any retry loop to show
    assert old.state == silent.state == "upgrade_required"
    assert not old.want_online
    code, reason = old.last_error
    assert code == "upgrade_required" and "upgrade to version 7.4 or newer" in reason
    assert "it is 7.1" in reason and "reports no version" in silent.last_error[1]
    assert net.stats.login_upgrade_required == 2 and net.stats.login_refused == 0
    assert refusals() - before == 2  # one attempt each: no retries
    old.start()  # the user tries again with the same old client: nothing happens
    net.run(10)
    assert old.state == "upgrade_required" and refusals() - before == 2
    assert at.state == new.state == "online"


def test_a_cohort_rule_holds_only_its_members_and_the_highest_rule_wins(net):
    net.login.set_min_version("pilot", "8.0", ("p1",))
    net.login.set_min_version("", "7.0")
    assert net.login.required_version("p1") == "8.0"
    assert net.login.required_version("other") == "7.0"
    member, outsider = device(net, "p1", "7.4"), device(net, "other", "7.4")
    net.online(outsider)
    member.start()
    net.run(30)
    assert member.state == "upgrade_required" and "8.0" in member.last_error[1]
    net.login.set_min_version("", "9.0")  # everyone's rule is now the higher one for p1 too
    assert net.login.required_version("p1") == "9.0"


def test_clearing_a_rule_lets_the_old_clients_in_again(net):
    net.login.set_min_version("", "8.0")
    net.login.set_min_version("", "")
    assert net.login.min_versions == {}
    dev = device(net, "alice", "7.1")
    net.online(dev)


def test_rules_over_the_peer_protocol_and_the_tally(net):
    """A privileged peer sets, extends (append), reads and clears rules; the server answers
    bad rules with RequestFailed and changes nothing; the tally counts authenticated logins
    by version (0: none reported), handles by their latest login."""
    peer = net.login_peer()
    assert net.wait(peer.set_min_version("pilot", "8.0", ("a", "b"))).value == 2
    assert net.wait(peer.set_min_version("pilot", "8.0", ("c",), append=True)).value == 3
    for args, code in [(("pilot", "9.0", ("d",), True), "no_rule"),
                       (("", "8.0", ("a",)), "bad_rule")]:
        with pytest.raises(PeerRequestFailed) as info:
            net.wait(peer.set_min_version(*args))
        assert info.value.code == code
    assert net.login.min_versions == {"pilot": ("8.0", {"a", "b", "c"})}
    net.wait(peer.set_min_version("", "7.0"))
    d1, d2, d3 = device(net, "x", "7.4"), device(net, "y", "7.4"), device(net, "z", None)
    d1b = device(net, "x", "8.0", "d1")
    d3.start()
    net.online(d1, d2)
    net.online(d1b)
    net.run(5)
    reply = net.wait(peer.versions())
    assert [(v.version, v.logins, v.handles) for v in reply.versions] == [
        ("0", 1, 1), ("7.4", 2, 1), ("8.0", 1, 1)]
    assert [(r.cohort, r.version, r.handles) for r in reply.rules] == [
        ("", "7.0", 0), ("pilot", "8.0", 3)]
    net.wait(peer.set_min_version("pilot", ""))
    assert list(net.login.min_versions) == [""]


def test_cohort_rules_are_bounded(net):
    for i in range(MAX_COHORT_RULES):
        net.login.set_min_version(f"c{i}", "8.0", ("h",))
    net.login.set_min_version("", "7.0")  # everyone's rule is not a cohort rule
    with pytest.raises(ValueError, match="at most"):
        net.login.set_min_version("one-more", "8.0", ("h",))
    net.login.set_min_version("c0", "9.0", ("h",))  # replacing one is fine


def test_an_ordinary_client_may_not_set_rules(net):
    """SetMinVersion and VersionsRequest before peer authentication close the connection."""
    for f in (wire.SetMinVersion(req_id=1, cohort="", version="9.0", handles=(), append=False),
              wire.VersionsRequest(req_id=1)):
        raw = net.raw(net.login_port)
        raw.send(f)
        net.run(1)
        assert raw.lost and isinstance(raw.frames[-1], wire.Error)
        assert raw.frames[-1].code == "forbidden"
    assert net.login.min_versions == {}


def test_an_unparseable_reported_version_closes_that_connection_only(net):
    raw = net.raw(net.login_port)
    body = bytearray(wire.encode(wire.VersionedLoginRequest(handle="a", password="b",
                                                            client_version="7.4")))
    body[-3:] = b"7.x"  # the same length: only the version is bad
    raw.transport.write(struct.pack(">I", len(body)) + bytes(body))
    net.run(1)
    assert raw.lost and raw.frames[-1].code == "invalid"
    assert net.login.version_logins == {}
    net.online(device(net, "alice", "8.0"))


# -- the deterministic simulation ---------------------------------------------------------------

def test_simulation_with_versions_and_a_minimum_is_one_seed_one_trace():
    """Devices draw their versions from the seed: the same run twice is the same trace;
    with a minimum some are refused; without versions the trace is what it always was."""
    cfg = RunConfig(supernodes=3, users=30, rate=2.0, duration=20.0,
                    client_versions="7.1:0.3,8.0:0.7", min_version="7.4")
    a, b = simulate(cfg), simulate(cfg)
    assert a["trace_hash"] == b["trace_hash"]
    assert 0 < a["login_upgrade_required"] < 30
    plain = simulate(RunConfig(supernodes=3, users=30, rate=2.0, duration=20.0))
    versioned = simulate(RunConfig(supernodes=3, users=30, rate=2.0, duration=20.0,
                                   client_versions="8.0"))
    assert plain["login_upgrade_required"] == versioned["login_upgrade_required"] == 0
    assert plain["sent"] == versioned["sent"]  # the version stream draws nothing else


@pytest.mark.parametrize(("field", "value"), [("client_versions", "7.1:x"),
                                              ("min_version", "8.a")])
def test_bad_run_config_versions_are_refused(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
        RunConfig(**{field: value})
