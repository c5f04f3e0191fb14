"""legacy -> cloud: follow one supernode's feed and write it to the cloud store.

    supernode feed --frames--> FeedFollower --FeedBatch--> bridge.mirror: accounts, then
          ^                        |                        one transaction: conversations,
          +------- FeedCredit -----+  (after each commit)   messages, notifications, presence,
                                                            gaps and the feed checkpoint
States of one follower::

    connecting --ready--> streaming --connection lost--> backoff --timer--> connecting
        |                     |                                               ^
        +-- failed -----------+-------------------> backoff -------------------+

Delivery is at-least-once from the checkpoint and the write is idempotent, so the effect is
exactly once: the checkpoint commits in the same transaction as the data it covers, and a
replay after a reconnect or a restart changes nothing. Accounts for handles the worker has
not seen yet are created just before, in a short transaction of their own (``bridge.mirror``
says why).

Flow control is the feed's credit window: the supernode sends at most ``window`` frames
beyond what this follower has committed, and credit is granted only after a commit. When the
store is slow, credit stops and the supernode stops sending: memory stays bounded by the
window whatever the backlog (the legacy protocol's form of a paused producer).

Frames whose origin is not ``legacy`` were injected by the bridge (or another privileged
peer): they came from the cloud and are never mirrored back. The follower subscribes with
``FeedSubscribeOnly``, so the supernode sends a run of other origins' messages and presence
as one ``FeedSkipped``, not the echoes themselves (decoding each echo only to drop it was a
tenth of a worker's time in a cloud -> legacy drain). A batch of nothing but such
echoes is credited at once, without a transaction: its checkpoint is written
within ``echo_checkpoint_s``, or sooner with the next batch that mirrors something. Once most
traffic starts on the cloud, most of a feed is echoes, and a commit per batch of them (a
WAL flush each) cost the store more than the injections did; replaying echoes after a crash
changes nothing.

This module is long because the follower's states, its flow control and the commit path
share one object's state; splitting them would pass that state around.
"""

from __future__ import annotations

import enum
import random
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from bridge import mirror
from bridge.faults import FaultMoments
from bridge.ids import LEGACY_PRESENCE_PREFIX
from bridge.mirror import KnownIds, LegacyChanges, MemberList
from bridge.ops import metrics as m
from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.model import FeedCheckpoint
from cloud.store import coordination as coordination_store
from cloud.store.conversations import CHANGE, ECHO
from cloud.store.errors import StaleFence
from legacy import wire
from legacy.framing import ProtocolViolation
from legacy.network import Network
from legacy.peer import PeerConnection, connect_peer
from servicekit.retry import RetryPolicy
from servicekit.sleep import Sleeper

log = Logger()

#: The followers of this process: the to_cloud backlog gauge is their uncommitted frames,
#: summed when scraped (a gauge's inc takes a lock, and this would take it for every frame).
_FOLLOWERS: weakref.WeakSet[FeedFollower] = weakref.WeakSet()
m.BACKLOG.labels(direction="to_cloud").set_function(
    lambda: sum(f.backlog for f in list(_FOLLOWERS)))
#: Label children used for every batch or frame, looked up once (``labels`` takes a lock
#: and builds a key each time: for every echoed frame it was over half of what the follower
#: spent on it, in a cloud -> legacy drain).
_LAG = m.LAG.labels(direction="to_cloud")
_LOOPS = m.LOOPS.labels(direction="to_cloud")
_MIRRORED = m.MIRRORED.labels(direction="to_cloud")
_DUPLICATES = m.DUPLICATES.labels(direction="to_cloud")
_PRESENCE = m.PRESENCE.labels(direction="to_cloud")
_BATCH_SIZE = m.BATCH_SIZE.labels(direction="to_cloud")
_BATCH_SECONDS = m.BATCH_SECONDS.labels(direction="to_cloud")


