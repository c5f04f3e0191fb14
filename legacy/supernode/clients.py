"""Ordinary clients at their supernode: device sessions and the three requests a client makes.

    ClientLogin (protocol.py) --> attach: the first device online publishes "online";
                                  the login's offline-message request (offline.py)
    Send         --> checked here, then RouteSend to the chat's home (routing.py)
    SetPresence  --> published through the presence hub (presence.py)
    Subscribe    --> watch handles: PresenceSubscribe to their hubs, the last seen at once
    connection lost --> detach: the last device gone publishes "offline"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from legacy import wire
from legacy.framing import ProtocolViolation
from legacy.supernode.state import PRESENCE_STATUSES, has_control

if TYPE_CHECKING:
    from legacy.supernode.node import Supernode
    from legacy.supernode.protocol import SupernodeProtocol


class ClientSessions:
    """The devices attached to one supernode and what they may ask of it."""

    def __init__(self, sn: Supernode) -> None:
        self.sn = sn

    def attach(self, proto: SupernodeProtocol) -> None:
        sn = self.sn
        mem = sn.mem
        devices = mem.sessions.setdefault(proto.handle, {})
        old = devices.get(proto.device)
        devices[proto.device] = proto
        if old is not None and old is not proto:
            old.reject("replaced", "the same device logged in again")
        sn.trace.record("attach", sn.sn_id, proto.handle, proto.device)
        if proto.handle not in mem.local_status:
            mem.local_status[proto.handle] = "online"
            sn.presence.publish(proto.handle, "online", "legacy")
        sn.offline.request(proto)

    def detach(self, proto: SupernodeProtocol) -> None:
        sn = self.sn
        mem = sn.mem
        if mem is None:
            return
        devices = mem.sessions.get(proto.handle)
        if not devices or devices.get(proto.device) is not proto:
            return
        del devices[proto.device]
        sn.trace.record("detach", sn.sn_id, proto.handle, proto.device)
        if not devices:
            del mem.sessions[proto.handle]
            mem.local_status.pop(proto.handle, None)
            sn.presence.publish(proto.handle, "offline", "legacy")
            for watched in proto.watching:
                w = mem.watchers.get(watched)
                if w is not None:
                    w.pop(proto.handle, None)

    # -- client requests --------------------------------------------------------------------------

    def send(self, proto: SupernodeProtocol, f: wire.Send) -> None:
        if proto.handle not in f.members:
            raise ProtocolViolation("not_member", "the sender is not a member of the chat")
        if len(f.members) < 2 or len(set(f.members)) != len(f.members):
            raise ProtocolViolation("bad_members", "a chat needs 2 or more distinct members")
        if not f.guid or not f.chat_id:
            raise ProtocolViolation("bad_send", "guid and chat_id must not be empty")
        if has_control(f.guid, f.chat_id, *f.members):
            raise ProtocolViolation("bad_send", "ids must not contain control characters")
        if "\x00" in f.body:
            # Neither stack can store it (PostgreSQL text has no NUL), so refuse it at once.
            raise ProtocolViolation("bad_send", "the body must not contain NUL characters")
        if len(f.body) > wire.MAX_MESSAGE_CHARS:
            raise ProtocolViolation("too_long", f"the body has {len(f.body)} characters; at "
                                                f"most {wire.MAX_MESSAGE_CHARS} are allowed")
        sn = self.sn
        sn.send_to(sn.ring.home_of(f.chat_id), wire.RouteSend(
            from_sn=sn.sn_id, sender=proto.handle, device=proto.device, guid=f.guid,
            chat_id=f.chat_id, members=f.members, body=f.body))

    def set_presence(self, proto: SupernodeProtocol, f: wire.SetPresence) -> None:
        if f.status not in PRESENCE_STATUSES or f.status == "offline":
            raise ProtocolViolation("bad_status", "status must be one of online, away, busy")
        self.sn.mem.local_status[proto.handle] = f.status
        self.sn.presence.publish(proto.handle, f.status, "legacy")

    def subscribe(self, proto: SupernodeProtocol, f: wire.Subscribe) -> None:
        sn = self.sn
        mem = sn.mem
        for h in f.handles:
            watchers = mem.watchers[h]
            first = not watchers
            watchers[proto.handle] = None
            proto.watching[h] = None
            if first:
                sn.send_to(sn.ring.index_owner(h),
                           wire.PresenceSubscribe(handle=h, subscriber_sn=sn.sn_id))
            seen = mem.seen.get(h)
            if seen is not None:
                proto.send(wire.PresenceNotice(handle=h, status=seen.status,
                                               version=seen.version, expires_ms=seen.expires_ms))


#: The requests an authenticated client may make, by frame type.
CLIENT_HANDLERS: dict[type, Callable[[ClientSessions, SupernodeProtocol, Any], None]] = {
    wire.Send: ClientSessions.send,
    wire.SetPresence: ClientSessions.set_presence,
    wire.Subscribe: ClientSessions.subscribe,
}
assert set(CLIENT_HANDLERS) == set(wire.CLIENT_FRAMES)
