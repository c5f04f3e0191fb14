"""The server side of a connection to a supernode, and a privileged peer's feed subscription.

One TCP port serves three roles, decided by the first frame after the ``Challenge``::

    client   --ClientLogin(credential)-->  sessions, presence, Send/Deliver  (clients.py)
    supernode--PeerAuth(role=supernode)->  routing between supernodes       (routing.py,
                                                                              presence.py)
    peer     --PeerAuth(role=peer)------>  feed, digests, list/fetch, inject (peer_api.py)

Each role may send only its own frames (``wire.CLIENT_FRAMES``, ``SUPERNODE_FRAMES``,
``PEER_FRAMES``); anything else is a ``ProtocolViolation`` that closes this one connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legacy import auth, wire
from legacy.framing import FrameProtocol, ProtocolViolation
from legacy.supernode.clients import CLIENT_HANDLERS

if TYPE_CHECKING:
    from legacy.supernode.node import Supernode

_SN_ID_FIELDS = ("from_sn", "home_sn", "sn_id", "subscriber_sn")
_SUPERNODE_FRAME_TYPES = frozenset(wire.SUPERNODE_FRAMES)


class FeedSubscription:
    """One privileged subscriber's position and credit (its flow-control window).

    With *only_origin* (``FeedSubscribeOnly``) the messages and presence changes of other
    origins are left out: a run of them goes as one ``FeedSkipped``, which takes one credit
    like any frame. A run still open when the feed's end is reached is sent then, so the
    subscriber's offset never waits on entries it will not get."""

    def __init__(self, sn: Supernode, proto: SupernodeProtocol, start: int, credit: int,
                 only_origin: str | None = None) -> None:
        self.sn = sn
        self.proto = proto
        self.next = start
        self.credit = credit
        self.only_origin = only_origin

    def pump(self) -> None:
        feed = self.sn.mem.feed
        if self.credit > 0 and self.next < feed.first_offset and self.next < feed.next_offset:
            # Fell out of the buffer while subscribed: report the gap, never skip silently.
            self.proto.send(wire.FeedStatus(
                epoch=feed.epoch, first_offset=feed.first_offset,
                next_offset=feed.next_offset, gap="expired", gap_epoch=feed.epoch,
                gap_from=self.next, gap_to=feed.first_offset))
            self.next = feed.first_offset
        origin = self.only_origin
        send = self.proto.send
        skipped_from = -1  # the start of the run being left out, -1 when none
        while self.credit > 0 and self.next < feed.next_offset:
            entry = feed.get(self.next)
            if origin is not None and (
                    (type(entry) is wire.FeedMessage and entry.message.origin != origin)
                    or (type(entry) is wire.FeedPresence and entry.origin != origin)):
                if skipped_from < 0:
                    skipped_from = self.next
                self.next += 1
                continue
            if skipped_from >= 0:
                send(wire.FeedSkipped(offset=skipped_from, next_offset=self.next))
                skipped_from = -1
                self.credit -= 1
                if self.credit == 0:
                    return
            send(entry)
            self.next += 1
            self.credit -= 1
        if skipped_from >= 0:
            send(wire.FeedSkipped(offset=skipped_from, next_offset=self.next))
            self.credit -= 1


class SupernodeProtocol(FrameProtocol):
    """Server side of one connection to a supernode; its role is set by authentication."""

    def __init__(self, sn: Supernode) -> None:
        self.sn = sn
        self.role = "unauthenticated"
        self.handle = ""
        self.device = ""
        self.nonce = b""
        self.watching: dict[str, None] = {}
        self.feed_sub: FeedSubscription | None = None

    def connectionMade(self) -> None:  # noqa: N802
        if self.sn.mem is None:
            self.transport.abortConnection()
            return
        self.sn._conns[self] = None
        self.nonce = self.sn.rng.randbytes(16)
        self.send(wire.Challenge(nonce=self.nonce, server_id=self.sn.sn_id))

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.sn._conns.pop(self, None)
        if self.role == "client":
            self.sn.clients.detach(self)
        elif self.feed_sub is not None and self.sn.mem is not None:
            subs = self.sn.mem.feed_subs
            if self.feed_sub in subs:
                subs.remove(self.feed_sub)

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        sn = self.sn
        if sn.mem is None:
            return
        role = self.role
        if role == "client":
            handler = CLIENT_HANDLERS.get(type(f))
            if handler is None:
                raise ProtocolViolation("forbidden", f"a client may not send {type(f).__name__}")
            handler(sn.clients, self, f)
        elif role == "supernode":
            if type(f) not in _SUPERNODE_FRAME_TYPES:
                raise ProtocolViolation("forbidden", f"a supernode may not send "
                                                     f"{type(f).__name__}")
            # Check every supernode id on arrival: stored and used later, an unknown one would
            # fail while serving someone else.
            for field in _SN_ID_FIELDS:
                v = getattr(f, field, None)
                if v is not None and v not in sn.directory:
                    raise ProtocolViolation("unknown_supernode", f"{field}={v!r} is not a "
                                                                 f"known supernode")
            sn.handle_supernode_frame(f)
        elif role == "peer":
            if not isinstance(f, wire.PEER_FRAMES):
                raise ProtocolViolation("forbidden", f"a peer may not send {type(f).__name__}")
            sn.peer_api.handle(self, f)
        else:
            self._authenticate(f)

    def _authenticate(self, f: Any) -> None:
        sn = self.sn
        if isinstance(f, wire.ClientLogin):
            why = auth.check_credential(sn.secrets.login_secret, f.handle, f.expires_ms,
                                        f.signature, sn.now_ms())
            if why is not None:
                raise ProtocolViolation("bad_credential", why)
            if not f.handle or not f.device:
                raise ProtocolViolation("bad_credential", "handle and device must not be empty")
            self.role, self.handle, self.device = "client", f.handle, f.device
            self.send(wire.Welcome(server_id=sn.sn_id, epoch=sn.epoch))
            sn.clients.attach(self)
        elif isinstance(f, wire.PeerAuth):
            if f.role not in ("supernode", "peer"):
                raise ProtocolViolation("bad_role", f"unknown role {f.role!r}")
            if not auth.check_peer_proof(sn.secrets.peer_secret, self.nonce, f.role, f.name,
                                         f.proof):
                raise ProtocolViolation("bad_proof", "peer authentication failed")
            if f.role == "supernode" and f.name not in sn.directory:
                raise ProtocolViolation("bad_proof", f"unknown supernode {f.name!r}")
            if f.role == "peer" and sn.peer_is_cut(f.name):
                self.transport.abortConnection()  # partitioned: as if the packets were lost
                return
            self.role = f.role
            self.handle = f.name
            self.send(wire.Welcome(server_id=sn.sn_id, epoch=sn.epoch))
        else:
            raise ProtocolViolation("not_authenticated",
                                    f"{type(f).__name__} before authentication")
