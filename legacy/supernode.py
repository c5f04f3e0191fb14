"""A supernode: the legacy network's server, for clients, other supernodes and privileged peers.

One TCP port serves three roles, decided by the first frame after the ``Challenge``::

    client   --ClientLogin(credential)-->  sessions, presence, Send/Deliver
    supernode--PeerAuth(role=supernode)->  routing between supernodes (one-way links)
    peer     --PeerAuth(role=peer)------>  feed, digests, list/fetch, inject (bridge, reconcilers)

A message's path, with hop faults applied on every supernode-to-supernode frame::

    client -Send-> its SN -RouteSend-> home SN (legacy_seq, history, feed)
        home -RouteAck-> sender's SN -SendAck-> client
        home -RouteToIndex-> index owner of each recipient
            online:  -DeliverLocal-> recipient's SN -Deliver-> devices
            offline: -HoldBack-> home (held) -HoldNote-> index owner; on login -FlushHeld-> home

Presence: the user's SN publishes to the index owner of the handle (the presence hub), which
fans out to the SNs of subscribers; everything carries an expiry and is swept when stale.
All state lives in memory: ``crash`` drops it, ``start`` begins a new epoch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import attrs
from prometheus_client import Counter, Gauge
from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from legacy import auth, digest, wire
from legacy.faults import HopFaults
from legacy.feed import Feed
from legacy.framing import FrameProtocol, ProtocolViolation
from legacy.network import Network
from legacy.ring import HashRing
from legacy.trace import Trace
from servicekit.retry import RetryPolicy

log = Logger()

MESSAGES_APPENDED = Counter("legacy_messages_appended_total",
                            "Messages appended by their home supernode, by origin.", ["origin"])
HOP_FRAMES = Counter("legacy_hop_frames_total", "Frames sent between supernodes.")
LOOP_FAILURES = Counter("legacy_loop_failures_total",
                        "Background passes of a supernode that failed (and were retried).",
                        ["loop"])
SUPERNODES_UP = Gauge("legacy_supernodes_up", "Supernodes currently running in this process.")

PRESENCE_STATUSES = ("online", "away", "busy", "offline")
LIST_LIMIT = 400  # guids per ListReply, so the frame stays under MAX_FRAME_BYTES
FETCH_BUDGET = wire.MAX_FRAME_BYTES - 4096
#: A link's wait before it reconnects: 1, 2, 4, 8, then 10 s, each spread by half
#: (``base * (0.5 + r)``, one draw of the node's rng, as the seeded traces expect).
LINK_RETRY_POLICY = RetryPolicy(initial_s=1.0, factor=2.0, cap_s=10.0, jitter=0.5,
                                jitter_mode="spread")


@attrs.frozen
class Secrets:
    """The two shared secrets of a legacy deployment (from the state directory)."""

    peer_secret: bytes
    login_secret: bytes


@attrs.frozen
class SupernodeConfig:
    sn_id: str
    host: str = "127.0.0.1"
    port: int = 0
    feed_capacity: int = 10_000
    retention_seconds: float = 30 * 86400.0
    presence_ttl: float = 300.0
    refresh_interval: float = 100.0
    sweep_interval: float = 10.0
    link_queue_limit: int = 10_000


@attrs.define
class ChatState:
    members: tuple
    next_seq: int = 1
    history: dict = attrs.Factory(dict)  # guid -> ChatMessage, in legacy_seq order


@attrs.define
class PresenceEntry:
    status: str
    version: int
    expires_ms: int


class _Memory:
    """Everything a supernode forgets when it crashes."""

    def __init__(self, epoch: int, feed_capacity: int) -> None:
        self.epoch = epoch
        self.feed = Feed(epoch, feed_capacity)
        self.chats: dict[str, ChatState] = {}
        self.held: dict[str, dict[str, wire.ChatMessage]] = {}
        # index owner role
        self.index: dict[str, dict[str, tuple[int, int]]] = {}  # handle -> sn -> (exp, ver)
        self.held_notes: dict[str, dict[str, None]] = {}
        self.hub: dict[str, PresenceEntry] = {}  # merged presence, what subscribers see
        self.hub_sources: dict[str, dict[str, PresenceEntry]] = {}
        self.hub_subscribers: dict[str, dict[str, None]] = {}
        # local users
        self.sessions: dict[str, dict[str, SupernodeProtocol]] = {}
        self.local_status: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        # presence seen by local subscribers
        self.watchers: dict[str, dict[str, None]] = defaultdict(dict)
        self.seen: dict[str, PresenceEntry] = {}
        self.feed_subs: list[_FeedSubscription] = []
        self.links: dict[str, _Link] = {}


class Supernode(service.Service):
    """One supernode. ``startService`` listens; ``crash`` loses memory; restart = new epoch."""

    def __init__(self, config: SupernodeConfig, *, network: Network, ring: HashRing,
                 directory: dict[str, wire.SupernodeAddress], secrets: Secrets,
                 hop_faults: HopFaults, trace: Trace, rng: random.Random) -> None:
        self.config = config
        self.sn_id = config.sn_id
        self.name = config.sn_id
        self.network = network
        self.clock = network.clock
        self.ring = ring
        self.directory = directory
        self.secrets = secrets
        self.faults = hop_faults
        self.trace = trace
        self.rng = rng
        self.mem: _Memory | None = None
        self.generation = 0
        self._port: Any = None
        self._conns: dict[SupernodeProtocol, None] = {}  # ordered: faults pick from it
        self._loops: list[LoopingCall] = []
        self.restarts = 0
        self.presence_changes = 0
        #: a fault: privileged peers whose name starts with the prefix are cut off until then
        self._peer_cut: tuple[str, float] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> defer.Deferred:  # noqa: N802
        super().startService()
        self.generation += 1
        epoch = self.rng.getrandbits(62) + 1
        self.mem = _Memory(epoch, self.config.feed_capacity)
        self.trace.record("sn_start", self.sn_id, epoch)
        SUPERNODES_UP.inc()
        factory = Factory.forProtocol(lambda: SupernodeProtocol(self))
        d = self.network.listen(self.config.host, self.config.port, factory)

        def listening(port: Any) -> None:
            self._port = port
            for fn, interval in ((self._refresh, self.config.refresh_interval),
                                 (self._sweep, self.config.sweep_interval)):
                loop = LoopingCall(self._guarded, fn)
                loop.clock = self.clock
                loop.start(interval, now=False).addErrback(
                    lambda f: log.failure("supernode loop died", f))
                self._loops.append(loop)

        return d.addCallback(listening)

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        self.generation += 1
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        mem, self.mem = self.mem, None
        if mem is not None:
            SUPERNODES_UP.dec()
            for link in list(mem.links.values()):
                link.close()
        for conn in list(self._conns):
            conn.transport.abortConnection()
        self._conns.clear()
        port, self._port = self._port, None
        self.trace.record("sn_stop", self.sn_id)
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return defer.succeed(None)

    def _guarded(self, fn: Any) -> None:
        """Run one pass of a background loop; a failure is logged and counted, never fatal."""
        try:
            fn()
        except Exception:
            LOOP_FAILURES.labels(loop=fn.__name__.strip("_")).inc()
            log.failure("supernode {sn} background pass {fn} failed", sn=self.sn_id,
                        fn=fn.__name__)

    def cut_peers(self, prefix: str, seconds: float) -> None:
        """A fault: a partition between this supernode and the privileged peers whose name
        starts with *prefix* (e.g. the bridge workers) for *seconds*. Their connections
        drop now; new ones are dropped at authentication until the cut ends."""
        self._peer_cut = (prefix, self.clock.seconds() + seconds)
        self.trace.record("peer_cut", self.sn_id, prefix, seconds)
        for conn in list(self._conns):
            if conn.role == "peer" and conn.handle.startswith(prefix):
                conn.transport.abortConnection()

    def peer_is_cut(self, name: str) -> bool:
        cut = self._peer_cut
        return cut is not None and name.startswith(cut[0]) and self.clock.seconds() < cut[1]

    def crash(self) -> defer.Deferred:
        """Stop abruptly, losing every bit of memory (the next start has a new epoch)."""
        self.trace.record("sn_crash", self.sn_id)
        return self.stopService()

    def restart(self) -> defer.Deferred:
        self.restarts += 1
        return defer.maybeDeferred(self.startService)

    @property
    def epoch(self) -> int:
        return self.mem.epoch if self.mem else 0

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # -- sending to other supernodes ---------------------------------------------------------

    def send_to(self, dst: str, frame: Any) -> None:
        """Send *frame* to supernode *dst* (locally if it is us), subject to hop faults."""
        mem = self.mem
        if mem is None:
            return
        if dst == self.sn_id:
            self.handle_supernode_frame(frame)
            return
        if dst not in self.directory:
            raise ProtocolViolation("unknown_supernode", f"no supernode {dst!r}")
        gen = self.generation
        for delay in self.faults.delays(self.sn_id, dst):
            HOP_FRAMES.inc()
            if delay <= 0:
                self._link(dst).send(frame)
            else:
                self.clock.callLater(delay, self._send_later, gen, dst, frame)

    def _send_later(self, gen: int, dst: str, frame: Any) -> None:
        if gen == self.generation and self.mem is not None:
            self._link(dst).send(frame)

    def _link(self, dst: str) -> _Link:
        links = self.mem.links
        link = links.get(dst)
        if link is None:
            link = links[dst] = _Link(self, dst)
        return link

    def on_peer_restarted(self, dst: str) -> None:
        """*dst* came back with a new epoch and empty memory: give it back what it owns."""
        mem = self.mem
        self.trace.record("resync", self.sn_id, dst)
        owner = self.ring.index_owner
        for handle, status in mem.local_status.items():
            if owner(handle) == dst:
                self._publish_presence(handle, status, "legacy", feed=False)
        for handle in mem.watchers:
            if owner(handle) == dst:
                self.send_to(dst, wire.PresenceSubscribe(handle=handle, subscriber_sn=self.sn_id))
        for recipient in mem.held:
            if owner(recipient) == dst:
                self.send_to(dst, wire.HoldNote(recipient=recipient, home_sn=self.sn_id))

    # -- clients -----------------------------------------------------------------------------

    def attach_client(self, proto: SupernodeProtocol) -> None:
        mem = self.mem
        devices = mem.sessions.setdefault(proto.handle, {})
        old = devices.get(proto.device)
        devices[proto.device] = proto
        if old is not None and old is not proto:
            old.reject("replaced", "the same device logged in again")
        self.trace.record("attach", self.sn_id, proto.handle, proto.device)
        if proto.handle not in mem.local_status:
            mem.local_status[proto.handle] = "online"
            self._publish_presence(proto.handle, "online", "legacy")

    def detach_client(self, proto: SupernodeProtocol) -> None:
        mem = self.mem
        if mem is None:
            return
        devices = mem.sessions.get(proto.handle)
        if not devices or devices.get(proto.device) is not proto:
            return
        del devices[proto.device]
        self.trace.record("detach", self.sn_id, proto.handle, proto.device)
        if not devices:
            del mem.sessions[proto.handle]
            mem.local_status.pop(proto.handle, None)
            self._publish_presence(proto.handle, "offline", "legacy")
            for watched in proto.watching:
                w = mem.watchers.get(watched)
                if w is not None:
                    w.pop(proto.handle, None)

    def client_send(self, proto: SupernodeProtocol, f: wire.Send) -> None:
        if proto.handle not in f.members:
            raise ProtocolViolation("not_member", "the sender is not a member of the chat")
        if len(f.members) < 2 or len(set(f.members)) != len(f.members):
            raise ProtocolViolation("bad_members", "a chat needs 2 or more distinct members")
        if not f.guid or not f.chat_id:
            raise ProtocolViolation("bad_send", "guid and chat_id must not be empty")
        if _has_control(f.guid, f.chat_id, *f.members):
            raise ProtocolViolation("bad_send", "ids must not contain control characters")
        if "\x00" in f.body:
            # Neither stack can store it (PostgreSQL text has no NUL), so refuse it at once.
            raise ProtocolViolation("bad_send", "the body must not contain NUL characters")
        if len(f.body) > wire.MAX_MESSAGE_CHARS:
            raise ProtocolViolation("too_long", f"the body has {len(f.body)} characters; at "
                                                f"most {wire.MAX_MESSAGE_CHARS} are allowed")
        self.send_to(self.ring.home_of(f.chat_id), wire.RouteSend(
            from_sn=self.sn_id, sender=proto.handle, device=proto.device, guid=f.guid,
            chat_id=f.chat_id, members=f.members, body=f.body))

    def client_set_presence(self, proto: SupernodeProtocol, f: wire.SetPresence) -> None:
        if f.status not in PRESENCE_STATUSES or f.status == "offline":
            raise ProtocolViolation("bad_status", "status must be one of online, away, busy")
        self.mem.local_status[proto.handle] = f.status
        self._publish_presence(proto.handle, f.status, "legacy")

    def client_subscribe(self, proto: SupernodeProtocol, f: wire.Subscribe) -> None:
        mem = self.mem
        for h in f.handles:
            watchers = mem.watchers[h]
            first = not watchers
            watchers[proto.handle] = None
            proto.watching[h] = None
            if first:
                self.send_to(self.ring.index_owner(h),
                             wire.PresenceSubscribe(handle=h, subscriber_sn=self.sn_id))
            seen = mem.seen.get(h)
            if seen is not None:
                proto.send(wire.PresenceNotice(handle=h, status=seen.status,
                                               version=seen.version, expires_ms=seen.expires_ms))

    # -- home role ----------------------------------------------------------------------------

    def accept(self, chat_id: str, members: tuple, guid: str, sender: str, body: str,
               origin: str, ts_ms: int = 0) -> tuple[wire.ChatMessage, bool]:
        """Append a message to its chat unless the GUID is known; route it if it is new."""
        mem = self.mem
        chat = mem.chats.get(chat_id)
        if chat is None:
            chat = mem.chats[chat_id] = ChatState(members=members)
            mem.feed.append(lambda o: wire.FeedChat(offset=o, chat_id=chat_id, members=members))
            self._pump_feed()
        elif chat.members != members:
            chat.members = members
            mem.feed.append(lambda o: wire.FeedChat(offset=o, chat_id=chat_id, members=members))
            self._pump_feed()
        existing = chat.history.get(guid)
        if existing is not None:
            self.trace.record("dup", self.sn_id, guid)
            return existing, False
        msg = wire.ChatMessage(chat_id=chat_id, guid=guid, legacy_seq=chat.next_seq,
                               sender=sender, ts_ms=ts_ms or self.now_ms(), body=body,
                               origin=origin)
        chat.next_seq += 1
        chat.history[guid] = msg
        MESSAGES_APPENDED.labels(origin=origin).inc()
        self.trace.record("append", self.sn_id, chat_id, guid, msg.legacy_seq)
        mem.feed.append(lambda o: wire.FeedMessage(offset=o, message=msg))
        self._pump_feed()
        self._route(msg, tuple(m for m in members if m != sender))
        return msg, True

    def _route(self, msg: wire.ChatMessage, recipients: tuple) -> None:
        by_owner: dict[str, list[str]] = {}
        for r in recipients:
            by_owner.setdefault(self.ring.index_owner(r), []).append(r)
        for owner, rs in by_owner.items():
            self.send_to(owner, wire.RouteToIndex(from_sn=self.sn_id, recipients=rs, message=msg))

    def _hold(self, recipients: tuple, chat_id: str, guid: str) -> None:
        mem = self.mem
        chat = mem.chats.get(chat_id)
        msg = chat.history.get(guid) if chat else None
        if msg is None:
            self.trace.record("hold_lost", self.sn_id, guid)
            return
        for r in recipients:
            held = mem.held.get(r)
            if held is None:
                held = mem.held[r] = {}
                self.send_to(self.ring.index_owner(r),
                             wire.HoldNote(recipient=r, home_sn=self.sn_id))
            held[guid] = msg
            self.trace.record("hold", self.sn_id, r, guid)

    # -- index owner and presence hub role ------------------------------------------------------

    def _online_at(self, handle: str) -> list[str]:
        entry = self.mem.index.get(handle)
        if not entry:
            return []
        now = self.now_ms()
        return [sn for sn, (exp, _ver) in entry.items() if exp > now]

    def handle_supernode_frame(self, f: Any) -> None:
        handler = _SN_HANDLERS[type(f)]
        handler(self, f)

    def _on_route_send(self, f: wire.RouteSend) -> None:
        msg, _new = self.accept(f.chat_id, f.members, f.guid, f.sender, f.body, "legacy")
        self.send_to(f.from_sn, wire.RouteAck(sender=f.sender, device=f.device, guid=f.guid,
                                              chat_id=f.chat_id, legacy_seq=msg.legacy_seq,
                                              ts_ms=msg.ts_ms))

    def _on_route_ack(self, f: wire.RouteAck) -> None:
        proto = self.mem.sessions.get(f.sender, {}).get(f.device)
        if proto is not None:
            proto.send(wire.SendAck(guid=f.guid, chat_id=f.chat_id, legacy_seq=f.legacy_seq,
                                    ts_ms=f.ts_ms))

    def _on_route_to_index(self, f: wire.RouteToIndex) -> None:
        by_sn: dict[str, list[str]] = {}
        offline = []
        for r in f.recipients:
            sns = self._online_at(r)
            if not sns:
                offline.append(r)
            for sn in sns:
                by_sn.setdefault(sn, []).append(r)
        for sn, rs in by_sn.items():
            self.send_to(sn, wire.DeliverLocal(home_sn=f.from_sn, recipients=rs,
                                               message=f.message))
        if offline:
            self.send_to(f.from_sn, wire.HoldBack(recipients=offline, chat_id=f.message.chat_id,
                                                  guid=f.message.guid))

    def _on_deliver_local(self, f: wire.DeliverLocal) -> None:
        mem = self.mem
        missing = []
        for r in f.recipients:
            devices = mem.sessions.get(r)
            if not devices:
                missing.append(r)
                continue
            for proto in devices.values():
                proto.send(wire.Deliver(message=f.message))
            self.trace.record("deliver", self.sn_id, r, f.message.guid)
        for r in missing:
            # The index owner believes r is here: correct it, or the hold would bounce forever.
            self.send_to(self.ring.index_owner(r), wire.IndexPut(
                handle=r, sn_id=self.sn_id, online=False, expires_ms=0,
                version=self._next_version(r)))
        if missing:
            self.send_to(f.home_sn, wire.HoldBack(recipients=missing, chat_id=f.message.chat_id,
                                                  guid=f.message.guid))

    def _on_hold_back(self, f: wire.HoldBack) -> None:
        self._hold(f.recipients, f.chat_id, f.guid)

    def _on_hold_note(self, f: wire.HoldNote) -> None:
        sns = self._online_at(f.recipient)
        if sns:
            self.send_to(f.home_sn, wire.FlushHeld(recipient=f.recipient, sn_id=sns[0]))
        else:
            self.mem.held_notes.setdefault(f.recipient, {})[f.home_sn] = None

    def _on_index_put(self, f: wire.IndexPut) -> None:
        entry = self.mem.index.setdefault(f.handle, {})
        old = entry.get(f.sn_id)
        if old is not None and old[1] >= f.version:
            return  # reordered by a hop delay: an older put
        entry[f.sn_id] = (f.expires_ms if f.online else 0, f.version)
        if f.online:
            notes = self.mem.held_notes.pop(f.handle, None)
            for home in notes or ():
                self.send_to(home, wire.FlushHeld(recipient=f.handle, sn_id=f.sn_id))

    def _on_flush_held(self, f: wire.FlushHeld) -> None:
        held = self.mem.held.pop(f.recipient, None)
        for msg in (held or {}).values():
            self.trace.record("flush", self.sn_id, f.recipient, msg.guid)
            self.send_to(f.sn_id, wire.DeliverLocal(home_sn=self.sn_id, recipients=(f.recipient,),
                                                    message=msg))

    def _on_presence_publish(self, f: wire.PresencePublish) -> None:
        sources = self.mem.hub_sources.setdefault(f.handle, {})
        cur = sources.get(f.source)
        if cur is not None and f.version <= cur.version:
            return  # reordered by a hop delay: an older publish from the same source
        sources[f.source] = PresenceEntry(f.status, f.version, f.expires_ms)
        self._merge_presence(f.handle)

    def _merge_presence(self, handle: str) -> None:
        """Merge a handle's sources: the newest unexpired non-offline one wins, else offline.
        Fans out on every change of the merged entry (refreshes carry the new expiry)."""
        mem = self.mem
        now = self.now_ms()
        sources = mem.hub_sources.get(handle, {})
        live = [e for e in sources.values() if e.status != "offline" and e.expires_ms > now]
        newest = max((e.version for e in sources.values()), default=0)
        cur = mem.hub.get(handle)
        if cur is not None:
            newest = max(newest, cur.version + (0 if live else 1))
        if live:
            best = max(live, key=lambda e: e.version)
            merged = PresenceEntry(best.status, newest, max(e.expires_ms for e in live))
        else:
            merged = PresenceEntry("offline", newest, 0)
        if cur is not None and (cur.status, cur.version, cur.expires_ms) == (
                merged.status, merged.version, merged.expires_ms):
            return
        if cur is None or cur.status != merged.status:
            self.presence_changes += 1
        mem.hub[handle] = merged
        self._fanout(handle)

    def _fanout(self, handle: str) -> None:
        mem = self.mem
        p = mem.hub[handle]
        for sn in mem.hub_subscribers.get(handle, ()):
            self.send_to(sn, wire.PresenceFanout(handle=handle, status=p.status,
                                                 version=p.version, expires_ms=p.expires_ms))

    def _on_presence_subscribe(self, f: wire.PresenceSubscribe) -> None:
        mem = self.mem
        mem.hub_subscribers.setdefault(f.handle, {})[f.subscriber_sn] = None
        p = mem.hub.get(f.handle)
        if p is not None:
            self.send_to(f.subscriber_sn, wire.PresenceFanout(
                handle=f.handle, status=p.status, version=p.version, expires_ms=p.expires_ms))

    def _on_presence_fanout(self, f: wire.PresenceFanout) -> None:
        mem = self.mem
        cur = mem.seen.get(f.handle)
        if cur is not None and f.version <= cur.version:
            return
        mem.seen[f.handle] = PresenceEntry(f.status, f.version, f.expires_ms)
        if cur is None or cur.status != f.status:
            self.trace.record("presence", self.sn_id, f.handle, f.status)
            self._notify_watchers(f.handle, f.status, f.version, f.expires_ms)

    def _notify_watchers(self, handle: str, status: str, version: int, expires_ms: int) -> None:
        mem = self.mem
        notice = wire.PresenceNotice(handle=handle, status=status, version=version,
                                     expires_ms=expires_ms)
        for watcher in mem.watchers.get(handle, ()):
            for proto in mem.sessions.get(watcher, {}).values():
                proto.send(notice)

    # -- publishing presence --------------------------------------------------------------------

    def _next_version(self, handle: str) -> int:
        versions = self.mem.versions
        v = max(self.now_ms() * 1000, versions.get(handle, 0) + 1)
        versions[handle] = v
        return v

    def _publish_presence(self, handle: str, status: str, origin: str, *, feed: bool = True,
                          ttl_ms: int | None = None) -> None:
        mem = self.mem
        version = self._next_version(handle)
        ttl = int(self.config.presence_ttl * 1000) if ttl_ms is None else ttl_ms
        expires = self.now_ms() + ttl
        owner = self.ring.index_owner(handle)
        if origin == "legacy":
            self.send_to(owner, wire.IndexPut(handle=handle, sn_id=self.sn_id,
                                              online=status != "offline", expires_ms=expires,
                                              version=version))
        source = self.sn_id if origin == "legacy" else f"peer:{origin}"
        self.send_to(owner, wire.PresencePublish(handle=handle, status=status, version=version,
                                                 expires_ms=expires, origin=origin,
                                                 source=source))
        if feed:
            mem.feed.append(lambda o: wire.FeedPresence(
                offset=o, handle=handle, status=status, version=version, expires_ms=expires,
                origin=origin))
            self._pump_feed()

    def _refresh(self) -> None:
        """Re-publish local users' presence before it expires (also refreshes the index)."""
        if self.mem is None:
            return
        for handle, status in list(self.mem.local_status.items()):
            self._publish_presence(handle, status, "legacy")

    def _sweep(self) -> None:
        """Expire stale presence (hub and seen), stale index entries, and old history."""
        mem = self.mem
        if mem is None:
            return
        now = self.now_ms()
        for handle in [h for h, p in mem.hub.items()
                       if p.status != "offline" and p.expires_ms <= now]:
            self.trace.record("expire_hub", self.sn_id, handle)
            self._merge_presence(handle)
        for handle, p in mem.seen.items():
            if p.status != "offline" and p.expires_ms <= now:
                p.status = "offline"
                self.trace.record("expire_seen", self.sn_id, handle)
                self._notify_watchers(handle, "offline", p.version, p.expires_ms)
        for handle in [h for h, e in mem.index.items() if all(x <= now for x, _ in e.values())]:
            del mem.index[handle]
        horizon = now - int(self.config.retention_seconds * 1000)
        for chat in mem.chats.values():
            history = chat.history
            while history:
                guid = next(iter(history))
                if history[guid].ts_ms >= horizon:
                    break
                del history[guid]

    # -- privileged peers -------------------------------------------------------------------------

    def _pump_feed(self) -> None:
        for sub in self.mem.feed_subs:
            sub.pump()

    def _check_home(self, req_id: int, chat_id: str, proto: SupernodeProtocol) -> bool:
        if self.ring.home_of(chat_id) != self.sn_id:
            proto.send(wire.RequestFailed(req_id=req_id, code="not_home",
                                          reason=f"chat {chat_id!r} is homed at "
                                                 f"{self.ring.home_of(chat_id)}"))
            return False
        return True

    def peer_frame(self, proto: SupernodeProtocol, f: Any) -> None:
        mem = self.mem
        if isinstance(f, wire.FeedSubscribe):
            pos = mem.feed.position_for(f.epoch, f.offset)
            if pos is None:
                raise ProtocolViolation("bad_offset", "offset is ahead of the feed")
            if proto.feed_sub is not None:
                mem.feed_subs.remove(proto.feed_sub)
            proto.send(wire.FeedStatus(epoch=mem.epoch, first_offset=mem.feed.first_offset,
                                       next_offset=mem.feed.next_offset, gap=pos.gap,
                                       gap_epoch=pos.gap_epoch, gap_from=pos.gap_from,
                                       gap_to=pos.gap_to))
            sub = proto.feed_sub = _FeedSubscription(self, proto, pos.start, f.window)
            mem.feed_subs.append(sub)
            sub.pump()
        elif isinstance(f, wire.FeedCredit):
            if proto.feed_sub is None:
                raise ProtocolViolation("no_subscription", "credit without a subscription")
            proto.feed_sub.credit = min(proto.feed_sub.credit + f.count, 1 << 20)
            proto.feed_sub.pump()
        elif isinstance(f, wire.DigestRequest):
            why = digest.valid_range(f.range, f.split_bits)
            if why is not None:
                proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_range", reason=why))
            elif self._check_home(f.req_id, f.range.chat_id, proto):
                chat = mem.chats.get(f.range.chat_id)
                msgs = chat.history.values() if chat else ()
                proto.send(wire.DigestReply(req_id=f.req_id, digests=digest.split_digests(
                    msgs, f.range, f.split_bits)))
        elif isinstance(f, wire.ListRequest):
            why = digest.valid_range(f.range)
            if why is not None:
                proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_range", reason=why))
            elif self._check_home(f.req_id, f.range.chat_id, proto):
                chat = mem.chats.get(f.range.chat_id)
                found = sorted((m.ts_ms, m.guid) for m in (chat.history.values() if chat else ())
                               if digest.in_range(f.range, m.ts_ms, digest.guid_bucket(m.guid)))
                limit = min(f.limit or LIST_LIMIT, LIST_LIMIT)
                proto.send(wire.ListReply(req_id=f.req_id, guids=[g for _, g in found[:limit]],
                                          truncated=len(found) > limit))
        elif isinstance(f, wire.FetchRequest):
            if self._check_home(f.req_id, f.chat_id, proto):
                chat = mem.chats.get(f.chat_id)
                history = chat.history if chat else {}
                found, missing, size = [], [], 0
                for g in f.guids:
                    m = history.get(g)
                    # Missing GUIDs take room in the reply too (256 of them can be 33 KB).
                    size += len(g.encode()) + 2 if m is None else len(m.body.encode()) + 512
                    if size > FETCH_BUDGET:
                        break  # the caller asks again for what was neither found nor missing
                    if m is None:
                        missing.append(g)
                    else:
                        found.append(m)
                proto.send(wire.FetchReply(req_id=f.req_id, messages=found, missing=missing))
        elif isinstance(f, wire.InjectMessage):
            self._inject_message(proto, f)
        elif isinstance(f, wire.InjectPresence):
            if f.status not in PRESENCE_STATUSES or not f.origin or f.origin == "legacy":
                proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_presence",
                                              reason="status must be online, away, busy or "
                                                     "offline and origin must not be 'legacy'"))
                return
            if not 0 < f.ttl_ms <= 3_600_000:
                proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_ttl",
                                              reason="ttl_ms must be in (0, 3600000]"))
                return
            self._publish_presence(f.handle, f.status, f.origin, ttl_ms=f.ttl_ms)
            proto.send(wire.Ack(req_id=f.req_id, status="ok", value=0))
        elif isinstance(f, wire.ChatsRequest):
            limit = min(f.limit or 200, 200)
            ids = sorted(c for c in mem.chats if c > f.after)
            page, size = [], 0
            for c in ids[:limit]:
                members = mem.chats[c].members
                # One chat can take 13 KB (100 members of 128 bytes): bound the page by size too.
                size += len(c.encode()) + 12 + sum(len(m.encode()) + 2 for m in members)
                if size > FETCH_BUDGET:
                    break
                page.append(wire.ChatInfo(chat_id=c, members=members,
                                          last_seq=mem.chats[c].next_seq - 1))
            proto.send(wire.ChatsReply(req_id=f.req_id, chats=page, done=len(page) == len(ids)))
        elif isinstance(f, wire.HostCacheRequest):
            proto.send(wire.HostCache(supernodes=list(self.directory.values())))
        else:  # pragma: no cover - PEER_FRAMES and this chain are kept in step
            raise ProtocolViolation("forbidden", f"{type(f).__name__} is not a peer request")

    def _inject_message(self, proto: SupernodeProtocol, f: wire.InjectMessage) -> None:
        m = f.message
        problem = None
        if not m.guid or not m.chat_id:
            problem = "guid and chat_id must not be empty"
        elif not m.origin or m.origin == "legacy":
            problem = "an injected message needs an origin mark other than 'legacy'"
        elif m.sender not in f.members or len(f.members) < 2:
            problem = "the sender must be one of 2 or more members"
        elif len(set(f.members)) != len(f.members):
            problem = "members must be distinct"
        elif _has_control(m.guid, m.chat_id, *f.members):
            problem = "ids must not contain control characters"
        elif "\x00" in m.body:
            problem = "the body must not contain NUL characters"
        elif len(m.body) > wire.MAX_MESSAGE_CHARS:
            problem = f"the body must be at most {wire.MAX_MESSAGE_CHARS} characters"
        elif m.ts_ms and m.ts_ms < self.now_ms() - int(self.config.retention_seconds * 1000):
            # It would be pruned at once and then accepted again as new: refuse it instead.
            problem = "ts_ms is older than this supernode's retention window"
        if problem is not None:
            proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_message", reason=problem))
            return
        if not self._check_home(f.req_id, m.chat_id, proto):
            return
        msg, new = self.accept(m.chat_id, f.members, m.guid, m.sender, m.body, m.origin,
                               ts_ms=m.ts_ms)
        proto.send(wire.Ack(req_id=f.req_id, status="new" if new else "duplicate",
                            value=msg.legacy_seq))

    # -- introspection for summaries and tests ---------------------------------------------------

    def held_count(self) -> int:
        return sum(len(v) for v in self.mem.held.values()) if self.mem else 0

    def held_pairs(self) -> set[tuple[str, str]]:
        if self.mem is None:
            return set()
        return {(guid, r) for r, held in self.mem.held.items() for guid in held}

    def history(self, chat_id: str) -> list[wire.ChatMessage]:
        chat = self.mem.chats.get(chat_id) if self.mem else None
        return list(chat.history.values()) if chat else []