class FollowerState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@attrs.frozen
class FollowerConfig:
    window: int = 4000          # frames the supernode may send beyond the last commit
    #: frames per transaction. A batch's cost in the store is partly per conversation (its
    #: lock and seq counter, its digest slot and dirty mark: about 20 µs each), so under a
    #: backlog larger batches pay it for more messages at once: 2,000 instead of 500 cut the
    #: drain's CPU per message by 9% (store 14%). Under light load a batch is what arrived
    #: within ``linger_s`` and this limit does not matter.
    max_batch: int = 2000
    linger_s: float = 0.002     # wait this long for more frames before committing a batch
    echo_checkpoint_s: float = 1.0  # an echo-only batch's checkpoint is written this late
    #: a batch of nothing but presence (and echoes) waits this long for more frames before
    #: it commits (None: ``linger_s``); a message, member list or gap that joins it commits
    #: the batch within ``linger_s`` of its arrival
    presence_linger_s: float | None = None
    connect_timeout_s: float = 5.0
    retry: RetryPolicy = RetryPolicy(initial_s=0.5, factor=2.0, cap_s=15.0, jitter=0.3)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.max_batch <= self.window:
            raise ValueError("max_batch must be between 1 and window")
        if (self.linger_s < 0 or self.connect_timeout_s <= 0 or self.echo_checkpoint_s < 0
                or (self.presence_linger_s is not None and self.presence_linger_s < 0)):
            raise ValueError("linger_s, presence_linger_s and echo_checkpoint_s must be >= 0 "
                             "and connect_timeout_s > 0")


@attrs.define
class FeedBatch:
    """Feed frames of one supernode not yet committed, in feed order."""

    source: str
    epoch: int
    offset: int                 # the checkpoint after this batch: next offset to read
    frames: int = 0
    chats: dict[str, list[MemberList]] = attrs.Factory(dict)  # chat id -> lists, in order
    messages: list[wire.ChatMessage] = attrs.Factory(list)
    presence: list[wire.FeedPresence] = attrs.Factory(list)
    gaps: list[dict] = attrs.Factory(list)
    loops: int = 0
    #: when it must start committing: the earliest of its frames' arrival plus their linger
    #: (``FollowerConfig.linger_s``, or ``presence_linger_s`` while it is presence alone)
    due_s: float | None = None

    def changes(self, fence: int) -> LegacyChanges:
        """What this batch mirrors, with the checkpoint that commits with it."""
        return LegacyChanges(
            chats={chat: tuple(lists) for chat, lists in self.chats.items()},
            messages=self.messages, presence=self.presence,
            presence_source=LEGACY_PRESENCE_PREFIX + self.source, gaps=self.gaps,
            checkpoint=FeedCheckpoint(self.source, str(self.epoch), self.offset, fence))


def feed_gaps(source: str, status: wire.FeedStatus,
              lost_after_ms: int | None = None) -> list[dict]:
    """The ``feed_gap`` findings' details for a ``FeedStatus`` that reports a gap.

    The status names one range: an old epoch's tail (``epoch``), another incarnation's tail
    (``ahead``: the checkpoint is beyond this feed's end in the same epoch), or what fell out
    of this feed's buffer (``expired``). After an ``epoch`` or ``ahead`` gap the stream
    resumes at this feed's ``first_offset``; when the buffer has already wrapped, this
    incarnation's ``[0, first_offset)`` is not streamed either, so it is a second,
    ``expired`` gap of its own: its messages are still in the supernode's history, and a
    reconcile pass can repair them, where the old incarnation's died with its memory.

    *lost_after_ms*, when known, is the timestamp of the last message this follower read
    from the feed: what the gap lost was appended after it, so a reconcile pass whose window
    starts at or before it has covered the gap (``reconcilers.feed_gaps.close_gap_findings``).
    """
    common = {"source": source, "epoch": status.epoch, "resumed_at": status.first_offset}
    if lost_after_ms is not None:
        common["lost_after_ms"] = lost_after_ms
    gaps = [{**common, "gap": status.gap, "gap_epoch": status.gap_epoch,
             "gap_from": status.gap_from, "gap_to": status.gap_to}]
    if status.gap in ("epoch", "ahead") and status.first_offset > 0:
        gaps.append({**common, "gap": "expired", "gap_epoch": status.epoch, "gap_from": 0,
                     "gap_to": status.first_offset})
    return gaps


