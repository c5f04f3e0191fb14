"""Presence: published by the user's supernode, merged at a hub, fanned out to subscribers.

    user's SN --IndexPut, PresencePublish--> index owner of the handle (its presence hub)
    subscriber's SN --PresenceSubscribe----> hub
    hub (merges its sources) --PresenceFanout--> subscribers' SNs --PresenceNotice--> watchers

The hub keeps one entry per source (a supernode, or ``peer:<origin>`` for injected presence)
and merges them, so a device logging off on one supernode does not hide the user's device
online on another. Everything carries an expiry: the user's SN refreshes it, and the sweep
sets what went stale offline, at the hub and where it was seen.

Fan-out is coalesced: a change (or a new subscription) only marks the handle as owed to the
subscriber, and at the end of the moment (``callLater(0)``) the hub sends each subscriber
one ``PresenceFanout`` with the current state of every handle it is owed. Refreshes arrive
in rounds (every user of a supernode at once), so a hub sends a few frames per subscriber
per round instead of one per handle; a handle that changed twice in one moment is sent once,
in its last state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from heapq import heappop, heappush
from typing import TYPE_CHECKING, Any

from legacy import wire
from legacy.supernode.state import PresenceEntry

if TYPE_CHECKING:
    from legacy.supernode.node import Supernode


class PresenceHub:
    """One supernode's part in presence: publisher of its users, hub of the handles it owns
    in the index, and subscriber on behalf of its users' watch lists."""

    def __init__(self, sn: Supernode) -> None:
        self.sn = sn
        #: changes of a merged status at this hub, over every incarnation (run summaries)
        self.changes = 0

    # -- publishing (the user's supernode) --------------------------------------------------------

    def next_version(self, handle: str) -> int:
        """A version for *handle*'s next put or publish: above the last, and the clock's."""
        versions = self.sn.mem.versions
        v = max(self.sn.now_ms() * 1000, versions.get(handle, 0) + 1)
        versions[handle] = v
        return v

    def publish(self, handle: str, status: str, origin: str, *, feed: bool = True,
                ttl_ms: int | None = None) -> None:
        """Tell *handle*'s hub (and, for local users, the index) its status, with an expiry."""
        sn = self.sn
        version = self.next_version(handle)
        ttl = int(sn.config.presence_ttl * 1000) if ttl_ms is None else ttl_ms
        expires = sn.now_ms() + ttl
        owner = sn.ring.index_owner(handle)
        if origin == "legacy":
            sn.send_to(owner, wire.IndexPut(handle=handle, sn_id=sn.sn_id,
                                            online=status != "offline", expires_ms=expires,
                                            version=version))
        source = sn.sn_id if origin == "legacy" else f"peer:{origin}"
        sn.send_to(owner, wire.PresencePublish(handle=handle, status=status, version=version,
                                               expires_ms=expires, origin=origin,
                                               source=source))
        if feed:
            sn.feed_append(lambda o: wire.FeedPresence(
                offset=o, handle=handle, status=status, version=version, expires_ms=expires,
                origin=origin))

    def refresh(self) -> None:
        """Re-publish local users' presence before it expires (also refreshes the index)."""
        if self.sn.mem is None:
            return
        for handle, status in list(self.sn.mem.local_status.items()):
            self.publish(handle, status, "legacy")

    # -- the hub (index owner of the handle) ------------------------------------------------------

    def on_presence_publish(self, f: wire.PresencePublish) -> None:
        sources = self.sn.mem.hub_sources.setdefault(f.handle, {})
        cur = sources.get(f.source)
        if cur is not None and f.version <= cur.version:
            return  # reordered by a hop delay: an older publish from the same source
        sources[f.source] = PresenceEntry(f.status, f.version, f.expires_ms)
        self._merge(f.handle)

    def _merge(self, handle: str) -> None:
        """Merge a handle's sources: the newest unexpired non-offline one wins, else offline.
        Fans out on every change of the merged entry (refreshes carry the new expiry)."""
        mem = self.sn.mem
        now = self.sn.now_ms()
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
        changed = cur is None or cur.status != merged.status
        if changed:
            self.changes += 1
        mem.hub[handle] = merged
        if live:
            heappush(mem.hub_expiry, (merged.expires_ms, handle))
        # A refresh that only pushes the expiry out is fanned out only once the expiry the
        # subscribers hold is within half a TTL of lapsing: every other refresh round at the
        # default 120 s TTL and 40 s refresh, and a subscriber's copy never lapses while the
        # user's supernode keeps refreshing on time.
        fanned = mem.hub_fanned.get(handle)
        if (changed or fanned is None
                or fanned < now + int(self.sn.config.presence_ttl * 500)):
            mem.hub_fanned[handle] = merged.expires_ms
            self._fanout(handle)

    def _fanout(self, handle: str) -> None:
        for subscriber in self.sn.mem.hub_subscribers.get(handle, ()):
            self._owe(subscriber, handle)

    def _owe(self, subscriber: str, handle: str) -> None:
        """Send *subscriber* *handle*'s state at the end of this moment (coalesced)."""
        mem = self.sn.mem
        owed = mem.fanout_owed
        if not owed:
            _end_of_moment(self.sn.clock).append((self, mem))
        handles = owed.get(subscriber)
        if handles is None:
            handles = owed[subscriber] = {}
        handles[handle] = None

    def _send_owed(self, mem: Any) -> None:
        """One ``PresenceFanout`` per subscriber (split past ``MAX_FANOUT_ENTRIES``), each
        with the current state of the handles it is owed."""
        sn = self.sn
        if mem is not sn.mem:
            return  # crashed since: what was owed went with the memory
        owed, mem.fanout_owed = mem.fanout_owed, {}
        hub = mem.hub
        limit = wire.MAX_FANOUT_ENTRIES
        for subscriber, handles in owed.items():
            entries = []
            for handle in handles:
                p = hub.get(handle)
                if p is not None:
                    entries.append(wire.PresenceState(handle=handle, status=p.status,
                                                      version=p.version,
                                                      expires_ms=p.expires_ms))
            for i in range(0, len(entries), limit):
                sn.send_to(subscriber, wire.PresenceFanout(entries=entries[i:i + limit]))

    def on_presence_subscribe(self, f: wire.PresenceSubscribe) -> None:
        mem = self.sn.mem
        mem.hub_subscribers.setdefault(f.handle, {})[f.subscriber_sn] = None
        if f.handle in mem.hub:
            self._owe(f.subscriber_sn, f.handle)

    # -- the subscriber (a supernode with watchers of the handle) ---------------------------------

    def on_presence_fanout(self, f: wire.PresenceFanout) -> None:
        mem = self.sn.mem
        seen = mem.seen
        for e in f.entries:
            cur = seen.get(e.handle)
            if cur is not None and e.version <= cur.version:
                continue
            seen[e.handle] = PresenceEntry(e.status, e.version, e.expires_ms)
            if e.status != "offline":
                heappush(mem.seen_expiry, (e.expires_ms, e.handle))
            if cur is None or cur.status != e.status:
                self.sn.trace.record("presence", self.sn.sn_id, e.handle, e.status)
                self._notify_watchers(e.handle, e.status, e.version, e.expires_ms)

    def _notify_watchers(self, handle: str, status: str, version: int, expires_ms: int) -> None:
        mem = self.sn.mem
        notice = wire.PresenceNotice(handle=handle, status=status, version=version,
                                     expires_ms=expires_ms)
        for watcher in mem.watchers.get(handle, ()):
            for proto in mem.sessions.get(watcher, {}).values():
                proto.send(notice)

    # -- background -------------------------------------------------------------------------------

    def sweep(self, now: int) -> None:
        """Expire stale presence: merged again at the hub, set offline where it was seen.

        Only what expired is read, by expiry then handle, from the heaps ``_merge`` and
        ``on_presence_fanout`` push to (at 1,000 supernodes, reading every entry of every
        ``seen`` map every sweep was the largest part of a steady state)."""
        sn = self.sn
        mem = sn.mem
        for handle in _expired(mem.hub_expiry, mem.hub, now):
            sn.trace.record("expire_hub", sn.sn_id, handle)
            self._merge(handle)
        seen = mem.seen
        for handle in _expired(mem.seen_expiry, seen, now):
            p = seen[handle]
            p.status = "offline"
            sn.trace.record("expire_seen", sn.sn_id, handle)
            self._notify_watchers(handle, "offline", p.version, p.expires_ms)


