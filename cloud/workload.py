"""A simulated cloud-client workload: devices that log in, post, sync, keep presence and
acknowledge notifications, over the real HTTP API.

    provision()  ->  accounts with passwords, conversations      (store, directly)
    CloudWorkload(Service)                                        (reactor, HTTP)
      +-- CloudDevice x N:  login -> [post (Poisson) | long-poll -> sync + ack | presence]

Used by tests, the demo and the benchmarks. Time and I/O are injected: the devices get a
clock and a ``CloudHTTP`` (``AgentHTTP`` over TCP in real runs). Every device keeps its own
record of what the API acknowledged, so a run can be checked against the store afterwards.
"""

from __future__ import annotations

import json
import random
import uuid
from typing import Any, Protocol

import attrs
import psycopg
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from cloud import passwords
from cloud.model import Account
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from servicekit.sleep import Sleeper

log = Logger()

#: PBKDF2 cost for simulated accounts: real accounts use the library default.
SIM_PASSWORD_ITERATIONS = 1_000


class CloudHTTP(Protocol):
    def request(self, method: str, path: str, body: Any = None,
                token: str | None = None, timeout_s: float | None = None) -> defer.Deferred:
        """Fires with ``(status, json_body)``; errbacks on connection failure."""


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred:  # noqa: N802 - interface
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802 - interface
        pass

    def resumeProducing(self) -> None:  # noqa: N802 - interface
        pass

    def stopProducing(self) -> None:  # noqa: N802 - interface
        pass


class AgentHTTP:
    """``CloudHTTP`` over real TCP with Twisted's Agent and persistent connections."""

    def __init__(self, reactor: Any, base_url: str, max_connections: int = 64) -> None:
        self._reactor = reactor
        self._base = base_url.rstrip("/").encode()
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_connections
        self._agent = Agent(reactor, connectTimeout=5, pool=self._pool)

    async def _request(self, method: str, path: str, body: Any, token: str | None,
                       timeout_s: float | None) -> tuple[int, Any]:
        headers = Headers({b"accept": [b"application/json"]})
        if token is not None:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
        producer = None
        if body is not None:
            headers.addRawHeader(b"content-type", b"application/json")
            producer = _BytesProducer(json.dumps(body).encode())
        d = self._agent.request(method.encode(), self._base + path.encode(), headers, producer)
        if timeout_s is not None:
            d.addTimeout(timeout_s, self._reactor)
        response = await d
        raw = await readBody(response)
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = {"error": {"code": "not_json", "message": raw[:200].decode("latin-1")}}
        return response.code, payload

    def request(self, method: str, path: str, body: Any = None,
                token: str | None = None, timeout_s: float | None = None) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            self._request(method, path, body, token, timeout_s))

    def close(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()


@attrs.frozen
class Population:
    """Who the simulated cloud users are: handles, ids, one shared password, chats."""

    accounts: tuple[tuple[str, uuid.UUID], ...]
    conversations: tuple[tuple[uuid.UUID, tuple[uuid.UUID, ...]], ...]
    password: str


def provision(conn: psycopg.Connection, *, users: int, conversations: int, seed: int,
              phase: str = "cloud-only", prefix: str = "cloud",
              password: str = "correct horse battery staple",
              members: tuple[int, int] = (2, 6)) -> Population:
    """Create *users* accounts and *conversations* chats of 2-6 of them, in one transaction.

    Idempotent for the same arguments: account and conversation ids derive from the seed and
    prefix, so a second call finds everything in place.
    """
    if users < 2:
        raise ValueError("a workload needs at least 2 users")
    rng = random.Random(seed)
    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"bridge-workload/{prefix}/{seed}")
    hashed = passwords.hash_password(password, salt=ns.bytes,
                                     iterations=SIM_PASSWORD_ITERATIONS)
    accounts = tuple((f"{prefix}-{i}", uuid.uuid5(ns, f"account/{i}")) for i in range(users))
    chats = []
    with conn.transaction():
        for handle, account_id in accounts:
            accounts_store.create_account(conn, Account(account_id, handle, phase), hashed)
        for c in range(conversations):
            size = min(users, rng.randint(*members))
            picked = tuple(a for _, a in rng.sample(accounts, size))
            cid = uuid.uuid5(ns, f"conversation/{c}")
            conversations_store.create_conversation(conn, cid, picked, title=f"{prefix} chat {c}")
            chats.append((cid, picked))
    return Population(accounts, tuple(chats), password)


