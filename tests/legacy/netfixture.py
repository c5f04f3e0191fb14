"""A small legacy network on the deterministic in-memory runtime, wired by hand for tests.

``LegacyNet`` builds N supernodes and a login server over a ``MemoryNetwork`` driven by a
``SimClock`` (no hop faults, no traffic generator), so a test decides exactly who logs in
where and what is sent. ``RecordingDevice`` is the real client ``Device`` that also keeps,
in arrival order, every ``Deliver`` and ``SendAck`` it got, and can be pinned to one
supernode. ``wait`` runs the clock until a Deferred has a result.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Factory

from legacy import auth, wire
from legacy.auth import Secrets
from legacy.client import Device, TrafficStats, UserAccount
from legacy.faults import PRESETS, HopFaults
from legacy.framing import FrameProtocol
from legacy.login import LoginServer
from legacy.network import MemoryNetwork
from legacy.peer import PeerConnection, connect_peer
from legacy.ring import HashRing
from legacy.simclock import SimClock
from legacy.supernode import Supernode, SupernodeConfig
from legacy.trace import Trace

PEER_SECRET = b"test-peer-secret-0123456789"
LOGIN_SECRET = b"test-login-secret-0123456789"
HOST = "127.0.0.1"
BASE_PORT = 47100


def wait(clock: SimClock, d: defer.Deferred, timeout: float = 60.0) -> Any:
    """Run *clock* until *d* has a result (at most *timeout* simulated seconds); return it
    or raise its exception."""
    try:
        return clock.result_of(d, timeout)
    except TimeoutError:
        raise AssertionError(f"Deferred had no result after {timeout} simulated seconds"
                             ) from None


class RecordingDevice(Device):
    """A client device that records what reached it, optionally pinned to one supernode."""

    def __init__(self, *args: Any, pin: wire.SupernodeAddress | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pin = pin
        self.deliveries: list[wire.ChatMessage] = []
        self.acks: list[wire.SendAck] = []

    def _got_credential(self, cred: wire.Credential) -> None:
        if self.pin is not None:
            cred = attrs.evolve(cred, supernodes=(self.pin,))
        super()._got_credential(cred)

    def _acked(self, f: wire.SendAck) -> None:
        self.acks.append(f)
        super()._acked(f)

    def _delivered(self, msg: wire.ChatMessage) -> None:
        self.deliveries.append(msg)
        super()._delivered(msg)


class FrameRecorder(FrameProtocol):
    """A bare frame client: records every frame it gets and whether the connection closed."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.lost = False

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        self.frames.append(f)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost = True


class LegacyNet:
    """N supernodes ``sn0``..``sn{N-1}`` on ports BASE_PORT+i and a login server after them."""

    def __init__(self, supernodes: int = 4, *, seed: int = 1, **sn_config: Any) -> None:
        self.clock = SimClock()
        self.net = MemoryNetwork(self.clock)
        self.trace = Trace(self.clock)
        self.rng = random.Random(seed)
        self.secrets = Secrets(peer_secret=PEER_SECRET, login_secret=LOGIN_SECRET)
        self.stats = TrafficStats()
        ids = [f"sn{i}" for i in range(supernodes)]
        self.directory = {sn: wire.SupernodeAddress(sn_id=sn, host=HOST, port=BASE_PORT + i)
                          for i, sn in enumerate(ids)}
        self.ring = HashRing(ids)
        self.hop_faults = HopFaults(PRESETS["none"], random.Random(seed))
        self.supernodes = {
            sn: Supernode(SupernodeConfig(sn_id=sn, host=HOST, port=self.directory[sn].port,
                                          **sn_config),
                          network=self.net, ring=self.ring, directory=self.directory,
                          secrets=self.secrets, hop_faults=self.hop_faults, trace=self.trace,
                          rng=random.Random(self.rng.getrandbits(64)))
            for sn in ids}
        self.login_port = BASE_PORT + supernodes
        self.login = LoginServer(network=self.net, host=HOST, port=self.login_port,
                                 secrets=self.secrets, directory=self.directory,
                                 rng=random.Random(self.rng.getrandbits(64)))

    # -- lifecycle and time ----------------------------------------------------------------------

    def start(self) -> LegacyNet:
        for node in self.supernodes.values():
            node.startService()
        self.login.startService()
        self.clock.run_until(self.clock.seconds())
        return self

    def run(self, seconds: float) -> None:
        self.clock.run_until(self.clock.seconds() + seconds)

    def run_until(self, t: float) -> None:
        self.clock.run_until(t)

    def wait(self, d: defer.Deferred, timeout: float = 60.0) -> Any:
        return wait(self.clock, d, timeout)

    # -- choosing names that land where a test needs them ------------------------------------------

    def chat_homed_at(self, sn_id: str, prefix: str = "chat") -> str:
        return next(c for c in (f"{prefix}-{i}" for i in range(10_000))
                    if self.ring.home_of(c) == sn_id)

    def handle_indexed_at(self, sn_id: str, prefix: str = "user") -> str:
        return next(h for h in (f"{prefix}-{i}" for i in range(10_000))
                    if self.ring.index_owner(h) == sn_id)

    # -- users, devices and peers ----------------------------------------------------------------

    def add_user(self, handle: str, contacts: tuple = ()) -> UserAccount:
        password = f"pw-{handle}"
        self.login.add_account(handle, auth.hash_password(password, salt=handle.encode(),
                                                          iterations=10))
        return UserAccount(handle=handle, password=password, contacts=contacts)

    def device(self, user: UserAccount, device_id: str = "d0",
               at: str | None = None) -> RecordingDevice:
        """A device of *user*; *at* pins it to that supernode."""
        return RecordingDevice(user, device_id, network=self.net, login_host=HOST,
                               login_port=self.login_port,
                               rng=random.Random(self.rng.getrandbits(64)), stats=self.stats,
                               trace=self.trace, pin=self.directory[at] if at else None)

    def online(self, *devices: Device, timeout: float = 10.0) -> None:
        """Start *devices* and run the clock until every one of them is attached."""
        for dev in devices:
            dev.start()
        deadline = self.clock.seconds() + timeout
        while not all(d.state == "online" for d in devices):
            if self.clock.seconds() >= deadline:
                raise AssertionError("devices did not come online: "
                                     f"{[(d.user.handle, d.state) for d in devices]}")
            self.run(0.01)

    def peer(self, sn_id: str, *, secret: bytes = PEER_SECRET,
             name: str = "test-peer") -> PeerConnection:
        addr = self.directory[sn_id]
        return self.wait(connect_peer(self.net, addr.host, addr.port, name=name, secret=secret))

    def login_peer(self, *, secret: bytes = PEER_SECRET) -> PeerConnection:
        return self.wait(connect_peer(self.net, HOST, self.login_port, name="test-peer",
                                      secret=secret))

    def raw(self, port: int) -> FrameRecorder:
        """A bare connection to *port* that records the frames it gets."""
        return self.wait(self.net.connect(HOST, port, Factory.forProtocol(FrameRecorder)))