class _Moment:
    """The hubs that owe fan-out at the current moment of one clock, sent by one timer for
    them all (a timer per hub and moment was 6% of a 1,000-supernode steady state). It holds
    its clock weakly: the clock is its key in ``_MOMENTS``, and a network that is done with
    must not be kept alive by it."""

    def __init__(self, clock: Any) -> None:
        self._clock = weakref.ref(clock)
        self.owing: list[tuple[PresenceHub, Any]] = []

    def append(self, item: tuple[PresenceHub, Any]) -> None:
        """Have *item* = (hub, its memory) sent at the end of this moment."""
        if not self.owing:
            clock = self._clock()
            if clock is not None:
                clock.callLater(0, self._send)
        self.owing.append(item)

    def _send(self) -> None:
        owing, self.owing = self.owing, []
        failure: Exception | None = None
        for hub, mem in owing:
            try:
                hub._send_owed(mem)
            except Exception as e:  # the other hubs still send; the failure is not hidden
                failure = failure or e
        if failure is not None:
            raise failure


_MOMENTS: weakref.WeakKeyDictionary[Any, _Moment] = weakref.WeakKeyDictionary()


def _end_of_moment(clock: Any) -> _Moment:
    """The ``_Moment`` of *clock*, made on first use."""
    moment = _MOMENTS.get(clock)
    if moment is None:
        moment = _MOMENTS[clock] = _Moment(clock)
    return moment


def _expired(heap: list[tuple[int, str]], entries: dict[str, PresenceEntry],
             now: int) -> list[str]:
    """Pop from *heap* every pair due by *now*; the handles whose entry in *entries* is
    still live and expired (a pair left by an entry since replaced or set offline is
    stale), each once, by expiry."""
    out: list[str] = []
    taken: set[str] = set()
    while heap and heap[0][0] <= now:
        _, handle = heappop(heap)
        p = entries.get(handle)
        if (p is not None and p.status != "offline" and p.expires_ms <= now
                and handle not in taken):
            taken.add(handle)
            out.append(handle)
    return out


#: The supernode frames the presence hub handles, by type.
PRESENCE_HANDLERS: dict[type, Callable[[PresenceHub, Any], None]] = {
    wire.PresencePublish: PresenceHub.on_presence_publish,
    wire.PresenceSubscribe: PresenceHub.on_presence_subscribe,
    wire.PresenceFanout: PresenceHub.on_presence_fanout,
}