_SN_ID_FIELDS = ("from_sn", "home_sn", "sn_id", "subscriber_sn")


def _has_control(*ids: str) -> bool:
    """Ids are hashed joined by U+001F (docs/digest.md), so no control characters in them."""
    return any(ch < " " or "\x7f" <= ch <= "\x9f" for s in ids for ch in s)


_SN_HANDLERS = {
    wire.RouteSend: Supernode._on_route_send,
    wire.RouteAck: Supernode._on_route_ack,
    wire.RouteToIndex: Supernode._on_route_to_index,
    wire.DeliverLocal: Supernode._on_deliver_local,
    wire.HoldBack: Supernode._on_hold_back,
    wire.HoldNote: Supernode._on_hold_note,
    wire.IndexPut: Supernode._on_index_put,
    wire.FlushHeld: Supernode._on_flush_held,
    wire.PresencePublish: Supernode._on_presence_publish,
    wire.PresenceSubscribe: Supernode._on_presence_subscribe,
    wire.PresenceFanout: Supernode._on_presence_fanout,
}
assert set(_SN_HANDLERS) == set(wire.SUPERNODE_FRAMES)


class _FeedSubscription:
    """One privileged subscriber's position and credit (its flow-control window)."""

    def __init__(self, sn: Supernode, proto: SupernodeProtocol, start: int, credit: int) -> None:
        self.sn = sn
        self.proto = proto
        self.next = start
        self.credit = credit

    def pump(self) -> None:
        feed = self.sn.mem.feed
        while self.credit > 0 and self.next < feed.next_offset:
            if self.next < feed.first_offset:
                # Fell out of the buffer while subscribed: report the gap, never skip silently.
                self.proto.send(wire.FeedStatus(
                    epoch=feed.epoch, first_offset=feed.first_offset,
                    next_offset=feed.next_offset, gap="expired", gap_epoch=feed.epoch,
                    gap_from=self.next, gap_to=feed.first_offset))
                self.next = feed.first_offset
            self.proto.send(feed.get(self.next))
            self.next += 1
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
        self.feed_sub: _FeedSubscription | None = None

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
            self.sn.detach_client(self)
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
            if isinstance(f, wire.Send):
                sn.client_send(self, f)
            elif isinstance(f, wire.SetPresence):
                sn.client_set_presence(self, f)
            elif isinstance(f, wire.Subscribe):
                sn.client_subscribe(self, f)
            else:
                raise ProtocolViolation("forbidden", f"a client may not send {type(f).__name__}")
        elif role == "supernode":
            if type(f) not in _SN_HANDLERS:
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
            sn.peer_frame(self, f)
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
            sn.attach_client(self)
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


