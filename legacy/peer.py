"""The privileged peer client: how the bridge and the reconcilers talk to a supernode.

``connect_peer`` authenticates by challenge-response over the shared peer secret and returns a
``PeerConnection`` whose request methods return Deferreds matched to replies by ``req_id``.
A feed subscription delivers ``FeedStatus``/``FeedMessage``/``FeedPresence``/``FeedChat``
(and ``FeedSkipped``) frames to a handler; the subscriber grants credit as it consumes,
which is the flow control.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, error
from twisted.internet.protocol import Factory

from legacy import auth, wire
from legacy.framing import CodedError, FrameProtocol, ProtocolViolation
from legacy.network import Network
from servicekit.timeouts import Deadline, FifoTimeouts

FEED_FRAMES = (wire.FeedStatus, wire.FeedMessage, wire.FeedPresence, wire.FeedChat,
               wire.FeedSkipped)
_REPLIES = (wire.Ack, wire.InjectBatchReply, wire.DigestReply, wire.ListReply,
            wire.FetchReply, wire.ChatsReply, wire.AccountsPage, wire.RequestFailed,
            wire.VersionsReply)


class PeerRequestFailed(CodedError):
    """The server answered a request with ``RequestFailed``."""


class PeerRefused(CodedError):
    """The server closed the connection with an ``Error`` frame (e.g. bad proof)."""


class PeerConnection(FrameProtocol):
    def __init__(self, name: str, secret: bytes, *, clock: Any = None,
                 request_timeout: float | None = None) -> None:
        self.name = name
        self.secret = secret
        #: with a clock, a request not answered within *request_timeout* fails with
        #: TimeoutError (a stuck or half-open supernode must not hang its caller forever)
        self._clock = clock
        self._timeout = request_timeout
        self.ready: defer.Deferred = defer.Deferred()
        self.server_id = ""
        self.epoch = 0
        self._next_req = 0
        self._pending: dict[int, defer.Deferred] = {}
        #: the request limits, on one timer (``servicekit.timeouts``: no DelayedCall each)
        self._limits = (FifoTimeouts(clock, request_timeout)
                        if clock is not None and request_timeout is not None else None)
        self._deadlines: dict[int, Deadline] = {}
        self._host_cache: deque[defer.Deferred] = deque()
        self.feed_handler: Callable[[Any], None] | None = None
        #: the supernode's ``Error`` when it closed this connection with one
        self.refused: PeerRefused | None = None
        self.closed: defer.Deferred = defer.Deferred()

    # -- protocol ------------------------------------------------------------------------------

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        if isinstance(f, FEED_FRAMES):  # first: nearly every frame a follower reads
            if self.feed_handler is None:
                raise ProtocolViolation("unexpected", "feed frame without a subscription")
            self.feed_handler(f)
        elif isinstance(f, wire.Challenge):
            self.send(wire.PeerAuth(role="peer", name=self.name,
                                    proof=auth.peer_proof(self.secret, f.nonce, "peer",
                                                          self.name)))
        elif isinstance(f, wire.Welcome):
            self.server_id, self.epoch = f.server_id, f.epoch
            if not self.ready.called:
                self.ready.callback(self)
        elif isinstance(f, wire.Error):
            exc = self.refused = PeerRefused(f.code, f.reason)
            if not self.ready.called:
                self.ready.errback(exc)
            self._fail_all(exc)
        elif isinstance(f, wire.HostCache):
            while self._host_cache:
                waiter = self._host_cache.popleft()
                if not waiter.called:  # skip requests that timed out
                    waiter.callback(list(f.supernodes))
                    break
        elif isinstance(f, _REPLIES):
            d = self._pending.pop(f.req_id, None)
            if d is None:
                return
            if self._limits is not None:
                self._deadlines.pop(f.req_id).clear()
            if isinstance(f, wire.RequestFailed):
                d.errback(PeerRequestFailed(f.code, f.reason))
            else:
                d.callback(f)
        else:
            raise ProtocolViolation("unexpected", f"{type(f).__name__} sent to a peer")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        exc = error.ConnectionLost("connection to the supernode was lost")
        if not self.ready.called:
            self.ready.errback(exc)
        self._fail_all(exc)
        if not self.closed.called:
            self.closed.callback(None)

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        self._deadlines = {}
        if self._limits is not None:
            self._limits.cancel_all()
        for d in pending.values():
            d.errback(exc)
        while self._host_cache:
            self._host_cache.popleft().errback(exc)

    def _request(self, make: Callable[[int], Any]) -> defer.Deferred:
        if self.closed.called:  # nobody would answer: fail now, not at the timeout
            return defer.fail(error.ConnectionLost("connection to the supernode was lost"))
        self._next_req = (self._next_req + 1) % (1 << 32)
        req_id = self._next_req
        d: defer.Deferred = defer.Deferred()
        self._pending[req_id] = d
        if self._limits is not None:
            self._deadlines[req_id] = self._limits.start(lambda: self._expire(req_id))
        try:
            self.send(make(req_id))
        except BaseException:
            # not sent (a value the wire format can not carry: WireError): nothing pending
            self._pending.pop(req_id, None)
            deadline = self._deadlines.pop(req_id, None)
            if deadline is not None:
                deadline.clear()
            raise
        return d

    def _expire(self, req_id: int) -> None:
        """No reply within the limit: the request fails with TimeoutError (a late reply
        then finds nobody)."""
        self._deadlines.pop(req_id, None)
        d = self._pending.pop(req_id, None)
        if d is not None:
            d.errback(defer.TimeoutError(f"no reply within {self._timeout}s"))

    def _bounded(self, d: defer.Deferred, forget: Callable[[], Any]) -> defer.Deferred:
        if self._clock is not None and self._timeout is not None:
            d.addTimeout(self._timeout, self._clock)
            d.addErrback(lambda f: (forget(), f)[1])  # a late reply then finds nobody
        return d

    def disconnect(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # -- API ----------------------------------------------------------------------------------

    def host_cache(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._host_cache.append(d)
        self.send(wire.HostCacheRequest())
        return self._bounded(d, lambda: None)

    def subscribe(self, epoch: int, offset: int, window: int,
                  handler: Callable[[Any], None], only_origin: str | None = None) -> None:
        """Stream the feed from (epoch, offset); *handler* gets every feed frame. With
        *only_origin*, other origins' messages and presence come as ``FeedSkipped`` runs."""
        self.feed_handler = handler
        if only_origin is None:
            self.send(wire.FeedSubscribe(epoch=epoch, offset=offset, window=window))
        else:
            self.send(wire.FeedSubscribeOnly(epoch=epoch, offset=offset, window=window,
                                             origin=only_origin))

    def credit(self, count: int) -> None:
        self.send(wire.FeedCredit(count=count))

    def digests(self, rng: wire.Range, split_bits: int = 0) -> defer.Deferred:
        return self._request(lambda r: wire.DigestRequest(req_id=r, range=rng,
                                                          split_bits=split_bits)
                             ).addCallback(lambda f: list(f.digests))

    def list_guids(self, rng: wire.Range, limit: int = 0) -> defer.Deferred:
        return self._request(lambda r: wire.ListRequest(req_id=r, range=rng, limit=limit))

    def fetch(self, chat_id: str, guids: list[str]) -> defer.Deferred:
        return self._request(lambda r: wire.FetchRequest(req_id=r, chat_id=chat_id, guids=guids))

    def inject_message(self, message: wire.ChatMessage, members: tuple) -> defer.Deferred:
        """Fires with the ``Ack``: status ``new`` or ``duplicate``, value = legacy_seq."""
        return self._request(lambda r: wire.InjectMessage(req_id=r, message=message,
                                                          members=members))

    def inject_batch(self, chat_id: str, members: tuple,
                     messages: Sequence[wire.ChatMessage]) -> defer.Deferred:
        """Append *messages* (each of *chat_id*, at most ``wire.MAX_INJECT_BATCH``) at the
        chat's home in order, in one request; fires with their ``wire.InjectResult``s, one
        per message in order (``new`` or ``duplicate`` with the legacy_seq, or ``failed``
        with a code), or fails for the whole batch (``PeerRequestFailed`` ``not_home``, a
        timeout, the connection lost). Raises ``WireError`` at once, sending nothing, for a
        batch the wire format can not carry."""
        return self._request(lambda r: wire.InjectBatch(
            req_id=r, chat_id=chat_id, members=members, messages=messages)
        ).addCallback(_results)

    def inject_membership(self, chat_id: str, add: tuple, remove: tuple,
                          origin: str) -> defer.Deferred:
        """Change a chat's members at its home by a delta; fires with the ``Ack`` (status
        ``changed``, ``unchanged`` or ``no_chat``; value = members after)."""
        return self._request(lambda r: wire.InjectMembership(req_id=r, chat_id=chat_id,
                                                             add=add, remove=remove,
                                                             origin=origin))

    def inject_presence(self, handle: str, status: str, ttl_ms: int,
                        origin: str) -> defer.Deferred:
        return self._request(lambda r: wire.InjectPresence(req_id=r, handle=handle,
                                                           status=status, ttl_ms=ttl_ms,
                                                           origin=origin))

    def chats(self, after: str = "", limit: int = 200) -> defer.Deferred:
        return self._request(lambda r: wire.ChatsRequest(req_id=r, after=after, limit=limit))

    def accounts(self, after: str = "", limit: int = 200) -> defer.Deferred:
        """Login server only: one page of accounts after *after*."""
        return self._request(lambda r: wire.AccountsRequest(req_id=r, after=after, limit=limit))

    def set_moved(self, handle: str, moved: bool) -> defer.Deferred:
        """Login server only: refuse (or again accept) the handle's legacy logins."""
        return self._request(lambda r: wire.SetMoved(req_id=r, handle=handle, moved=moved))

    def set_password_hash(self, handle: str, password_hash: str) -> defer.Deferred:
        """Login server only: the handle's password is now *password_hash*'s (a recovery
        on the cloud); fires with the ``Ack``, fails with ``PeerRequestFailed``
        ``unknown_handle`` or ``bad_hash``."""
        return self._request(lambda r: wire.SetPasswordHash(req_id=r, handle=handle,
                                                            password_hash=password_hash))

    def set_min_version(self, cohort: str, version: str, handles: tuple = (),
                        append: bool = False) -> defer.Deferred:
        """Login server only: set (*version* "" clears) the minimum client version of
        *cohort* ("" for everyone); an ``Ack`` whose value counts the rule's handles."""
        return self._request(lambda r: wire.SetMinVersion(
            req_id=r, cohort=cohort, version=version, handles=handles, append=append))

    def versions(self) -> defer.Deferred:
        """Login server only: the client versions reported and the rules (``VersionsReply``)."""
        return self._request(lambda r: wire.VersionsRequest(req_id=r))


def _results(reply: wire.InjectBatchReply) -> tuple:
    return reply.results


#: Default bound on one privileged request (digests of a huge chat stay well below it).
REQUEST_TIMEOUT_S = 30.0


def connect_peer(network: Network, host: str, port: int, *, name: str, secret: bytes,
                 timeout: float = 5.0,
                 request_timeout: float | None = REQUEST_TIMEOUT_S) -> defer.Deferred:
    """Connect and authenticate; fires with a ready ``PeerConnection`` whose requests fail
    with TimeoutError after *request_timeout* seconds on the network's clock. The
    handshake is part of connecting: a server that accepts and never answers (half-open,
    hung) fails it with TimeoutError after *timeout* seconds, and the link is dropped."""
    d = network.connect(host, port, Factory.forProtocol(
        lambda: PeerConnection(name, secret, clock=network.clock,
                               request_timeout=request_timeout)), timeout=timeout)

    def handshake(proto: PeerConnection) -> defer.Deferred:
        ready = proto.ready.addTimeout(timeout, network.clock)

        def drop(failure: Any) -> Any:
            if proto.transport is not None:
                proto.transport.abortConnection()
            return failure

        return ready.addErrback(drop)

    return d.addCallback(handshake)