class FeedFollower(Service):
    """Mirrors one supernode's feed into the cloud store, from its committed checkpoint."""

    def __init__(self, clock: IReactorTime, network: Network, address: wire.SupernodeAddress,
                 db: TransactionRunner, *, worker_id: str, secret: bytes, rng: random.Random,
                 config: FollowerConfig | None = None, fence: int = 0,
                 lease: str | None = None,
                 fault: Callable[[str], None] | None = None,
                 known: KnownIds | None = None,
                 on_streaming: Callable[[], None] | None = None,
                 supernodes: Callable[[], Sequence[str]] | None = None) -> None:
        self.setName(f"feed:{address.sn_id}")
        self.clock, self.network, self.address, self.db = clock, network, address, db
        self.worker_id, self._secret, self._rng = worker_id, secret, rng
        self.config = config or FollowerConfig()
        self.fence = fence
        #: name of the lease this follower works under (None: no fencing, a lone worker)
        self.lease = lease
        #: crash-test hook: called with each step of a commit, then with "committed"
        self.fault = fault
        #: called each time the feed starts streaming (the worker reports itself ready)
        self.on_streaming = on_streaming
        #: the supernode ids of the directory now: a feed gap records them, so the gates can
        #: tell which conversations were homed at this supernode when entries were lost
        self.supernodes = supernodes
        self.known = known if known is not None else KnownIds()
        self.state = FollowerState.IDLE
        self.peer: PeerConnection | None = None
        self.checkpoint: FeedCheckpoint | None = None
        self._pending: FeedBatch | None = None
        #: (epoch, offset) just after the last frame received; new batches start here
        self._head: tuple[int, int] = (0, 0)
        self._committing: defer.Deferred | None = None
        self._linger: Any = None
        #: when the linger timer was set to fire (``_commit_soon``)
        self._linger_due = 0.0
        #: the origin this follower's subscription asks for alone (None: the whole feed,
        #: for a supernode that does not know ``FeedSubscribeOnly``)
        self._only_origin: str | None = "legacy"
        #: the timer that writes a checkpoint only echoes moved (None: nothing unwritten)
        self._echo_timer: Any = None
        self._loop: defer.Deferred | None = None
        self._sleeper = Sleeper(clock)  # retry and backoff waits, which a stop ends
        self._failures = 0
        self.db_ok = True
        # counters for tests, status and heartbeats
        self.mirrored = 0
        self.duplicates = 0
        self.gaps = 0
        #: the timestamp of the last legacy message committed from this feed (None: none
        #: since this follower started): what a gap found later lost is younger
        self.last_read_ms: int | None = None
        #: feed entries received and not committed yet (bridge_backlog_messages)
        self.backlog = 0
        #: (time, lag seconds, met a fault) of recent commits, for the worker's heartbeat
        self.recent_lags: deque[tuple[float, float, bool]] = deque(maxlen=10_000)
        #: when this follower (re)subscribed or backed off: a message sent before a
        #: subscription waited for it (a lost feed, a gap, the worker's start)
        self.faults = FaultMoments()

    @property
    def source(self) -> str:
        return self.address.sn_id

    @property
    def connected(self) -> bool:
        return self.state is FollowerState.STREAMING

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        _FOLLOWERS.add(self)
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("feed follower {sn} died", f,
                                                    sn=self.source))

    async def _stop(self) -> None:
        self.state = FollowerState.STOPPED
        self._sleeper.wake()  # a retry or backoff wait ends now, and sees the stop
        # Drain: commit what has arrived (a clean stop leaves nothing to replay), then go.
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self._committing is not None:
            await self._committing
        if self._pending is not None and self._pending.frames and self.db_ok:
            self._commit()
            if self._committing is not None:
                await self._committing
        if self._echo_timer is not None and self.db_ok:
            self._write_echo_checkpoint()  # a clean stop leaves no echo to replay either
            if self._committing is not None:
                await self._committing
        self._cancel_echo_timer()
        if self.peer is not None:
            self.peer.disconnect()
        # what was not committed is replayed from the checkpoint by whoever follows next
        _FOLLOWERS.discard(self)

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    def crash(self) -> None:
        """Die as a SIGKILL would: nothing more is committed (what arrived and was not is
        replayed from the checkpoint by whoever follows next), the link just drops. For
        simulations and tests of invariant 4."""
        self.running = False
        self.state = FollowerState.STOPPED
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._pending = None
        self._cancel_echo_timer()
        self._sleeper.wake()
        if self.peer is not None:
            self.peer.disconnect()
        _FOLLOWERS.discard(self)

    # -- connection loop -------------------------------------------------------------------

    def _step(self, name: str) -> None:
        """A fault point of the write path (``bridge.mirror.COMMIT_STEPS``): the crash tests'
        hook, nothing otherwise."""
        if self.fault is not None:
            self.fault(name)

    @property
    def _sleep_call(self) -> IDelayedCall | None:
        """The timer of the retry or backoff wait in progress, if any (a simulated kill
        cancels it, so the wait never ends)."""
        timers = self._sleeper.timers
        return timers[-1] if timers else None

    @property
    def _stopped(self) -> bool:
        """Stopped by the service, or fenced off (another worker holds the lease)."""
        return not self.running or self.state is FollowerState.STOPPED

    async def _run(self) -> None:
        while not self._stopped:
            self.state = FollowerState.CONNECTING
            try:
                if self.checkpoint is None:
                    self.checkpoint = await self.db.run(
                        "load_checkpoint", coordination_store.load_checkpoint, self.source)
                peer = await connect_peer(self.network, self.address.host, self.address.port,
                                          name=self.worker_id, secret=self._secret,
                                          timeout=self.config.connect_timeout_s)
            except Exception as e:
                if self._stopped:
                    return
                await self._backoff("connect", e)
                continue
            if self._stopped:
                peer.disconnect()
                return
            self.peer = peer
            self._failures = 0
            epoch, offset = (0, 0)
            if self.checkpoint is not None:
                epoch, offset = int(self.checkpoint.epoch), self.checkpoint.offset
            self._head = (epoch, offset)
            self.state = FollowerState.STREAMING
            m.FEEDS_CONNECTED.inc()
            if self.on_streaming is not None:
                try:
                    self.on_streaming()
                except Exception:
                    log.failure("supernode {sn}: on_streaming callback failed", sn=self.source)
            self.faults.mark(self.clock.seconds())
            try:
                peer.subscribe(epoch, offset, self.config.window, self._on_frame,
                               only_origin=self._only_origin)
                await peer.closed
            except Exception:
                pass  # closed with a reason: handled like any lost connection
            finally:
                m.FEEDS_CONNECTED.dec()
                self.peer = None
            if (peer.refused is not None and peer.refused.code == "unknown_type"
                    and self._only_origin is not None):
                # A supernode older than FeedSubscribeOnly: follow its whole feed, echoes
                # and all, as before it (they are dropped here).
                log.warn("supernode {sn} does not know FeedSubscribeOnly; following its "
                         "whole feed", sn=self.source)
                self._only_origin = None
            if self._stopped:
                return
            # What was not committed will be sent again from the checkpoint.
            if self._linger is not None and self._linger.active():
                self._linger.cancel()
            if self._pending is not None:
                self.backlog -= self._pending.frames
                self._pending = None
            if self._committing is not None:
                await self._committing
            await self._backoff("feed", ConnectionError("feed connection lost"))

    async def _backoff(self, what: str, reason: Exception) -> None:
        self.faults.mark(self.clock.seconds())
        self.state = FollowerState.BACKOFF
        self._failures += 1
        m.RETRIES.labels(what=what).inc()
        delay = self.config.retry.delay(self._failures, self._rng)
        if self._failures == 1:
            log.info("supernode {sn}: {what} failed ({why}); retrying with backoff",
                     sn=self.source, what=what, why=str(reason) or type(reason).__name__)
        await self._sleeper.sleep(delay)

    # -- frames ----------------------------------------------------------------------------

    def _batch(self) -> FeedBatch:
        if self._pending is None:
            self._pending = FeedBatch(self.source, *self._head)
        return self._pending

    def _on_frame(self, f: Any) -> None:
        batch = self._batch()
        if isinstance(f, wire.FeedStatus):
            batch.epoch = f.epoch
            if f.gap != "none":
                # Resuming after a gap: the ranges are recorded for the reconcilers, and the
                # checkpoint moves past them (they can never be read from this feed again).
                for gap in feed_gaps(self.source, f, self.last_read_ms):
                    if self.supernodes is not None:  # the ring its lost messages were on
                        gap["ring"] = sorted(self.supernodes())
                    self.gaps += 1
                    m.FEED_GAPS.labels(kind=gap["gap"]).inc()
                    batch.gaps.append(gap)
                if f.gap == "ahead":
                    log.warn("supernode {sn}: checkpoint {at} is ahead of its feed (next "
                             "offset {next}) in epoch {epoch}: another incarnation's; "
                             "reading this feed from its start", sn=self.source,
                             at=f.gap_from, next=f.next_offset, epoch=f.epoch)
                batch.offset = f.first_offset
                self._head = (batch.epoch, batch.offset)
                self._commit_soon(batch)
            self._head = (batch.epoch, batch.offset)
            return  # a status is not a feed entry: it takes no credit
        skipped = type(f) is wire.FeedSkipped
        if skipped and (f.offset != batch.offset or f.next_offset <= f.offset):
            # it would skip entries unread, or move the checkpoint back
            raise ProtocolViolation("bad_skip", f"FeedSkipped [{f.offset}, "
                                                f"{f.next_offset}) at offset {batch.offset}")
        batch.frames += 1
        batch.offset = f.next_offset if skipped else f.offset + 1
        if skipped:
            # messages and presence of other origins, left out by the supernode: echoes
            batch.loops += 1
            _LOOPS.inc(f.next_offset - f.offset)
        elif isinstance(f, wire.FeedMessage):
            if f.message.origin == "legacy":
                batch.messages.append(f.message)
            else:
                batch.loops += 1
                _LOOPS.inc()
        elif isinstance(f, wire.FeedChat):
            # A legacy client's list is a change to mirror; the bridge's own injections
            # come back too and are only remembered (no loops).
            batch.chats.setdefault(f.chat_id, []).append(
                (tuple(f.members), CHANGE if f.origin == "legacy" else ECHO))
        elif isinstance(f, wire.FeedPresence):
            if f.origin == "legacy":
                batch.presence.append(f)
            else:
                _LOOPS.inc()
        self._head = (batch.epoch, batch.offset)
        self.backlog += 1
        self._commit_soon(batch)

    def _commit_soon(self, batch: FeedBatch, *, arrived: bool = True) -> None:
        """Commit *batch* once it is full or due. *arrived*: a frame just joined it, and
        makes it due within its linger. Else the commit before it just ended: it goes when
        its frames made it due, and at least linger_s from now (a batch that came due while
        that commit ran does not wait a whole presence linger again)."""
        if batch.frames >= self.config.max_batch:
            self._commit()
            return
        config = self.config
        now = self.clock.seconds()
        if arrived:
            linger = config.linger_s
            if (config.presence_linger_s is not None and not batch.messages
                    and not batch.chats and not batch.gaps):
                # Presence alone is not urgent: nothing waits on it but the presence itself,
                # and a transaction per presence change was most of a quiet feed's commits.
                linger = config.presence_linger_s
            if batch.due_s is None or now + linger < batch.due_s:
                batch.due_s = now + linger  # what just joined the batch is more urgent
        if batch.due_s is None:
            return  # nothing in it has arrived yet
        if self._committing is not None:
            # The commit in flight schedules this batch when it ends: a timer now would only
            # fire into it (and once the batch is due, every frame would set one).
            return
        due = batch.due_s
        if not arrived:
            # Due already, it goes linger_s after the commit before it ended, not at once: a
            # timer of 0 runs before the reactor reads the frames waiting in its sockets,
            # which then waited for the commit after (p50 lag +20 ms at 12,000 msgs/s).
            due = max(due, now + config.linger_s)
        delay = max(0.0, due - now)
        if self._linger is None or not self._linger.active():
            self._linger = self.clock.callLater(delay, self._commit)
            self._linger_due = due
        elif due < self._linger_due:
            # (compared with the due time it was set for: the timer's own time is now + delay,
            # which rounding can put a hair after it, and every frame then reset it)
            self._linger.reset(delay)
            self._linger_due = due

    def _commit(self) -> None:
        """Start committing the pending batch, unless a commit is already in flight (then the
        batch keeps growing, up to the credit window, and goes next)."""
        if self._committing is not None or self._pending is None:
            return
        if self._pending.frames == 0 and not self._pending.gaps:
            return
        batch, self._pending = self._pending, None
        if batch.frames == batch.loops and not batch.gaps and self.peer is not None:
            self._pass_echoes(batch)
            return
        self._start_write(batch)

    def _pass_echoes(self, batch: FeedBatch) -> None:
        """Credit a batch of nothing but echoed messages at once, with no transaction; its
        checkpoint is written later (``_write_echo_checkpoint``) unless a batch that mirrors
        something writes a later one first."""
        self.checkpoint = FeedCheckpoint(batch.source, str(batch.epoch), batch.offset,
                                         self.fence)
        self.backlog -= batch.frames
        if self.peer is not None:
            self.peer.credit(batch.frames)
        if self._echo_timer is None:
            self._echo_timer = self.clock.callLater(self.config.echo_checkpoint_s,
                                                    self._write_echo_checkpoint)

    def _cancel_echo_timer(self) -> None:
        if self._echo_timer is not None and self._echo_timer.active():
            self._echo_timer.cancel()
        self._echo_timer = None

    def _write_echo_checkpoint(self) -> None:
        """Write the checkpoint echoes moved, as a batch of no frames; a commit in flight or
        a pending batch carries a later one anyway."""
        self._cancel_echo_timer()
        fenced_off = self.running and self.state is FollowerState.STOPPED
        if fenced_off or self.checkpoint is None:
            return
        if self._committing is not None or self._pending is not None:
            return  # their checkpoint is the later one
        at = self.checkpoint
        self._start_write(FeedBatch(at.source, int(at.epoch), at.offset))

    def _start_write(self, batch: FeedBatch) -> None:
        d = defer.Deferred.fromCoroutine(self._write(batch))
        if not d.called:  # a runner that answers at once (tests) has finished already
            self._committing = d

    async def _write(self, batch: FeedBatch) -> None:
        self._cancel_echo_timer()  # this batch's checkpoint covers any echoes before it
        attempt = 0
        try:
            while True:
                started = self.clock.seconds()
                try:
                    changes = batch.changes(self.fence)
                    new = mirror.new_handles(changes, self.known)
                    if new:
                        found, n = await self.db.run("ensure_accounts", mirror.ensure_accounts,
                                                     new, self._step)
                        self.known.learn(found, {})
                        m.ACCOUNTS_CREATED.inc(n)  # committed, whatever becomes of the batch
                    outcome = await self.db.run(
                        "commit_plan", mirror.commit_plan, mirror.translate(changes, self.known),
                        int(started * 1000),
                        lease=None if self.lease is None else (self.lease, self.worker_id),
                        fence=self.fence, step=self._step)
                    break
                except StaleFence:
                    log.warn("supernode {sn}: checkpoint held under a newer fence; "
                             "this worker stops following it", sn=self.source)
                    self.state = FollowerState.STOPPED
                    if self.peer is not None:
                        self.peer.disconnect()
                    return
                except Exception as e:
                    attempt += 1
                    m.RETRIES.labels(what="commit").inc()
                    if isinstance(e, DatabaseUnavailable):
                        if self.db_ok:
                            log.warn("supernode {sn}: database unavailable ({e}); "
                                     "holding the feed and retrying", sn=self.source, e=e)
                        self.db_ok = False
                    else:
                        log.failure("supernode {sn}: committing a feed batch failed; "
                                    "retrying", sn=self.source)
                    if self._stopped:
                        return  # the batch is replayed from the checkpoint by whoever follows
                    await self._sleeper.sleep(self.config.retry.delay(attempt, self._rng))
                    if self._stopped:
                        return
            self.db_ok = True
            if self.fault is not None:
                self.fault("committed")  # committed, not yet credited or remembered
            self.known.learn({}, outcome.chats)
            result = outcome.result
            now = self.clock.seconds()
            self.checkpoint = FeedCheckpoint(batch.source, str(batch.epoch), batch.offset,
                                             self.fence)
            inserted = len(result.inserted)
            self.mirrored += inserted
            self.duplicates += result.duplicates
            _MIRRORED.inc(inserted)
            _DUPLICATES.inc(result.duplicates)
            _PRESENCE.inc(len(batch.presence))
            if outcome.members_added or outcome.members_removed:
                m.MEMBER_CHANGES.labels(direction="to_cloud", change="added").inc(
                    outcome.members_added)
                m.MEMBER_CHANGES.labels(direction="to_cloud", change="removed").inc(
                    outcome.members_removed)
            _BATCH_SIZE.observe(len(batch.messages))
            _BATCH_SECONDS.observe(now - started)
            self.backlog -= batch.frames
            if batch.messages:
                self.last_read_ms = max(self.last_read_ms or 0,
                                        max(msg.ts_ms for msg in batch.messages))
            lags = [max(0.0, now - msg.sent_ms / 1000) for msg in result.inserted]
            _LAG.observe_many(lags)
            self.recent_lags.extend((now, lag, self.faults.met(now - lag, now)) for lag in lags)
            if self.peer is not None and batch.frames:
                self.peer.credit(batch.frames)
        finally:
            self._committing = None
        if self._pending is not None and self.running:
            # what arrived meanwhile goes when it is due, linger_s from now at the earliest
            self._commit_soon(self._pending, arrived=False)
