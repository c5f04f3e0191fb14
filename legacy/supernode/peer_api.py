"""The peer API: what privileged, authenticated peers (the bridge, reconcilers) may ask.

One handler per request frame, in ``PEER_HANDLERS``:

    FeedSubscribe, FeedCredit    the change feed from an (epoch, offset), with credit
    FeedSubscribeOnly            the same, leaving out other origins' messages and presence
    DigestRequest, ListRequest   range digests and GUID lists of a chat homed here
    FetchRequest                 messages by GUID
    InjectMessage, InjectPresence   append on behalf of users (origin marked, GUID chosen)
    InjectBatch                  a chat's messages in order, one reply with a result each
    InjectMembership             change a chat's members by a delta, on behalf of users
    ChatsRequest, HostCacheRequest  the chats homed here, every supernode's address

A request that can not be served answers ``RequestFailed`` and the connection stays open; a
protocol violation (``ProtocolViolation``) closes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from legacy import digest, wire
from legacy.framing import ProtocolViolation
from legacy.supernode.protocol import FeedSubscription
from legacy.supernode.state import PRESENCE_STATUSES, has_control

if TYPE_CHECKING:
    from legacy.supernode.node import Supernode
    from legacy.supernode.protocol import SupernodeProtocol

LIST_LIMIT = 400  # guids per ListReply, so the frame stays under MAX_FRAME_BYTES
FETCH_BUDGET = wire.MAX_FRAME_BYTES - 4096


def members_problem(members: tuple) -> str | None:
    """Why an injected message's member list is refused (``bad_message``), or None."""
    if len(members) < 2:
        return "the sender must be one of 2 or more members"
    if len(set(members)) != len(members):
        return "members must be distinct"
    if has_control(*members):
        return "ids must not contain control characters"
    return None