@attrs.frozen
class WorkloadConfig:
    rate: float = 5.0                 # messages per second over all devices
    presence_ttl_s: float = 60.0
    longpoll_s: float = 20.0
    retry_s: float = 2.0

    def __attrs_post_init__(self) -> None:
        if not self.rate >= 0:
            raise ValueError("rate must not be negative")
        if not 0 < self.presence_ttl_s <= 3600 or not 0 <= self.longpoll_s <= 30:
            raise ValueError("presence_ttl_s must be in (0, 3600], longpoll_s in [0, 30]")


@attrs.define
class WorkloadStats:
    """What the API acknowledged to the devices, to check against the store afterwards."""

    posted: dict[str, tuple[str, int]] = attrs.Factory(dict)  # client id -> (conv, seq)
    post_errors: int = 0
    notifications_seen: set[str] = attrs.Factory(set)
    acked: set[str] = attrs.Factory(set)
    synced_messages: int = 0
    logins: int = 0
    errors: dict[str, int] = attrs.Factory(dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self) -> dict:
        return {"posted": len(self.posted), "post_errors": self.post_errors,
                "notifications_seen": len(self.notifications_seen),
                "notifications_acked": len(self.acked),
                "synced_messages": self.synced_messages, "logins": self.logins,
                "errors": dict(self.errors)}


class CloudDevice(Service):
    """One device of one user: logs in, then keeps a notification long-poll open, syncs
    what it is told about, acknowledges, refreshes presence, and posts when asked."""

    def __init__(self, clock: IReactorTime, http: CloudHTTP, handle: str, password: str,
                 conversations: list[uuid.UUID], rng: random.Random, config: WorkloadConfig,
                 stats: WorkloadStats) -> None:
        self.setName(handle)
        self._clock, self._http, self._rng = clock, http, rng
        self.handle, self._password = handle, password
        self._conversations = conversations
        self._config, self._stats = config, stats
        self.token: str | None = None
        self._cursors: dict[str, int] = {}
        self._running: defer.Deferred | None = None
        self._delayed: list[Any] = []  # presence refreshes
        self._sleeper = Sleeper(clock)  # retry pauses, which a stop cancels
        self._posts = 0

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._running = defer.Deferred.fromCoroutine(self._main())
        self._running.addErrback(lambda f: log.failure("device {h} stopped", f, h=self.handle))

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        for call in self._delayed:
            if call.active():
                call.cancel()
        self._sleeper.cancel()
        running, self._running = self._running, None
        if running is not None:
            running.cancel()
        return defer.succeed(None)

    async def _login(self) -> None:
        while self.running:
            try:
                status, body = await self._http.request(
                    "POST", "/v1/login", {"handle": self.handle, "password": self._password})
            except defer.CancelledError:
                raise
            except Exception:
                self._stats.error("login_connection")
                await self._sleeper.sleep(self._config.retry_s)
                continue
            if status == 200:
                self.token = body["token"]
                self._stats.logins += 1
                return
            self._stats.error(f"login_{status}")
            await self._sleeper.sleep(self._config.retry_s)

    async def _main(self) -> None:
        await self._login()
        self._delayed.append(self._clock.callLater(0, self._presence_loop))
        while self.running:
            try:
                status, body = await self._http.request(
                    "GET", f"/v1/notifications?timeout={self._config.longpoll_s:g}",
                    token=self.token, timeout_s=self._config.longpoll_s + 10)
            except defer.CancelledError:
                raise
            except Exception:
                if not self.running:
                    return  # stopped while the poll was open: not an error
                self._stats.error("longpoll_connection")
                await self._sleeper.sleep(self._config.retry_s)
                continue
            if status == 401:
                await self._login()
                continue
            if status != 200:
                self._stats.error(f"longpoll_{status}")
                await self._sleeper.sleep(self._config.retry_s)
                continue
            for n in body["notifications"]:
                await self._handle_notification(n)

    async def _handle_notification(self, n: dict) -> None:
        nid, cid = n["notification_id"], n["conversation_id"]
        self._stats.notifications_seen.add(nid)
        after = self._cursors.get(cid, 0)
        if n["seq"] > after:
            status, body = await self._http.request(
                "GET", f"/v1/conversations/{cid}/messages?after={after}&limit=500",
                token=self.token)
            if status == 200:
                self._stats.synced_messages += len(body["messages"])
                self._cursors[cid] = body["next_after"]
        status, _ = await self._http.request(
            "POST", f"/v1/notifications/{nid}/ack", token=self.token)
        if status == 200:
            self._stats.acked.add(nid)
        else:
            self._stats.error(f"ack_{status}")

    def _presence_loop(self) -> None:
        if not self.running or self.token is None:
            return
        # the API takes whole seconds only (a float such as 60.0 is a 400)
        ttl_s = max(1, round(self._config.presence_ttl_s))
        d = self._http.request("PUT", "/v1/presence", {"status": "online", "ttl_s": ttl_s},
                               token=self.token)
        d.addCallbacks(self._presence_set, lambda _f: self._stats.error("presence_connection"))
        self._delayed = [c for c in self._delayed if c.active()] + [
            self._clock.callLater(self._config.presence_ttl_s / 3, self._presence_loop)]

    def _presence_set(self, answer: tuple[int, Any]) -> None:
        if answer[0] != 200:
            self._stats.error(f"presence_{answer[0]}")

    def post(self) -> defer.Deferred:
        """Post one message to a random conversation of this user (retrying its id); a
        stop ends its retries quietly."""
        d = defer.Deferred.fromCoroutine(self._post())
        d.addErrback(self._ended_by_stop)
        return d

    def _ended_by_stop(self, f: Failure) -> Failure | None:
        if f.check(defer.CancelledError) and not self.running:
            return None  # stopService cancelled its retry pause: nothing failed
        return f

    async def _post(self) -> None:
        if self.token is None or not self._conversations:
            return
        self._posts += 1
        cid = str(self._rng.choice(self._conversations))
        client_id = f"{self.handle}/{self._posts}"
        body = {"client_message_id": client_id, "body": f"hello from {self.handle} #{self._posts}"}
        for _attempt in range(5):
            try:
                status, reply = await self._http.request(
                    "POST", f"/v1/conversations/{cid}/messages", body, token=self.token)
            except defer.CancelledError:
                raise
            except Exception:
                await self._sleeper.sleep(self._config.retry_s)
                continue
            if status in (200, 201):
                self._stats.posted[client_id] = (cid, reply["seq"])
                return
            if status >= 500:
                await self._sleeper.sleep(self._config.retry_s)
                continue
            break
        self._stats.post_errors += 1


