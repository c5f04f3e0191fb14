"""Simulated legacy client devices and the tally of what they sent and received.

A device logs in at the login server, attaches to a supernode from the host cache it got,
subscribes to its contacts' presence and sends messages, retrying each until the home
supernode acknowledges it (same GUID, so a retry is never a second message). When its
supernode goes away it logs in again with backoff, as real clients did during outages. A
login refused as ``rate_limited`` is retried after a longer backoff (at least
``RATE_LIMITED_BACKOFF_S``); any other refusal (wrong password, moved) is final. A device
with a *version* reports it (``VersionedLoginRequest``); one refused as ``upgrade_required``
enters the state ``upgrade_required`` and stops trying: only a newer client would get in.

A device with ``late_reply_crash_s`` set has the bug of the 2010 client: the answer to its
login's offline-message request (``OfflineReply``, ``legacy.supernode.offline``) arriving
more than that after it attached crashes it. Its connection drops as in a crash (no clean
logout), and its user starts it again ``CRASH_RESTART_S`` later (spread by half), when it
logs in again and asks again.

    offline --start--> logging_in --Credential--> attaching --Welcome--> online
       ^  ^                 |                          |                 |  |
       |  +---- backoff ----+--------------------------+-- conn lost ----+  |
       +--- restart (CRASH_RESTART_S) <-- late OfflineReply: crash ---------+
                            |
                            +--upgrade_required--> upgrade_required (final)
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.internet.protocol import Factory

from legacy import wire
from legacy.framing import FrameProtocol, ProtocolViolation
from legacy.network import Network
from legacy.trace import Trace
from servicekit.retry import RetryPolicy

#: The shortest wait before a device retries a login the server refused as ``rate_limited``.
RATE_LIMITED_BACKOFF_S = 10.0
#: A device's wait before it logs in again: 2, 4, 8, 16, then 30 s, each spread by half
#: (``base * (0.5 + r)``, one draw of the device's rng, as the seeded traces expect).
RECONNECT_POLICY = RetryPolicy(initial_s=2.0, factor=2.0, cap_s=30.0, jitter=0.5,
                               jitter_mode="spread")
#: After a crash, the user starts the client again after this, spread by half (one draw).
CRASH_RESTART_S = 30.0


@attrs.define
class TrafficStats:
    """What the simulated clients saw; the run summary is computed from this."""

    sent: dict = attrs.Factory(dict)  # guid -> recipients (tuple of handles)
    acked: set = attrs.Factory(set)
    chat_of: dict = attrs.Factory(dict)  # guid -> chat id
    acked_at: dict = attrs.Factory(dict)  # guid -> clock seconds of the first SendAck
    delivered: set = attrs.Factory(set)  # (guid, recipient handle)
    gave_up: int = 0
    presence_notices: int = 0
    logins: int = 0
    login_refused: int = 0
    login_rate_limited: int = 0
    login_upgrade_required: int = 0
    #: crashes on a late offline-message answer (the 2010 client's bug)
    client_crashes: int = 0


@attrs.frozen
class UserAccount:
    handle: str
    password: str
    contacts: tuple = ()


class _LoginClient(FrameProtocol):
    def __init__(self, device: Device) -> None:
        self.device = device
        self.done = False

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        if isinstance(f, wire.Challenge):
            user, version = self.device.user, self.device.version
            if version is None:  # an old client: reports no version
                self.send(wire.LoginRequest(handle=user.handle, password=user.password))
            else:
                self.send(wire.VersionedLoginRequest(handle=user.handle,
                                                     password=user.password,
                                                     client_version=version))
        elif isinstance(f, wire.Credential):
            self.done = True
            self.device._got_credential(f)
        elif isinstance(f, wire.Error):
            self.done = True
            self.device._login_refused(f.code, f.reason)
        else:
            raise ProtocolViolation("unexpected", f"{type(f).__name__} from the login server")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.done:
            self.device._retry_later()


class _DeviceProtocol(FrameProtocol):
    def __init__(self, device: Device, credential: wire.Credential) -> None:
        self.device = device
        self.credential = credential

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        dev = self.device
        if isinstance(f, wire.Challenge):
            c = self.credential
            self.send(wire.ClientLogin(handle=c.handle, device=dev.device_id,
                                       expires_ms=c.expires_ms, signature=c.signature))
        elif isinstance(f, wire.Welcome):
            dev._attached(self)
        elif isinstance(f, wire.SendAck):
            dev._acked(f)
        elif isinstance(f, wire.Deliver):
            dev._delivered(f.message)
        elif isinstance(f, wire.PresenceNotice):
            dev.presence[f.handle] = f.status
            dev.stats.presence_notices += 1
        elif isinstance(f, wire.OfflineReply):
            dev._offline_reply(self)
        elif isinstance(f, wire.Error):
            dev.last_error = (f.code, f.reason)
        else:
            raise ProtocolViolation("unexpected", f"{type(f).__name__} sent to a client")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.device._detached(self)


class Device:
    """One device of one user. ``start``/``stop`` set what the user wants; the rest follows."""

    def __init__(self, user: UserAccount, device_id: str, *, network: Network,
                 login_host: str, login_port: int, rng: random.Random, stats: TrafficStats,
                 trace: Trace, ack_timeout: float = 5.0, max_attempts: int = 6,
                 version: str | None = None) -> None:
        """*version*: the client version it reports at login (None: reports none)."""
        self.user = user
        self.version = version
        self.device_id = device_id
        self.network = network
        self.clock = network.clock
        self.login_host = login_host
        self.login_port = login_port
        self.rng = rng
        self.stats = stats
        self.trace = trace
        self.ack_timeout = ack_timeout
        self.max_attempts = max_attempts
        self.state = "offline"
        self.want_online = False
        self.proto: _DeviceProtocol | None = None
        self.pending: dict[str, list] = {}  # guid -> [Send frame, attempts, timer]
        self.seen: set[str] = set()
        self.presence: dict[str, str] = {}
        self.failures = 0
        self.last_error: tuple[str, str] | None = None
        self._retry: Any = None
        #: the 2010 client's bug: an offline-message answer later than this after the device
        #: attached crashes it (None: a client without the bug)
        self.late_reply_crash_s: float | None = None
        self.attached_at = 0.0

    # -- what the user does --------------------------------------------------------------------

    def start(self) -> None:
        if self.state == "upgrade_required":
            return  # this client version can not log in any more
        self.want_online = True
        if self.state == "offline" and self._retry is None:
            self._login()

    def stop(self) -> None:
        self.want_online = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self.proto is not None:
            self.proto.transport.loseConnection()

    def send(self, chat_id: str, members: tuple, body: str) -> str:
        """Send a message; returns its GUID. Retried until acknowledged or given up."""
        guid = f"{self.rng.getrandbits(128):032x}"
        frame = wire.Send(guid=guid, chat_id=chat_id, members=members, body=body)
        self.stats.sent[guid] = tuple(m for m in members if m != self.user.handle)
        self.stats.chat_of[guid] = chat_id
        self.pending[guid] = [frame, 0, None]
        self._transmit(guid)
        return guid

    # -- sending ---------------------------------------------------------------------------------

    def _transmit(self, guid: str) -> None:
        entry = self.pending.get(guid)
        if entry is None:
            return
        if self.proto is None:
            return  # resent when the device is attached again
        entry[1] += 1
        self.proto.send(entry[0])
        entry[2] = self.clock.callLater(self.ack_timeout, self._ack_timeout, guid)

    def _ack_timeout(self, guid: str) -> None:
        entry = self.pending.get(guid)
        if entry is None:
            return
        entry[2] = None
        if entry[1] >= self.max_attempts:
            del self.pending[guid]
            self.stats.gave_up += 1
            self.trace.record("gave_up", self.user.handle, guid)
            return
        self._transmit(guid)

    def _acked(self, f: wire.SendAck) -> None:
        entry = self.pending.pop(f.guid, None)
        if entry is not None and entry[2] is not None and entry[2].active():
            entry[2].cancel()
        if f.guid not in self.stats.acked:
            self.stats.acked.add(f.guid)
            self.stats.acked_at[f.guid] = self.clock.seconds()

    def _delivered(self, msg: wire.ChatMessage) -> None:
        if msg.guid in self.seen:
            return
        self.seen.add(msg.guid)
        self.stats.delivered.add((msg.guid, self.user.handle))

    # -- connection lifecycle -------------------------------------------------------------------

    def _login(self) -> None:
        self.state = "logging_in"
        d = self.network.connect(self.login_host, self.login_port,
                                 Factory.forProtocol(lambda: _LoginClient(self)))
        d.addErrback(lambda _f: self._retry_later())

    def _login_refused(self, code: str, reason: str) -> None:
        self.last_error = (code, reason)
        self.state = "offline"
        if code == "rate_limited":
            # Not a verdict on the password: wait longer than usual, then try again.
            self.stats.login_rate_limited += 1
            self._retry_later(min_delay=RATE_LIMITED_BACKOFF_S)
            return
        self.want_online = False  # a refused login is final for a simulated user
        if code == "upgrade_required":
            # Not a retry: this client version is refused until the user upgrades.
            self.state = "upgrade_required"
            self.stats.login_upgrade_required += 1
            self.trace.record("upgrade_required", self.user.handle, self.device_id)
            return
        self.stats.login_refused += 1

    def _got_credential(self, cred: wire.Credential) -> None:
        self.stats.logins += 1
        if not self.want_online or not cred.supernodes:
            self.state = "offline"
            return
        self.state = "attaching"
        addr = cred.supernodes[self.rng.randrange(len(cred.supernodes))]
        d = self.network.connect(addr.host, addr.port,
                                 Factory.forProtocol(lambda: _DeviceProtocol(self, cred)))
        d.addErrback(lambda _f: self._retry_later())

    def _attached(self, proto: _DeviceProtocol) -> None:
        self.proto = proto
        self.state = "online"
        self.attached_at = self.clock.seconds()
        self.failures = 0
        self.trace.record("online", self.user.handle, self.device_id)
        if self.user.contacts:
            proto.send(wire.Subscribe(handles=self.user.contacts))
        for guid in list(self.pending):
            entry = self.pending[guid]
            if entry[2] is None:
                self._transmit(guid)
        if not self.want_online:
            proto.transport.loseConnection()

    def _detached(self, proto: _DeviceProtocol) -> None:
        if self.proto is proto:
            self.proto = None
        for entry in self.pending.values():
            if entry[2] is not None and entry[2].active():
                entry[2].cancel()
            entry[2] = None
        self.state = "offline"
        if self.want_online:
            self._retry_later()

    def _offline_reply(self, proto: _DeviceProtocol) -> None:
        limit = self.late_reply_crash_s
        if (limit is None or self.proto is not proto
                or self.clock.seconds() - self.attached_at <= limit):
            return
        # The crash: the process is gone at once (no logout), its user starts it again.
        self.stats.client_crashes += 1
        self.trace.record("client_crash", self.user.handle, self.device_id)
        self.proto = None
        self._retry_later(min_delay=CRASH_RESTART_S * (0.5 + self.rng.random()))
        proto.transport.abortConnection()

    def _retry_later(self, min_delay: float = 0.0) -> None:
        self.state = "offline"
        if not self.want_online or self._retry is not None:
            return
        self.failures += 1
        delay = max(RECONNECT_POLICY.delay(self.failures, self.rng), min_delay)
        self._retry = self.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.want_online and self.state == "offline":
            self._login()