class PeerApi:
    """Serves one supernode's privileged peers, one handler per request frame."""

    def __init__(self, sn: Supernode) -> None:
        self.sn = sn

    def handle(self, proto: SupernodeProtocol, f: Any) -> None:
        """Serve one request (its type is one of ``wire.PEER_FRAMES``)."""
        PEER_HANDLERS[type(f)](self, proto, f)

    def _check_home(self, req_id: int, chat_id: str, proto: SupernodeProtocol) -> bool:
        ring = self.sn.ring
        if ring.home_of(chat_id) != self.sn.sn_id:
            proto.send(wire.RequestFailed(req_id=req_id, code="not_home",
                                          reason=f"chat {chat_id!r} is homed at "
                                                 f"{ring.home_of(chat_id)}"))
            return False
        return True

    # -- the feed ---------------------------------------------------------------------------------

    def feed_subscribe(self, proto: SupernodeProtocol,
                       f: wire.FeedSubscribe | wire.FeedSubscribeOnly) -> None:
        only_origin = f.origin if isinstance(f, wire.FeedSubscribeOnly) else None
        if only_origin == "":
            raise ProtocolViolation("bad_subscribe", "FeedSubscribeOnly needs an origin")
        mem = self.sn.mem
        pos = mem.feed.position_for(f.epoch, f.offset)
        if proto.feed_sub is not None:
            mem.feed_subs.remove(proto.feed_sub)
        proto.send(wire.FeedStatus(epoch=mem.epoch, first_offset=mem.feed.first_offset,
                                   next_offset=mem.feed.next_offset, gap=pos.gap,
                                   gap_epoch=pos.gap_epoch, gap_from=pos.gap_from,
                                   gap_to=pos.gap_to))
        sub = proto.feed_sub = FeedSubscription(self.sn, proto, pos.start, f.window,
                                                only_origin)
        mem.feed_subs.append(sub)
        sub.pump()

    def feed_credit(self, proto: SupernodeProtocol, f: wire.FeedCredit) -> None:
        if proto.feed_sub is None:
            raise ProtocolViolation("no_subscription", "credit without a subscription")
        proto.feed_sub.credit = min(proto.feed_sub.credit + f.count, 1 << 20)
        proto.feed_sub.pump()

    # -- history ---------------------------------------------------------------------------------

    def range_digests(self, proto: SupernodeProtocol, f: wire.DigestRequest) -> None:
        why = digest.valid_range(f.range, f.split_bits)
        if why is not None:
            proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_range", reason=why))
        elif self._check_home(f.req_id, f.range.chat_id, proto):
            chat = self.sn.mem.chats.get(f.range.chat_id)
            digests = (chat.digests.split_digests(f.range, f.split_bits) if chat
                       else digest.split_digests((), f.range, f.split_bits))
            proto.send(wire.DigestReply(req_id=f.req_id, digests=digests))

    def list_guids(self, proto: SupernodeProtocol, f: wire.ListRequest) -> None:
        why = digest.valid_range(f.range)
        if why is not None:
            proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_range", reason=why))
        elif self._check_home(f.req_id, f.range.chat_id, proto):
            chat = self.sn.mem.chats.get(f.range.chat_id)
            found = chat.digests.guids_in(f.range) if chat else []
            limit = min(f.limit or LIST_LIMIT, LIST_LIMIT)
            proto.send(wire.ListReply(req_id=f.req_id, guids=[g for _, g in found[:limit]],
                                      truncated=len(found) > limit))

    def fetch(self, proto: SupernodeProtocol, f: wire.FetchRequest) -> None:
        if not self._check_home(f.req_id, f.chat_id, proto):
            return
        chat = self.sn.mem.chats.get(f.chat_id)
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

    def chats(self, proto: SupernodeProtocol, f: wire.ChatsRequest) -> None:
        chats = self.sn.mem.chats
        limit = min(f.limit or 200, 200)
        ids = sorted(c for c in chats if c > f.after)
        page, size = [], 0
        for c in ids[:limit]:
            members = chats[c].members
            # One chat can take 13 KB (100 members of 128 bytes): bound the page by size too.
            size += len(c.encode()) + 12 + sum(len(m.encode()) + 2 for m in members)
            if size > FETCH_BUDGET:
                break
            page.append(wire.ChatInfo(chat_id=c, members=members,
                                      last_seq=chats[c].next_seq - 1))
        proto.send(wire.ChatsReply(req_id=f.req_id, chats=page, done=len(page) == len(ids)))

    def host_cache(self, proto: SupernodeProtocol, f: wire.HostCacheRequest) -> None:
        proto.send(wire.HostCache(supernodes=list(self.sn.directory.values())))

    # -- injection on behalf of users -----------------------------------------------------------

    def message_problem(self, m: wire.ChatMessage, members: tuple,
                        members_problem: str | None) -> str | None:
        """Why an injected message can not be appended (``bad_message``), or None; the one
        check of InjectMessage and of each item of an InjectBatch. *members_problem* is
        ``members_problem(members)``, found once for a batch's shared list."""
        if not m.guid or not m.chat_id:
            return "guid and chat_id must not be empty"
        if not m.origin or m.origin == "legacy":
            return "an injected message needs an origin mark other than 'legacy'"
        if m.sender not in members:
            return "the sender must be one of 2 or more members"
        if members_problem is not None:
            return members_problem
        if has_control(m.guid, m.chat_id):
            return "ids must not contain control characters"
        if "\x00" in m.body:
            return "the body must not contain NUL characters"
        if len(m.body) > wire.MAX_MESSAGE_CHARS:
            return f"the body must be at most {wire.MAX_MESSAGE_CHARS} characters"
        sn = self.sn
        if m.ts_ms and m.ts_ms < sn.now_ms() - int(sn.config.retention_seconds * 1000):
            # It would be pruned at once and then accepted again as new: refuse it instead.
            return "ts_ms is older than this supernode's retention window"
        return None

    def inject_message(self, proto: SupernodeProtocol, f: wire.InjectMessage) -> None:
        m = f.message
        problem = self.message_problem(m, f.members, members_problem(f.members))
        if problem is not None:
            proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_message", reason=problem))
            return
        if not self._check_home(f.req_id, m.chat_id, proto):
            return
        msg, new = self.sn.routing.accept(m.chat_id, f.members, m.guid, m.sender, m.body,
                                          m.origin, ts_ms=m.ts_ms)
        proto.send(wire.Ack(req_id=f.req_id, status="new" if new else "duplicate",
                            value=msg.legacy_seq))

    def inject_batch(self, proto: SupernodeProtocol, f: wire.InjectBatch) -> None:
        """Append a batch's messages in order, each checked as InjectMessage checks it; one
        reply with a result per message. A refused message does not stop the ones after it
        (each is applied on its own, as a run of InjectMessages would be); a chat homed
        elsewhere fails the whole request (``not_home``), before anything is applied."""
        if not self._check_home(f.req_id, f.chat_id, proto):
            return
        accept = self.sn.routing.accept
        shared = members_problem(f.members)
        results = []
        with self.sn.feed_appending():
            for m in f.messages:
                problem = ("the message's chat_id is not the batch's" if m.chat_id != f.chat_id
                           else self.message_problem(m, f.members, shared))
                if problem is not None:
                    results.append(wire.InjectResult(status="failed", legacy_seq=0,
                                                     code="bad_message", reason=problem))
                    continue
                msg, new = accept(m.chat_id, f.members, m.guid, m.sender, m.body, m.origin,
                                  ts_ms=m.ts_ms)
                results.append(wire.InjectResult(status="new" if new else "duplicate",
                                                 legacy_seq=msg.legacy_seq))
        proto.send(wire.InjectBatchReply(req_id=f.req_id, results=results))

    def inject_membership(self, proto: SupernodeProtocol, f: wire.InjectMembership) -> None:
        """Apply a membership delta from the other stack (``Routing.change_members``)."""
        problem = None
        if not f.chat_id:
            problem = "chat_id must not be empty"
        elif not f.origin or f.origin == "legacy":
            problem = "a membership change needs an origin mark other than 'legacy'"
        elif len(set(f.add)) != len(f.add) or len(set(f.remove)) != len(f.remove):
            problem = "add and remove must each list distinct members"
        elif set(f.add) & set(f.remove):
            problem = "a member can not be both added and removed"
        elif not all(f.add) or not all(f.remove):
            problem = "members must not be empty"
        elif has_control(f.chat_id, *f.add, *f.remove):
            problem = "ids must not contain control characters"
        if problem is not None:
            proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_members", reason=problem))
            return
        if not self._check_home(f.req_id, f.chat_id, proto):
            return
        try:
            status, count = self.sn.routing.change_members(f.chat_id, f.add, f.remove, f.origin)
        except ValueError as e:
            proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_members", reason=str(e)))
            return
        proto.send(wire.Ack(req_id=f.req_id, status=status, value=count))

    def inject_presence(self, proto: SupernodeProtocol, f: wire.InjectPresence) -> None:
        if f.status not in PRESENCE_STATUSES or not f.origin or f.origin == "legacy":
            proto.send(wire.RequestFailed(req_id=f.req_id, code="bad_presence",
                                          reason="status must be online, away, busy or "
                                                 "offline and origin must not be 'legacy'"))
            return
        if not 0 < f.ttl_ms <= wire.MAX_PRESENCE_TTL_MS:
            proto.send(wire.RequestFailed(
                req_id=f.req_id, code="bad_ttl",
                reason=f"ttl_ms must be in (0, {wire.MAX_PRESENCE_TTL_MS}]"))
            return
        self.sn.presence.publish(f.handle, f.status, f.origin, ttl_ms=f.ttl_ms)
        proto.send(wire.Ack(req_id=f.req_id, status="ok", value=0))


#: The requests a privileged peer may make, by frame type.
PEER_HANDLERS: dict[type, Callable[[PeerApi, SupernodeProtocol, Any], None]] = {
    wire.FeedSubscribe: PeerApi.feed_subscribe,
    wire.FeedSubscribeOnly: PeerApi.feed_subscribe,
    wire.FeedCredit: PeerApi.feed_credit,
    wire.DigestRequest: PeerApi.range_digests,
    wire.ListRequest: PeerApi.list_guids,
    wire.FetchRequest: PeerApi.fetch,
    wire.InjectMessage: PeerApi.inject_message,
    wire.InjectBatch: PeerApi.inject_batch,
    wire.InjectPresence: PeerApi.inject_presence,
    wire.InjectMembership: PeerApi.inject_membership,
    wire.ChatsRequest: PeerApi.chats,
    wire.HostCacheRequest: PeerApi.host_cache,
}
assert set(PEER_HANDLERS) == set(wire.PEER_FRAMES)