class CloudWorkload(MultiService):
    """All devices of a population plus the Poisson process that makes them post."""

    def __init__(self, clock: IReactorTime, http: CloudHTTP, population: Population,
                 config: WorkloadConfig, seed: int) -> None:
        super().__init__()
        self._clock, self._config = clock, config
        self._rng = random.Random(seed)
        self.stats = WorkloadStats()
        chats: dict[uuid.UUID, list[uuid.UUID]] = {}
        for cid, members in population.conversations:
            for a in members:
                chats.setdefault(a, []).append(cid)
        self._http = http
        self.devices: list[CloudDevice] = []
        for handle, aid in population.accounts:
            self.add_device(handle, population.password, chats.get(aid, []))
        self._next: Any = None
        self._posting = True

    def add_device(self, handle: str, password: str,
                   conversations: list[uuid.UUID]) -> CloudDevice:
        """One more device (started at once if the workload runs): e.g. for an account
        that a migration just moved to a cloud phase."""
        device = CloudDevice(self._clock, self._http, handle, password, conversations,
                             random.Random(self._rng.random()), self._config, self.stats)
        self.devices.append(device)
        device.setServiceParent(self)
        return device

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._schedule()

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        if self._next is not None and self._next.active():
            self._next.cancel()
        return super().stopService()

    def stop_posting(self) -> None:
        """Stop new posts; devices keep polling and acknowledging until stopped."""
        self._posting = False
        if self._next is not None and self._next.active():
            self._next.cancel()

    def _schedule(self) -> None:
        if self._config.rate > 0 and self._posting:
            self._next = self._clock.callLater(
                self._rng.expovariate(self._config.rate), self._tick)

    def _tick(self) -> None:
        ready = [d for d in self.devices if d.token is not None]
        if ready:
            device = self._rng.choice(ready)
            device.post().addErrback(lambda f: log.failure("post failed", f))
        self._schedule()
