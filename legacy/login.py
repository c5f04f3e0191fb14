"""The legacy login server: accounts, signed expiring credentials and the host cache.

A client sends ``LoginRequest`` and gets a ``Credential`` (signed with the login secret that
supernodes share) plus a sample of supernode addresses, then the server closes the
connection. An account marked *moved* (its owner is ``cloud-only``) is refused with a clear
reason. Privileged peers (the bridge) may page through accounts, mark them moved, set an
account's password hash (a password recovered on the cloud stack) and read the host cache;
nothing but ``LoginRequest`` and ``PeerAuth`` is served before authentication.

Failed logins are limited per handle and per peer address (``legacy.ratelimit``): past the
budget a ``LoginRequest`` is refused with ``Error(code="rate_limited")`` before any password
work, and simulated clients back off on that code (``legacy.client``).
"""

from __future__ import annotations

import math
import random
from typing import Any

from prometheus_client import Counter
from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory

from legacy import auth, wire
from legacy.auth import Secrets
from legacy.framing import FrameProtocol, ProtocolViolation
from legacy.network import Network
from legacy.ratelimit import LoginLimiter, LoginLimits

LOGINS = Counter("legacy_logins_total", "Login attempts at the legacy login server, by result.",
                 ["result"])


class LoginServer(service.Service):
    name = "login"

    def __init__(self, *, network: Network, host: str, port: int, secrets: Secrets,
                 directory: dict[str, wire.SupernodeAddress], rng: random.Random,
                 credential_ttl: float = 24 * 3600.0, host_cache_size: int = 16,
                 login_limits: LoginLimits | None = None) -> None:
        self.network = network
        self.clock = network.clock
        self.host = host
        self.port = port
        self.secrets = secrets
        self.directory = directory
        self.rng = rng
        self.credential_ttl = credential_ttl
        self.host_cache_size = host_cache_size
        self.limiter = LoginLimiter(self.clock, login_limits)
        self.accounts: dict[str, list] = {}  # handle -> [password_hash, moved]
        self._port: Any = None
        self._conns: set[LoginProtocol] = set()

    def add_account(self, handle: str, password_hash: str) -> None:
        self.accounts[handle] = [password_hash, False]

    def set_moved(self, handle: str, moved: bool) -> bool:
        acct = self.accounts.get(handle)
        if acct is None:
            return False
        acct[1] = moved
        return True

    def set_password_hash(self, handle: str, password_hash: str) -> str | None:
        """Replace the handle's password hash; None, or why not (``unknown_handle``,
        ``bad_hash``: not the ``pbkdf2_sha256$...`` form, which would lock the user out)."""
        acct = self.accounts.get(handle)
        if acct is None:
            return "unknown_handle"
        if not auth.is_password_hash(password_hash):
            return "bad_hash"
        acct[0] = password_hash
        return None

    def startService(self) -> defer.Deferred:  # noqa: N802
        super().startService()
        d = self.network.listen(self.host, self.port,
                                Factory.forProtocol(lambda: LoginProtocol(self)))

        def listening(port: Any) -> Any:
            self._port = port
            self.port = port.getHost().port
            return port

        return d.addCallback(listening)

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        for c in list(self._conns):
            c.transport.abortConnection()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)

    def host_cache(self) -> list[wire.SupernodeAddress]:
        addrs = list(self.directory.values())
        if len(addrs) <= self.host_cache_size:
            return addrs
        return self.rng.sample(addrs, self.host_cache_size)

    def login(self, handle: str, password: str, address: str = "") -> Any:
        """A ``Credential`` frame, or ``(code, reason)`` when the login is refused.

        *address* is the peer's address, for the per-address budget of failed logins."""
        wait = self.limiter.attempt(handle, address)
        if wait > 0:
            LOGINS.labels(result="rate_limited").inc()
            return ("rate_limited", f"too many failed logins for this handle or address; "
                                    f"retry in {math.ceil(wait)} s")
        acct = self.accounts.get(handle)
        if acct is None or not auth.verify_password(password, acct[0]):
            LOGINS.labels(result="refused").inc()
            return ("bad_login", "unknown handle or wrong password")
        self.limiter.succeeded(handle, address)  # only failures spend the budget
        if acct[1]:
            LOGINS.labels(result="moved").inc()
            return ("moved", "this account moved to the cloud service; log in there")
        LOGINS.labels(result="ok").inc()
        expires = int((self.clock.seconds() + self.credential_ttl) * 1000)
        return wire.Credential(handle=handle, expires_ms=expires,
                               signature=auth.sign_credential(self.secrets.login_secret, handle,
                                                              expires),
                               supernodes=self.host_cache())


class LoginProtocol(FrameProtocol):
    def __init__(self, server: LoginServer) -> None:
        self.server = server
        self.nonce = b""
        self.peer = False

    def connectionMade(self) -> None:  # noqa: N802
        self.server._conns.add(self)
        self.nonce = self.server.rng.randbytes(16)
        self.send(wire.Challenge(nonce=self.nonce, server_id="login"))

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.server._conns.discard(self)

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        server = self.server
        if isinstance(f, wire.LoginRequest) and not self.peer:
            result = server.login(f.handle, f.password, self._address())
            if isinstance(result, tuple):
                self.reject(*result)
            else:
                self.send(result)
                self.transport.loseConnection()
        elif isinstance(f, wire.HostCacheRequest) and self.peer:
            self.send(wire.HostCache(supernodes=server.host_cache()))
        elif isinstance(f, wire.PeerAuth) and not self.peer:
            if f.role != "peer" or not auth.check_peer_proof(
                    server.secrets.peer_secret, self.nonce, f.role, f.name, f.proof):
                raise ProtocolViolation("bad_proof", "peer authentication failed")
            self.peer = True
            self.send(wire.Welcome(server_id="login", epoch=0))
        elif isinstance(f, wire.AccountsRequest) and self.peer:
            limit = min(f.limit or 100, 200)
            handles = sorted(h for h in server.accounts if h > f.after)
            page = [wire.AccountRecord(handle=h, password_hash=server.accounts[h][0],
                                       moved=server.accounts[h][1]) for h in handles[:limit]]
            self.send(wire.AccountsPage(req_id=f.req_id, accounts=page,
                                        done=len(handles) <= limit))
        elif isinstance(f, wire.SetPasswordHash) and self.peer:
            problem = server.set_password_hash(f.handle, f.password_hash)
            if problem is None:
                self.send(wire.Ack(req_id=f.req_id, status="ok", value=0))
            else:
                self.send(wire.RequestFailed(req_id=f.req_id, code=problem, reason=(
                    f"no account {f.handle!r}" if problem == "unknown_handle"
                    else "not a pbkdf2_sha256 password hash")))
        elif isinstance(f, wire.SetMoved) and self.peer:
            if server.set_moved(f.handle, f.moved):
                self.send(wire.Ack(req_id=f.req_id, status="ok", value=0))
            else:
                self.send(wire.RequestFailed(req_id=f.req_id, code="unknown_handle",
                                             reason=f"no account {f.handle!r}"))
        else:
            raise ProtocolViolation("forbidden", f"{type(f).__name__} is not allowed here")

    def _address(self) -> str:
        peer = self.transport.getPeer()
        return getattr(peer, "host", None) or str(peer)
