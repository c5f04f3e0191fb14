"""Every legacy network surface fuzzed over the in-memory network: supernodes and the login
server, unauthenticated and in each authenticated role.

``test_hostile_input`` feeds bytes straight into one server protocol; here the hostile bytes
travel over a ``MemoryNetwork`` of a ``LegacyNet`` (two supernodes and the login server on a
``SimClock``), as a remote attacker's would. A supernode serves clients, supernodes and
privileged peers on one port, the role decided by authentication, so "the client port" and
"the privileged peer port" are that one port in each role. For every example:

* nothing escapes into the clock (an exception there fails the test), no frame handler
  fails (no ``internal`` refusal, no logged failure);
* a connection that got an ``Error`` frame is closed, with the code the input deserves;
* unauthenticated input changes no state: chats, histories, feeds, the global index,
  presence, sessions, held messages, accounts;
* afterwards a well-behaved device still logs in and gets its message acknowledged.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Factory

from legacy import auth, wire
from legacy.framing import FrameProtocol
from tests.legacy.netfixture import HOST, LOGIN_SECRET, PEER_SECRET, LegacyNet
from tests.legacy.supernode.test_hostile_input import expected_code, framed, rejected_total
from tests.strategies import frames, frames_of, utf8_text

fuzz_settings = settings(max_examples=300, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.function_scoped_fixture])

#: Codes a refusal may carry after authentication: a frame of another role is "forbidden".
CLIENT_CODES = {"not_member", "bad_members", "bad_send", "bad_status", "too_long", "forbidden"}
PEER_CODES = {"no_subscription", "forbidden", "bad_subscribe"}


class HostileConnection(FrameProtocol):
    """Authenticates as *role* (``none``: not at all), then writes *payload* as raw bytes;
    records every frame it gets and whether the connection closed."""

    def __init__(self, role: str, payload: bytes) -> None:
        self.role = role
        self.payload = payload
        self.frames: list[Any] = []
        self.lost = False
        self.sent = False

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        self.frames.append(f)
        if isinstance(f, wire.Challenge):
            if self.role == "client":
                expires = 10**12
                self.send(wire.ClientLogin(handle="mallory", device="m1", expires_ms=expires,
                                           signature=auth.sign_credential(
                                               LOGIN_SECRET, "mallory", expires)))
            elif self.role == "peer":
                self.send(wire.PeerAuth(role="peer", name="fuzzer", proof=auth.peer_proof(
                    PEER_SECRET, f.nonce, "peer", "fuzzer")))
            else:
                self._attack()
        elif isinstance(f, wire.Welcome):
            self._attack()

    def _attack(self) -> None:
        if not self.sent:
            self.sent = True
            self.transport.write(self.payload)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost = True

    @property
    def errors(self) -> list[str]:
        return [f.code for f in self.frames if isinstance(f, wire.Error)]


def state(net: LegacyNet) -> tuple:
    """Everything hostile input could change on the legacy side."""
    nodes = []
    for sn_id, sn in sorted(net.supernodes.items()):
        m = sn.mem
        nodes.append((sn_id, sn.epoch, m.feed.next_offset,
                      {c: (ch.members, ch.next_seq, tuple(ch.history.values()))
                       for c, ch in m.chats.items()},
                      repr(m.index), repr(m.held), repr(m.held_notes), repr(m.hub),
                      repr(m.hub_sources), repr(m.hub_subscribers), sorted(m.sessions),
                      repr(m.local_status), repr({h: w for h, w in m.watchers.items() if w}),
                      len(m.feed_subs)))
    accounts = {h: tuple(a) for h, a in net.login.accounts.items()}
    return tuple(nodes), accounts


def attack(net: LegacyNet, port: int, role: str, payload: bytes) -> HostileConnection:
    """Open a connection to *port*, authenticate as *role*, send *payload*, run 5 s."""
    conn = HostileConnection(role, payload)
    net.wait(net.net.connect(HOST, port, Factory.forProtocol(lambda: conn)))
    net.run(5)
    assert conn.sent, conn.frames  # authentication worked, so the payload did go out
    return conn


def assert_still_serves(net: LegacyNet, n: int) -> None:
    """A well-behaved device logs in and its message is acknowledged."""
    alice = net.device(net.add_user(f"probe-{n}"), at="sn0")
    net.online(alice)
    guid = alice.send("probe-chat", (f"probe-{n}", "friend"), "still there?")
    net.run(2)
    assert guid in net.stats.acked
    alice.stop()
    net.run(1)


def build_net() -> LegacyNet:
    net = LegacyNet(2).start()
    net.add_user("alice")
    net.add_user("mallory")
    return net


def check_refusal(conn: HostileConnection, expected: str | None, allowed: set[str]) -> None:
    assert "internal" not in conn.errors
    if conn.errors:
        assert conn.lost, "an Error frame is fatal: the connection must be closed"
        assert len(conn.errors) == 1
        event(f"refused {conn.errors[0]}")
    if expected is not None:
        assert conn.errors == [expected] and conn.lost
    else:
        assert set(conn.errors) <= allowed, conn.errors


# ---------------------------------------------------------------- supernodes

def frames_for(classes: tuple) -> st.SearchStrategy[bytes]:
    """A few frames of *classes*, each framed, concatenated."""
    return st.lists(st.one_of([frames_of(c) for c in classes]), min_size=1, max_size=4).map(
        lambda fs: b"".join(framed(wire.encode(f)) for f in fs))


def payloads(role_frames: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Hostile bytes, each kind about equally often (a plain one_of would mostly draw frames,
    the widest branch): garbage, garbage in a frame, a bad header, an oversized length, any
    frame, and frames this role may send."""
    kinds = {
        "garbage": st.binary(min_size=1, max_size=300),
        "framed garbage": st.binary(max_size=300).map(framed),
        "bad header": st.tuples(st.sampled_from([0, 1, 2, 255]), st.integers(0, 255),
                                st.binary(max_size=300)).map(
            lambda t: framed(bytes(t[:2]) + t[2])),
        "oversized": st.tuples(st.integers(wire.MAX_FRAME_BYTES + 1, 2**32 - 1),
                               st.binary(max_size=20)).map(
            lambda t: struct.pack(">I", t[0]) + t[1]),
        "any frame": frames().map(lambda f: framed(wire.encode(f))),
        "role frames": role_frames,
    }
    return st.sampled_from(sorted(kinds)).flatmap(
        lambda kind: kinds[kind].map(lambda data: (kind, data)))