class _LinkProtocol(FrameProtocol):
    """Client side of a supernode-to-supernode link: authenticate, then only send."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def frameReceived(self, f: Any) -> None:  # noqa: N802
        sn = self.link.sn
        if isinstance(f, wire.Challenge):
            self.send(wire.PeerAuth(role="supernode", name=sn.sn_id, proof=auth.peer_proof(
                sn.secrets.peer_secret, f.nonce, "supernode", sn.sn_id)))
        elif isinstance(f, wire.Welcome):
            self.link.ready(self, f.epoch)
        elif isinstance(f, wire.Error):
            log.warn("link {src}->{dst} refused: {code}: {reason}", src=sn.sn_id,
                     dst=self.link.dst, code=f.code, reason=f.reason)
        else:
            raise ProtocolViolation("unexpected", f"{type(f).__name__} on an outbound link")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.link.lost(self)


class _Link:
    """An outbound connection to one supernode, connected lazily, with a bounded queue.

    When the connection drops, the link reconnects with backoff; a different epoch in the
    ``Welcome`` means the peer lost its memory, so we give it back what it owns.
    """

    def __init__(self, sn: Supernode, dst: str) -> None:
        self.sn = sn
        self.dst = dst
        self.gen = sn.generation
        self.proto: _LinkProtocol | None = None
        self.connecting = False
        self.queue: list[Any] = []
        self.known_epoch: int | None = None
        self.failures = 0
        self.closed = False
        self._retry: Any = None

    def send(self, frame: Any) -> None:
        if self.closed:
            return
        if self.proto is not None:
            self.proto.send(frame)
            return
        if len(self.queue) >= self.sn.config.link_queue_limit:
            self.queue.pop(0)
            self.sn.trace.record("link_overflow", self.sn.sn_id, self.dst)
        self.queue.append(frame)
        self._connect()

    def _connect(self) -> None:
        if self.connecting or self.proto is not None or self.closed or self._retry is not None:
            return
        addr = self.sn.directory[self.dst]
        self.connecting = True
        d = self.sn.network.connect(addr.host, addr.port,
                                    Factory.forProtocol(lambda: _LinkProtocol(self)))
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        self.connecting = False
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self.closed or self._retry is not None:
            return
        self.failures += 1
        delay = LINK_RETRY_POLICY.delay(self.failures, self.sn.rng)
        self._retry = self.sn.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if not self.closed and self.sn.generation == self.gen:
            self._connect()

    def ready(self, proto: _LinkProtocol, epoch: int) -> None:
        if self.closed:
            proto.transport.abortConnection()
            return
        self.connecting = False
        self.proto = proto
        self.failures = 0
        restarted = self.known_epoch is not None and epoch != self.known_epoch
        self.known_epoch = epoch
        queue, self.queue = self.queue, []
        if restarted:
            self.sn.on_peer_restarted(self.dst)
        for frame in queue:
            proto.send(frame)

    def lost(self, proto: _LinkProtocol) -> None:
        if self.proto is proto:
            self.proto = None
        self.connecting = False
        if not self.closed:
            # Reconnect even with nothing queued: that is how we notice a peer's restart.
            self._schedule_retry()

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self.proto is not None:
            self.proto.transport.abortConnection()
            self.proto = None
