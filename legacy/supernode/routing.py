"""Routing: a message from its home supernode to the devices of its recipients.

A message's path, with hop faults applied on every supernode-to-supernode frame::

    client -Send-> its SN -RouteSend-> home SN (legacy_seq, history, feed)
        home -RouteAck-> sender's SN -SendAck-> client
        home -RouteToIndex-> index owner of each recipient
            online:  -DeliverLocal-> recipient's SN -Deliver-> devices
            offline: -HoldBack-> home (held) -HoldNote-> index owner; on login -FlushHeld-> home

One supernode plays every role of this path for some chats and handles: the *home* of a chat
(consistent hashing over supernode ids) orders, keeps and holds its messages; the *index
owner* of a handle knows where it is online.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from legacy import wire
from legacy.supernode.state import ChatState

if TYPE_CHECKING:
    from legacy.supernode.node import Supernode

MESSAGES_APPENDED = Counter("legacy_messages_appended_total",
                            "Messages appended by their home supernode, by origin.", ["origin"])
#: MESSAGES_APPENDED's child per origin, looked up once (``labels`` takes a lock and builds a
#: key on every call: about 1.5 µs a message)
_APPENDED: dict[str, Any] = {}


class Routing:
    """The home and index-owner roles of one supernode: append, route, hold, deliver."""

    def __init__(self, sn: Supernode) -> None:
        self.sn = sn

    # -- home role ----------------------------------------------------------------------------

    def accept(self, chat_id: str, members: tuple, guid: str, sender: str, body: str,
               origin: str, ts_ms: int = 0) -> tuple[wire.ChatMessage, bool]:
        """Append a message to its chat unless the GUID is known; route it if it is new.

        A legacy client's list (origin ``legacy``) replaces the chat's, as the legacy protocol
        has it, except for members a peer removed (``ChatState.removed``): a client's stale
        list does not add them back. An injected message (any other origin) never changes
        an existing chat's list; it creates a chat that does not exist, and it is delivered
        only to members of both its own list and the chat's.
        """
        sn = self.sn
        mem = sn.mem
        chat = mem.chats.get(chat_id)
        if chat is None:
            chat = mem.chats[chat_id] = ChatState(members=members)
            self._announce(chat_id, members, origin)
        elif origin == "legacy":
            if chat.removed:
                members = tuple(m for m in members if m not in chat.removed)
            if chat.members != members:
                chat.members = members
                self._announce(chat_id, members, origin)
        existing = chat.history.get(guid)
        if existing is not None:
            sn.trace.record("dup", sn.sn_id, guid)
            return existing, False
        msg = wire.ChatMessage(chat_id=chat_id, guid=guid, legacy_seq=chat.next_seq,
                               sender=sender, ts_ms=ts_ms or sn.now_ms(), body=body,
                               origin=origin)
        chat.next_seq += 1
        chat.add(msg)
        appended = _APPENDED.get(origin)
        if appended is None:
            appended = _APPENDED[origin] = MESSAGES_APPENDED.labels(origin=origin)
        appended.inc()
        sn.trace.record("append", sn.sn_id, chat_id, guid, msg.legacy_seq)
        sn.feed_append(lambda o: wire.FeedMessage(offset=o, message=msg))
        allowed = set(members)
        self._route(msg, tuple(m for m in chat.members if m != sender and m in allowed))
        return msg, True

    def change_members(self, chat_id: str, add: tuple, remove: tuple,
                       origin: str) -> tuple[str, int]:
        """Apply a peer's membership delta to a chat homed here: ``(status, members after)``,
        status ``changed``, ``unchanged`` or ``no_chat`` (a chat that does not exist is
        created only when the delta leaves it 2 or more members).

        Who a peer removes is remembered (until a peer adds them back), so that a legacy
        client's stale list does not add them again."""
        chat = self.sn.mem.chats.get(chat_id)
        gone = set(remove)
        if chat is None:
            members = tuple(m for m in add if m not in gone)
            if len(members) < 2:
                return "no_chat", len(members)
            _fits(members)
            chat = self.sn.mem.chats[chat_id] = ChatState(members=members)
            chat.removed = gone
            self._announce(chat_id, members, origin)
            return "changed", len(members)
        kept = tuple(m for m in chat.members if m not in gone)
        members = kept + tuple(m for m in add if m not in kept and m not in gone)
        _fits(members)
        chat.removed = (chat.removed - set(add)) | gone
        if members == chat.members:
            return "unchanged", len(members)
        chat.members = members
        self._announce(chat_id, members, origin)
        return "changed", len(members)

    def _announce(self, chat_id: str, members: tuple, origin: str) -> None:
        self.sn.feed_append(lambda o: wire.FeedChat(offset=o, chat_id=chat_id, members=members,
                                                    origin=origin))

    def _route(self, msg: wire.ChatMessage, recipients: tuple) -> None:
        sn = self.sn
        by_owner: dict[str, list[str]] = {}
        for r in recipients:
            by_owner.setdefault(sn.ring.index_owner(r), []).append(r)
        for owner, rs in by_owner.items():
            sn.send_to(owner, wire.RouteToIndex(from_sn=sn.sn_id, recipients=rs, message=msg))

    def _hold(self, recipients: tuple, chat_id: str, guid: str) -> None:
        sn = self.sn
        mem = sn.mem
        chat = mem.chats.get(chat_id)
        msg = chat.history.get(guid) if chat else None
        if msg is None:
            sn.trace.record("hold_lost", sn.sn_id, guid)
            return
        for r in recipients:
            held = mem.held.get(r)
            if held is None:
                held = mem.held[r] = {}
                sn.send_to(sn.ring.index_owner(r), wire.HoldNote(recipient=r, home_sn=sn.sn_id))
            held[guid] = msg
            sn.trace.record("hold", sn.sn_id, r, guid)

    # -- index owner role ---------------------------------------------------------------------

    def _online_at(self, handle: str) -> list[str]:
        entry = self.sn.mem.index.get(handle)
        if not entry:
            return []
        now = self.sn.now_ms()
        return [sn for sn, (exp, _ver) in entry.items() if exp > now]

    # -- supernode frames ---------------------------------------------------------------------

    def on_route_send(self, f: wire.RouteSend) -> None:
        msg, _new = self.accept(f.chat_id, f.members, f.guid, f.sender, f.body, "legacy")
        self.sn.send_to(f.from_sn, wire.RouteAck(sender=f.sender, device=f.device, guid=f.guid,
                                                 chat_id=f.chat_id, legacy_seq=msg.legacy_seq,
                                                 ts_ms=msg.ts_ms))

    def on_route_ack(self, f: wire.RouteAck) -> None:
        proto = self.sn.mem.sessions.get(f.sender, {}).get(f.device)
        if proto is not None:
            proto.send(wire.SendAck(guid=f.guid, chat_id=f.chat_id, legacy_seq=f.legacy_seq,
                                    ts_ms=f.ts_ms))

    def on_route_to_index(self, f: wire.RouteToIndex) -> None:
        by_sn: dict[str, list[str]] = {}
        offline = []
        for r in f.recipients:
            sns = self._online_at(r)
            if not sns:
                offline.append(r)
            for sn in sns:
                by_sn.setdefault(sn, []).append(r)
        for sn, rs in by_sn.items():
            self.sn.send_to(sn, wire.DeliverLocal(home_sn=f.from_sn, recipients=rs,
                                                  message=f.message))
        if offline:
            self.sn.send_to(f.from_sn, wire.HoldBack(
                recipients=offline, chat_id=f.message.chat_id, guid=f.message.guid))

    def on_deliver_local(self, f: wire.DeliverLocal) -> None:
        sn = self.sn
        mem = sn.mem
        missing = []
        for r in f.recipients:
            devices = mem.sessions.get(r)
            if not devices:
                missing.append(r)
                continue
            for proto in devices.values():
                proto.send(wire.Deliver(message=f.message))
            sn.trace.record("deliver", sn.sn_id, r, f.message.guid)
        for r in missing:
            # The index owner believes r is here: correct it, or the hold would bounce forever.
            sn.send_to(sn.ring.index_owner(r), wire.IndexPut(
                handle=r, sn_id=sn.sn_id, online=False, expires_ms=0,
                version=sn.presence.next_version(r)))
        if missing:
            sn.send_to(f.home_sn, wire.HoldBack(recipients=missing, chat_id=f.message.chat_id,
                                                guid=f.message.guid))

    def on_hold_back(self, f: wire.HoldBack) -> None:
        self._hold(f.recipients, f.chat_id, f.guid)

    def on_hold_note(self, f: wire.HoldNote) -> None:
        sns = self._online_at(f.recipient)
        if sns:
            self.sn.send_to(f.home_sn, wire.FlushHeld(recipient=f.recipient, sn_id=sns[0]))
        else:
            self.sn.mem.held_notes.setdefault(f.recipient, {})[f.home_sn] = None

    def on_index_put(self, f: wire.IndexPut) -> None:
        mem = self.sn.mem
        entry = mem.index.setdefault(f.handle, {})
        old = entry.get(f.sn_id)
        if old is not None and old[1] >= f.version:
            return  # reordered by a hop delay: an older put
        entry[f.sn_id] = (f.expires_ms if f.online else 0, f.version)
        if f.online:
            notes = mem.held_notes.pop(f.handle, None)
            for home in notes or ():
                self.sn.send_to(home, wire.FlushHeld(recipient=f.handle, sn_id=f.sn_id))

    def on_flush_held(self, f: wire.FlushHeld) -> None:
        sn = self.sn
        held = sn.mem.held.pop(f.recipient, None)
        for msg in (held or {}).values():
            sn.trace.record("flush", sn.sn_id, f.recipient, msg.guid)
            sn.send_to(f.sn_id, wire.DeliverLocal(home_sn=sn.sn_id, recipients=(f.recipient,),
                                                  message=msg))

    # -- background -----------------------------------------------------------------------------

    def sweep(self, now: int) -> None:
        """Drop index entries that all expired, and history older than the retention."""
        mem = self.sn.mem
        for handle in [h for h, e in mem.index.items() if all(x <= now for x, _ in e.values())]:
            del mem.index[handle]
        horizon = now - int(self.sn.config.retention_seconds * 1000)
        for chat in mem.chats.values():
            history = chat.history
            while history:
                guid = next(iter(history))
                if history[guid].ts_ms >= horizon:
                    break
                chat.drop(guid)


def _fits(members: tuple) -> None:
    """ValueError, before anything changes, for a list longer than a chat may hold."""
    if len(members) > wire.MAX_MEMBERS:
        raise ValueError(f"a chat has at most {wire.MAX_MEMBERS} members; this one would "
                         f"have {len(members)}")


#: The supernode frames routing handles, by type.
ROUTING_HANDLERS: dict[type, Callable[[Routing, Any], None]] = {
    wire.RouteSend: Routing.on_route_send,
    wire.RouteAck: Routing.on_route_ack,
    wire.RouteToIndex: Routing.on_route_to_index,
    wire.DeliverLocal: Routing.on_deliver_local,
    wire.HoldBack: Routing.on_hold_back,
    wire.HoldNote: Routing.on_hold_note,
    wire.IndexPut: Routing.on_index_put,
    wire.FlushHeld: Routing.on_flush_held,
}