supernode_attacks = st.one_of(
    st.tuples(st.just("none"), payloads(frames_for((wire.ClientLogin, wire.PeerAuth)))),
    st.tuples(st.just("client"), payloads(frames_for(wire.CLIENT_FRAMES))),
    st.tuples(st.just("peer"), payloads(frames_for(wire.PEER_FRAMES))),
)


@fuzz_settings
@given(supernode_attacks)
def test_supernode_survives_hostile_input_in_every_role(failures, attack_):
    """Random bytes or hostile frames, unauthenticated or as a client or a peer: no handler
    fails, an Error closes the connection, unauthenticated input changes nothing, and a
    well-behaved device is served afterwards."""
    role, (kind, payload) = attack_
    event(f"{role}: {kind}")
    net = build_net()
    internal = rejected_total("internal")
    before = state(net)
    conn = attack(net, net.directory["sn0"].port, role, payload)
    if role == "none":
        check_refusal(conn, expected_code(payload), set())
        assert state(net) == before
    elif role == "client":
        check_refusal(conn, _decoded_refusal(payload), CLIENT_CODES)
    else:
        check_refusal(conn, _decoded_refusal(payload), PEER_CODES)
    assert rejected_total("internal") == internal
    assert failures == []
    assert_still_serves(net, 0)


def _decoded_refusal(data: bytes) -> str | None:
    """The code the first undecodable frame in *data* must be refused with, if it comes
    before anything else could be refused (None: decide by what the frames mean)."""
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        if n > wire.MAX_FRAME_BYTES:
            return "too_large"
        if len(data) < 4 + n:
            return None
        try:
            wire.decode(data[4:4 + n])
        except wire.WireError as e:
            return e.code
        return None  # a frame that decodes: what it does depends on the role and the state
    return None


# ---------------------------------------------------------------- the login server

login_frames = st.one_of(
    st.builds(wire.LoginRequest, handle=st.one_of(st.sampled_from(["alice", "mallory", ""]),
                                                  utf8_text(wire.MAX_NAME_BYTES)),
              password=utf8_text(wire.MAX_NAME_BYTES)),
    frames_of(wire.PeerAuth), frames_of(wire.HostCacheRequest), frames_of(wire.AccountsRequest),
    frames_of(wire.SetMoved), frames_of(wire.SetPasswordHash))


def expected_login_code(data: bytes) -> str | None:
    """What an unauthenticated login server connection must be closed with after *data*."""
    code = _decoded_refusal(data)
    if code is not None or len(data) < 4:
        return code
    (n,) = struct.unpack(">I", data[:4])
    if len(data) < 4 + n:
        return None
    f = wire.decode(data[4:4 + n])
    if isinstance(f, (wire.LoginRequest, wire.VersionedLoginRequest)):
        return None  # bad_login or rate_limited (checked below), or a Credential
    if isinstance(f, wire.PeerAuth):
        return "bad_proof"  # garbage never carries a valid proof
    return "forbidden"


login_attacks = st.one_of(
    st.tuples(st.just("none"), payloads(st.lists(login_frames, min_size=1, max_size=3).map(
        lambda fs: b"".join(framed(wire.encode(f)) for f in fs)))),
    st.tuples(st.just("peer"), payloads(frames_for(
        (wire.AccountsRequest, wire.SetMoved, wire.SetPasswordHash,
         wire.HostCacheRequest)))),
)


@fuzz_settings
@given(login_attacks)
# a peer's valid SetMinVersion for everyone (found by this test): the probe must still log in
@example(("peer", ("any frame", framed(wire.encode(wire.SetMinVersion(
    req_id=1, cohort="", version="1", handles=(), append=False))))))
# a VersionedLoginRequest with a wrong password (found by this test): a login, refused as one
@example(("none", ("any frame", framed(wire.encode(wire.VersionedLoginRequest(
    handle="x", password="0", client_version="1.0"))))))
def test_login_server_survives_hostile_input(failures, attack_):
    """Random bytes or hostile frames at the login server, unauthenticated or as a peer: no
    handler fails, an Error closes the connection, unauthenticated input changes no account,
    and a well-behaved device still logs in afterwards."""
    role, (kind, payload) = attack_
    event(f"{role}: {kind}")
    net = build_net()
    internal = rejected_total("internal")
    before = state(net)
    conn = attack(net, net.login_port, role, payload)
    if role == "none":
        check_refusal(conn, expected_login_code(payload), {"bad_login", "rate_limited"})
        assert state(net) == before
    else:
        check_refusal(conn, _decoded_refusal(payload), {"forbidden"})
        # A privileged peer may set a minimum client version (a valid SetMinVersion, which
        # "any frame" draws): the probe's refusal as upgrade_required would then be the rule
        # applied, not a server that stopped serving (found by this test). The rules go, as
        # the peer's clearing them would, before the probe.
        net.login.min_versions.clear()
    assert rejected_total("internal") == internal
    assert failures == []
    assert_still_serves(net, 0)
