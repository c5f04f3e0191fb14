"""The legacy login server: accounts, signed expiring credentials and the host cache.

A client sends ``LoginRequest`` and gets a ``Credential`` (signed with the login secret that
supernodes share) plus a sample of supernode addresses, then the server closes the
connection. An account marked *moved* (its owner is ``cloud-only``) is refused with a clear
reason. Privileged peers (the bridge, bridgectl) may page through accounts, mark them moved,
set an account's password hash (a password recovered on the cloud stack), read the host
cache, and set and read the client-version rules; nothing but the two login requests and
``PeerAuth`` is served before authentication.

Failed logins are limited per handle and per peer address (``legacy.ratelimit``): past the
budget a ``LoginRequest`` is refused with ``Error(code="rate_limited")`` before any password
work, and simulated clients back off on that code (``legacy.client``).

Clients report their version (``VersionedLoginRequest``; the plain ``LoginRequest`` of an
old client counts as version ``0``). The server tallies the versions of authenticated logins
and holds minimum-version rules that privileged peers set (``SetMinVersion``): one for
everyone and one per named cohort (its handles). A login below the highest minimum that
applies to its handle is refused with ``Error(code="upgrade_required")`` naming that
minimum, and counted in ``legacy_logins_total{result="upgrade_required"}``. The rules live in
memory only: ``bridgectl legacy min-version`` keeps the durable copy in the cloud store and
sends it again after a restart (``--reapply``).
"""

from __future__ import annotations

import math
import random
from typing import Any

from prometheus_client import Counter
from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory

from legacy import auth, versions, wire
from legacy.auth import Secrets
from legacy.framing import FrameProtocol, ProtocolViolation
from legacy.network import Network
from legacy.ratelimit import LoginLimiter, LoginLimits

LOGINS = Counter("legacy_logins_total", "Login attempts at the legacy login server, by result.",
                 ["result"])
#: Distinct client versions tallied; a version first seen after this many is not counted.
MAX_TALLIED_VERSIONS = 200
#: Cohort rules held at once (the rule for everyone aside).
MAX_COHORT_RULES = 64


class RuleRefused(ValueError):
    """A ``SetMinVersion`` the server does not apply; *code* names why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


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
        #: cohort ("" for everyone) -> (minimum version, its handles; None for everyone)
        self.min_versions: dict[str, tuple[str, set[str] | None]] = {}
        self.version_logins: dict[str, int] = {}  # version -> authenticated logins
        self.last_version: dict[str, str] = {}  # handle -> version of its latest login
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

    def required_version(self, handle: str) -> str | None:
        """The highest minimum version that applies to *handle*, or None."""
        needed = None
        for version, handles in self.min_versions.values():
            if handles is None or handle in handles:
                if needed is None or not versions.at_least(needed, version):
                    needed = version
        return needed

    def set_min_version(self, cohort: str, version: str, handles: tuple = (),
                        append: bool = False) -> int:
        """Set (or with *version* "" clear) the minimum of *cohort* ("" for everyone);
        returns how many handles the rule holds now (0 for everyone or cleared).
        ``RuleRefused`` for a rule that can not be applied (nothing changes)."""
        if not version:
            self.min_versions.pop(cohort, None)
            return 0
        version = versions.normalize(version)
        if not cohort:
            if handles or append:
                raise RuleRefused("bad_rule", "the rule for everyone names no handles")
            self.min_versions[""] = (version, None)
            return 0
        if append:
            held = self.min_versions.get(cohort)
            if held is None or held[0] != version:
                raise RuleRefused("no_rule", f"no rule {version} for cohort {cohort!r} to "
                                             "add handles to")
            held[1].update(handles)  # type: ignore[union-attr]
            return len(held[1])  # type: ignore[arg-type]
        if cohort not in self.min_versions and sum(
                1 for c in self.min_versions if c) >= MAX_COHORT_RULES:
            raise RuleRefused("too_many_rules", f"at most {MAX_COHORT_RULES} cohort rules")
        self.min_versions[cohort] = (version, set(handles))
        return len(handles)

    def versions_reply(self, req_id: int) -> wire.VersionsReply:
        """The version tally (logins, and handles whose latest login reported it) and the
        rules, oldest version first."""
        handles: dict[str, int] = {}
        for v in self.last_version.values():
            handles[v] = handles.get(v, 0) + 1
        order = sorted(self.version_logins, key=versions.parse_version)
        return wire.VersionsReply(
            req_id=req_id,
            versions=[wire.VersionCount(version=v, logins=self.version_logins[v],
                                        handles=handles.get(v, 0)) for v in order],
            rules=[wire.MinVersionRule(cohort=c, version=v,
                                       handles=0 if hs is None else len(hs))
                   for c, (v, hs) in sorted(self.min_versions.items())])

    def _tally(self, handle: str, version: str) -> None:
        if version in self.version_logins or len(self.version_logins) < MAX_TALLIED_VERSIONS:
            self.version_logins[version] = self.version_logins.get(version, 0) + 1
            self.last_version[handle] = version

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

    def login(self, handle: str, password: str, address: str = "",
              client_version: str = versions.UNKNOWN) -> Any:
        """A ``Credential`` frame, or ``(code, reason)`` when the login is refused.

        *address* is the peer's address, for the per-address budget of failed logins;
        *client_version* what the client reported (``0``: nothing)."""
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
        version = versions.normalize(client_version)
        self._tally(handle, version)
        needed = self.required_version(handle)
        if needed is not None and not versions.at_least(version, needed):
            LOGINS.labels(result="upgrade_required").inc()
            told = "reports no version" if version == versions.UNKNOWN else f"is {version}"
            return ("upgrade_required", f"this client version is no longer supported (it "
                                        f"{told}); upgrade to version {needed} or newer")
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
        if isinstance(f, (wire.LoginRequest, wire.VersionedLoginRequest)) and not self.peer:
            result = server.login(f.handle, f.password, self._address(),
                                  getattr(f, "client_version", versions.UNKNOWN))
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
        elif isinstance(f, wire.SetMinVersion) and self.peer:
            try:
                held = server.set_min_version(f.cohort, f.version, f.handles, f.append)
            except RuleRefused as e:
                self.send(wire.RequestFailed(req_id=f.req_id, code=e.code, reason=str(e)))
            else:
                self.send(wire.Ack(req_id=f.req_id, status="ok", value=held))
        elif isinstance(f, wire.VersionsRequest) and self.peer:
            self.send(server.versions_reply(f.req_id))
        else:
            raise ProtocolViolation("forbidden", f"{type(f).__name__} is not allowed here")

    def _address(self) -> str:
        peer = self.transport.getPeer()
        return getattr(peer, "host", None) or str(peer)
