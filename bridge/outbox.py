"""Cloud -> legacy: drain ``outbox_to_legacy`` into the legacy network.

``cloud.store.messages.post_message`` writes an outbox row in the message's own transaction and
NOTIFYs ``outbox_to_legacy`` with the conversation's id; ``bridge.outbox_listener.OutboxListener``
hands each notification to ``OutboxInjector.notified``, which wakes the loop unless a pass of
its own holds that conversation, and the injector's poll is the fallback for a missed one.

One outbox row (``outbox_to_legacy.state``)::

              claim (attempts + 1, invisible for claim_s)   answer new / duplicate
    pending -----------------------------------------> inject --------------------> done
       ^                                                 |  |                (message gets
       |                                                 |  |                 its legacy GUID)
       +-- release: due at now + policy.delay(attempts) -+  |
       |   (no peer, timeout, connection lost, not_home;    +-- nobody on legacy, or legacy
       |    the conversation's later rows go back too,         refuses it for good --> skipped
       |    untried: their claim's attempt is given back)      (refusals: + finding
       |                                                        inject_refused)
       +-- the failure was attempt max_attempts, or the row is older than max_age_s
           --> failed (+ finding inject_failed; the later rows go on)

A conversation's consecutive message rows go in one InjectBatch (one frame, one answer with a
result per row; ``bridge.outbox_inject`` packs them). A row of kind ``members`` (a
membership change made on the cloud) takes the same path and the same order, as an
InjectMembership of its delta (``inject_membership_change``), a request of its own.

The GUID is derived from the cloud message id (``bridge.ids``), so injecting a row again
after a crash between the answer and ``complete_outbox`` is a no-op on the legacy side
(``duplicate``). Each claim carries a token; completes and releases touch only rows still held
under it, so a late one from a claim that ran out changes nothing (counted in
``late_claims``, logged).

Order per conversation, pipelined: a claim's rows are all sent at once (at most ``window``
rows in flight per worker), each conversation's in seq order on the one connection to its
home supernode, which serves a connection's requests, and a batch's items, in the order
they arrive; so the rows it accepted are a prefix of those sent (less any it refused for
good: a refused item does not stop the items after it, which it applies on their own).
From the first row that failed (an item, or a whole request: timeout, connection lost,
not_home), the conversation's later rows go back together, and ``claim_outbox`` never
hands out a row while an earlier one of its conversation is still claimed. The rows
acknowledged in one pass are completed together in one transaction
(``complete_outbox_batch``). The one race left: a ring change that makes the supernode the
chat's home between two of its rows would accept the later row after refusing the earlier
one (``not_home``), which then arrives after it.

Passes overlap: a tick claims a batch and starts its pass (inject, then record), and the
next tick claims the next batch while it runs, up to ``passes`` at once; claims hold whole
conversations, so that changes no order. A pass that ends wakes the loop for the rows that
waited behind it. The loop is the dispatcher's (``cloud.dispatcher``)::

    idle --start--> waiting --timer or wake()--> ticking --claimed a full batch, or woken--> ticking
                       ^                            |
                       +-- claimed less, or none ---+   stop: cancel the timer, or wait for
                                                        the tick and the passes in flight
                                                        (which inject no further row)

An operator controls it at runtime through the store (``bridgectl control``; the worker
applies what its heartbeat read): paused, a tick claims nothing while the passes in flight
finish; ``injector-concurrency N`` resizes the window in place (``set_window``).

This module is long because the claim, the pass, the pipelined sends and the recording of
each outcome all turn on the same claim token and order argument; split, that argument would
be spread over files that each hold half of it.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import psycopg
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge import ids
from bridge.faults import FaultMoments
from bridge.ops import metrics
from bridge.outbox_config import InjectorConfig
from bridge.outbox_inject import (
    MESSAGE_ACCEPTED,
    REFUSALS,
    Request,
    Retry,
    Row,
    RowWindow,
    Unexpected,
    outcomes_of_failure,
    plan_requests,
)
from bridge.outbox_membership import MEMBERSHIP_APPLIED, ORIGIN
from cloud.db import DatabaseUnavailable, TransactionRunner, pipeline
from cloud.store import outbox as outbox_store
from cloud.store.outbox import (
    OutboxItem,
    fail_outbox_item,
    refuse_outbox_item,
    release_outbox_items,
)
from legacy import wire
from legacy.peer import PeerConnection
from servicekit.loop import PollingLoop, failure_counter
from servicekit.timeouts import FifoTimeouts

log = Logger()

DIRECTION = "to_legacy"

OUTBOX_LOOP_FAILURES = failure_counter(
    "bridge_outbox_loop_failures_total",
    "Outbox injector passes (or conversations within one) that failed; the loop carries on.")
_RETRIES = metrics.RETRIES.labels(what="inject")
# the series this direction writes, looked up once (``labels`` costs a lock and a dict each)
_MIRRORED = metrics.MIRRORED.labels(direction=DIRECTION)
_DUPLICATES = metrics.DUPLICATES.labels(direction=DIRECTION)
_LAG = metrics.LAG.labels(direction=DIRECTION)
_MEMBERS_ADDED = metrics.MEMBER_CHANGES.labels(direction=DIRECTION, change="added")
_MEMBERS_REMOVED = metrics.MEMBER_CHANGES.labels(direction=DIRECTION, change="removed")
_BATCH_SIZE = metrics.BATCH_SIZE.labels(direction=DIRECTION)
_BATCH_SECONDS = metrics.BATCH_SECONDS.labels(direction=DIRECTION)
_BACKLOG = metrics.BACKLOG.labels(direction=DIRECTION)


class LegacyPeers(Protocol):
    """Privileged connections into the legacy network (the worker keeps them over TCP)."""

    def for_chat(self, chat_id: str) -> PeerConnection | None:
        """A ready connection to the chat's home supernode, or None if it is unreachable now."""

    def any(self) -> PeerConnection | None:
        """A ready connection to any supernode, or None if none is reachable now."""


# ---------------------------------------------------------------- the injector

def _forget(sent: Sequence[tuple[Any, defer.Deferred]]) -> None:
    """Requests whose answers nobody will read: their failures are not errors to log."""
    for _, d in sent:
        d.addErrback(lambda _f: None)


def _members(item: OutboxItem) -> tuple[str, ...]:
    """The handles a message row goes to: distinct, sorted."""
    return tuple(sorted(set(item.member_handles)))


def _refusal(item: OutboxItem, members: tuple[str, ...]) -> str | None:
    """Why legacy will never take the message *item* sent to *members* (``_members``), or
    None when it will."""
    if len(members) < 2:
        return "fewer than 2 distinct members"
    if item.sender_handle not in members:
        return "the sender is not among the members"
    return None


def _would_send(item: OutboxItem) -> bool:
    """Whether ``OutboxInjector._prepare`` sends *item* (rather than skip it: nobody on
    legacy, or refuse it for good: a message legacy can not deliver)."""
    if item.legacy_client_members == 0:
        return False
    return item.kind == outbox_store.MEMBERS or _refusal(item, _members(item)) is None


def _message_row(item: OutboxItem, chat_id: str, members: tuple[str, ...]) -> Row:
    """The message row *item* as it is injected into chat *chat_id*, to *members*."""
    # the GUID the store gave it (one made here only for a message queued without)
    guid = item.legacy_guid or ids.guid_for_cloud_message(item.message_id)
    message = wire.ChatMessage(chat_id=chat_id, guid=guid, legacy_seq=0,
                               sender=item.sender_handle, ts_ms=item.sent_ms, body=item.body,
                               origin=ORIGIN)
    return Row(outbox_store.Injected(item, chat_id, guid), message, members)


def record_pass(conn: psycopg.Connection, rows: list[outbox_store.Injected],
                conversations: list[uuid.UUID], now_ms: int) -> tuple[list[OutboxItem], bool]:
    """A pass's completion and, in the same transaction, whether a row of its conversations
    is due now (one that came while the pass held them, or was handed back). Both go in one
    pipeline: one round trip."""
    with pipeline(conn):
        done = outbox_store.send_completion(conn, rows, now_ms)
        due = outbox_store.send_any_due(conn, conversations, now_ms)
    return done(), due()


class OutboxInjector(PollingLoop):
    """Injects claimed outbox rows through *peers*, records outcomes through *db*."""

    description = "outbox injector"
    failure_counter = OUTBOX_LOOP_FAILURES

    def __init__(self, clock: IReactorTime, db: TransactionRunner, peers: LegacyPeers,
                 rng: random.Random, config: InjectorConfig | None = None, *,
                 name: str = "outbox-injector") -> None:
        self.config = config if config is not None else InjectorConfig()
        super().__init__(clock, self.config.poll_interval_s, name)
        self._db = db
        self._peers = peers
        self._rng = rng
        # Claim tokens come from a stream of their own, seeded from *rng*'s state without
        # drawing from it: a seeded run stays deterministic and its retry jitter unchanged.
        self._tokens = random.Random(repr((rng.getstate(), name)))
        #: Rows injected new, acknowledged as duplicates, skipped; failed injections
        #: (released for a retry). ``ticks`` and ``loop_failures`` come from PollingLoop.
        self.injected = 0
        #: (time, lag seconds, met a fault) of recent injections, for the worker's heartbeat
        self.recent_lags: deque[tuple[float, float, bool]] = deque(maxlen=10_000)
        #: when this injector met a fault (its start, a failed injection, a lost claim, the
        #: database down): a row that waited across one has lag from the fault
        self.faults = FaultMoments()
        self.duplicates = 0
        #: Membership change rows applied at their chat's home.
        self.membership_changes = 0
        self.skipped = 0
        self.failures = 0
        #: Rows given up (state failed, with an inject_failed finding).
        self.given_up = 0
        #: Rows a late complete, release or skip found held by a newer claim (nothing written).
        self.late_claims = 0
        #: Pending rows and the age in ms of the oldest, as last read (every backlog_every_s).
        self.backlog: tuple[int, int | None] = (0, None)
        self._backlog_read_at: float | None = None
        self._recorded_since_count = False
        self._window = RowWindow(self.config.window)
        #: an operator paused injection (``bridgectl control pause injection``): no claim
        self.paused = False
        self._passes = defer.DeferredSemaphore(self.config.passes)
        #: every injection's time limit, on one timer (``servicekit.timeouts``)
        self._limits = FifoTimeouts(clock, self.config.inject_timeout_s)
        #: passes (claims being injected and recorded) not finished yet
        self._in_flight: set[defer.Deferred] = set()
        #: the conversations those passes hold (how many passes hold each)
        self._held: dict[uuid.UUID, int] = {}
        #: while a tick claims: the conversations NOTIFYs named meanwhile (None otherwise)
        self._claiming: set[uuid.UUID] | None = None
        #: held conversations a NOTIFY named while a pass held them
        self._noticed: set[uuid.UUID] = set()

    def notified(self, conversation: str | None = None) -> None:
        """A NOTIFY: a row of *conversation* (the payload, a conversation id) is pending.
        Wake the loop, unless a pass of this injector holds that conversation: a claim
        would find its head held (or, where the pass handed the conversation's rows back
        early, due only after their retry delay), and the pass that ends wakes the loop.
        (At 4,000 posts/s over 200 conversations, every pass held them all, and most claims
        that NOTIFYs started during a pass found nothing.) One that comes while a claim
        runs is kept until the claim is in: it wakes the loop then only if the claim left
        its conversation (``_tick``). No payload, or any other (LISTEN just began and rows
        may have come in unannounced; a back-fill names an account): wake."""
        cid = None
        if conversation is not None and (self._held or self._claiming is not None):
            try:
                cid = uuid.UUID(conversation)
            except ValueError:
                pass
        if cid is None:
            self.wake()
        elif cid in self._held:
            self._noticed.add(cid)  # the pass that holds it wakes the loop when it ends
        elif self._claiming is not None:
            self._claiming.add(cid)  # the claim running may take it: see _tick
        else:
            self.wake()

    # -- runtime controls (``bridgectl control``, applied by the worker's heartbeat) -----

    def set_paused(self, paused: bool) -> None:
        """Claim nothing while *paused* (passes in flight finish as usual); claim at once
        when it ends."""
        was, self.paused = self.paused, paused
        if was and not paused and self.running:
            self.wake()

    def set_window(self, window: int | None) -> None:
        """At most *window* rows in flight from now on (None: ``config.window``): more are
        sent at once, or fewer as the answers come in; none is cut short, and batches planned
        from now on hold at most *window* rows."""
        self._window.resize(self.config.window if window is None else window)

    @property
    def window(self) -> int:
        """Most rows in flight at once, as it stands now."""
        return self._window.limit

    async def _tick(self) -> bool:
        """Claim one batch and start its pass (injecting and recording it) without waiting
        for it: up to ``passes`` run at once. True when it claimed a full batch (more is
        probably due). Paused: claims nothing (the backlog is still counted)."""
        self._claiming = set()
        try:
            await self._passes.acquire()
        except BaseException:
            self._claiming = None  # NOTIFYs wake the loop again
            raise
        started = False
        items: list[OutboxItem] = []
        try:
            if not self.running:
                return False
            if not self.paused:
                claimed = await self._claim()
                if claimed is None:
                    return False  # the database is down
                items, claimed_until_ms = claimed
            if items:
                done = defer.Deferred.fromCoroutine(
                    self._pass(items, self._clock.seconds(), claimed_until_ms))
                started = True
                self._in_flight.add(done)
                done.addBoth(self._pass_ended, done)
        finally:
            if not started:
                self._passes.release()
            # A NOTIFY that came while this claim ran names a conversation the claim took
            # (its pass holds it now: the pass that ends wakes the loop for what came
            # after), or one it left, which is claimed again at once. Waking for all of
            # them made every claim under steady load followed by one that found nothing
            # but held conversations (6-18 ms of the server's time each at 5,000 posts/s).
            noticed, self._claiming = self._claiming, None
            if noticed and any(cid not in self._held for cid in noticed):
                self.wake()
        # at rest (nothing claimed, nothing in flight) after rows were recorded, count again
        # at once: the count is cheap then, and a drained outbox reads 0 without a delay
        await self._read_backlog(force=self._recorded_since_count and not items
                                 and not self._in_flight)
        # Tick again at once only after a full claim: more of other conversations is
        # probably due. After one that was not full, every conversation ready was taken,
        # and what is left waits behind this claim's conversations (a conversation over its
        # share; a post whose NOTIFY was left out because an earlier row of its
        # conversation was waiting: cloud.store.messages): the pass that ends wakes the
        # loop for it. (Ticking again after any claim found nothing but held conversations:
        # a third of a simulation's claims, one more transaction for each post.)
        return len(items) >= self.config.batch

    async def _claim(self) -> tuple[list[OutboxItem], int] | None:
        """Claim one batch: (its rows, when the claim runs out in ms), or None when the
        database is down."""
        cfg = self.config
        now_ms = self._now_ms()
        claim_ms = round(cfg.claim_s * 1000)
        try:
            token = uuid.UUID(int=self._tokens.getrandbits(128), version=4)
            items = await self._db.run("claim_outbox", outbox_store.claim_outbox, now_ms,
                                       cfg.batch, claim_ms, cfg.per_conversation, token)
        except DatabaseUnavailable as e:
            self._database_down(e)
            return None
        self._database_up()
        return items, now_ms + claim_ms

    @property
    def passes_in_flight(self) -> int:
        """Claims whose rows are being injected or recorded now."""
        return len(self._in_flight)

    def _pass_ended(self, more: Any, done: defer.Deferred) -> None:
        self._in_flight.discard(done)
        self._passes.release()
        if self.running and more is not False:
            self.wake()  # rows waiting behind this pass's claims are due now

    async def _pass(self, items: list[OutboxItem], started: float,
                    claimed_until_ms: int) -> bool:
        """Inject one claim's rows, conversations side by side, and record the acknowledged
        ones in one transaction; never raises. Whether rows of its conversations may be due
        now (then the loop claims again at once): False only when the transaction that
        recorded them found none due (``record_pass``) and no NOTIFY named one of
        them meanwhile. (Waking after every pass made every post of a quiet period cost an
        empty claim besides its own: 11,187 claims for 4,761 posts in two simulated days.)"""
        by_conversation: dict[Any, list[OutboxItem]] = {}
        for item in items:  # claim_outbox returns them in seq order per conversation
            by_conversation.setdefault(item.conversation_id, []).append(item)
        held = self._held
        # the pass's own list: _map_cloud_chats takes conversations out of by_conversation
        # (those whose chat ids could not be recorded), and they must be let go all the same
        conversations = list(by_conversation)
        for cid in conversations:
            held[cid] = held.get(cid, 0) + 1
        more = True
        try:
            more = await self._inject_and_record(by_conversation, started, claimed_until_ms)
        finally:
            noticed = self._noticed
            for cid in conversations:
                if cid in noticed:
                    more = True  # and kept until no pass holds it: each one that ends looks
                if held[cid] == 1:
                    del held[cid]
                    noticed.discard(cid)
                else:
                    held[cid] -= 1
        return more

    async def _inject_and_record(self, by_conversation: dict[Any, list[OutboxItem]],
                                 started: float, claimed_until_ms: int) -> bool:
        """The pass's work; False only when its recording found nothing due behind it."""
        if not await self._map_cloud_chats(by_conversation):
            return True  # not recorded: the rows come due again when their claim runs out
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._conversation(rows, claimed_until_ms))
             for rows in by_conversation.values()],
            consumeErrors=True)
        # Acknowledged rows stay claimed until here; the later rows of a conversation
        # that went back wait behind them, so order holds.
        try:
            more = await self._complete([ok for acked in results for ok in acked],
                                        list(by_conversation))
        except DatabaseUnavailable as e:
            # Not recorded: the rows come due again when their claim runs out, and
            # injecting them again then is a no-op on the legacy side (duplicates).
            self._database_down(e)
            return True
        except Exception:
            self.loop_failures += 1
            OUTBOX_LOOP_FAILURES.labels(reason="error").inc()
            log.failure("recording an injected batch failed unexpectedly; its rows come due "
                        "again when their claim runs out")
            return True
        _BATCH_SIZE.observe(sum(len(rows) for rows in by_conversation.values()))
        _BATCH_SECONDS.observe(self._clock.seconds() - started)
        return more

    async def _map_cloud_chats(self, by_conversation: dict[Any, list[OutboxItem]]) -> bool:
        """Record the chat ids made up for the cloud-born conversations whose first rows
        this pass sends, in one transaction before any is sent (legacy echoes the chat back
        at once: ``outbox_store.map_cloud_chats`` says why it must be recorded first); the
        rows carry them from ``_prepare`` on, so their completion does not record them
        again. A conversation none of whose rows would be sent (nobody on legacy, or every
        row refused) gets none. Should that transaction fail unexpectedly, those
        conversations' rows go back untried (due after the retry delay) and leave the
        pass; the others go on. False only when the database is down: nothing of the pass
        is sent."""
        fresh = {cid: ids.chat_for_cloud_conversation(cid)
                 for cid, rows in by_conversation.items()
                 if rows[0].legacy_chat_id is None and any(map(_would_send, rows))}
        if not fresh:
            return True
        try:
            await self._db.run("map_cloud_chats", outbox_store.map_cloud_chats, fresh)
        except DatabaseUnavailable as e:
            self._database_down(e)
            return False
        except Exception:
            self.loop_failures += 1
            OUTBOX_LOOP_FAILURES.labels(reason="error").inc()
            log.failure("recording the chat ids of {count} cloud-born conversations failed "
                        "unexpectedly; their rows go back for a retry", count=len(fresh))
            back = [item for cid in fresh for item in by_conversation.pop(cid)]
            try:
                await self._hand_back(back, "their conversation's legacy chat id could not "
                                      "be recorded", self._now_ms()
                                      + round(self.config.retry.delay(1, self._rng) * 1000))
            except DatabaseUnavailable as e:
                self._database_down(e)
                return False
        return True

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        """Stop claiming; fires once the tick and every pass in flight have finished (a
        pass injects no further row once stopping: its rows go back, due at once)."""
        stopped = super().stopService()
        passes = list(self._in_flight)
        if not passes:
            return stopped
        return defer.gatherResults([stopped, *passes], consumeErrors=True).addBoth(
            lambda _: None)

    async def _read_backlog(self, *, force: bool = False) -> None:
        """Count the pending rows, at most every ``backlog_every_s`` unless *force*: the
        heartbeat reports them, the metrics show them, and the migration gate reads the
        oldest's age."""
        now = self._clock.seconds()
        if (not force and self._backlog_read_at is not None
                and now - self._backlog_read_at < self.config.backlog_every_s):
            return
        try:
            self.backlog = await self._db.run("outbox_backlog", outbox_store.outbox_backlog,
                                              self._now_ms())
        except DatabaseUnavailable as e:
            self._database_down(e)
            return
        self._backlog_read_at = now
        self._recorded_since_count = False
        pending, oldest_ms = self.backlog
        _BACKLOG.set(pending)
        metrics.OUTBOX_PENDING.set(pending)
        metrics.OUTBOX_OLDEST_AGE.set(0.0 if oldest_ms is None else oldest_ms / 1000)

    async def _conversation(self, items: list[OutboxItem],
                            claimed_until_ms: int) -> list[tuple[outbox_store.Injected, Any]]:
        """Inject one conversation's claimed rows, pipelined on its home's connection in seq
        order, and return the acknowledged ones (with their answers) for the pass to record;
        never raises.

        The rows go as requests (``bridge.outbox_inject``: a batch per run of messages, a
        membership change alone), every one sent before the first answer is awaited. The
        supernode serves one connection's requests, and a batch's items, in the order they
        were sent, so the rows it accepted are always a prefix of those sent, less the ones
        it refused for good (a refused item does not stop the items after it: each is
        applied on its own). From the first row that failed (an item, or a whole request:
        timeout, lost connection, not_home), the rest go back together (those still in
        flight are forgotten: injected again later, they are acknowledged as duplicates).
        """
        timeout_ms = round(self.config.inject_timeout_s * 1000)
        sent: list[tuple[Request, defer.Deferred]] = []
        unsent: list[OutboxItem] = []
        failed: str | None = None  # why unsent[0] failed (tried); None: handed back untried
        try:
            rows = []
            members: tuple[str, ...] = ()
            handles: tuple[str, ...] | None = None
            for item in items:
                if item.member_handles != handles:  # a run's rows mostly share one list
                    handles = item.member_handles
                    members = _members(item)
                row = self._ready(item, members)
                if row is None:  # the rare cases, which may write: skip, refuse, evolve
                    row = await self._prepare(item)
                if row is not None:  # else skipped or refused, and recorded
                    rows.append(row)
            # most rows in one request: a batch never holds more than the window lets in
            requests = plan_requests(rows, min(self.config.inject_batch, self._window.limit))
            if not requests:
                return []
            peer = self._peers.for_chat(requests[0].chat_id)
            if peer is None:
                await self._release([row.item for row in rows], "home supernode of "
                                    f"{requests[0].chat_id!r} is unreachable")
                return []
            r = 0
            while r < len(requests):
                request = requests[r]
                taking = self._window.take(len(request.rows))
                if taking is not None:
                    await taking
                if not self.running or self._now_ms() + timeout_ms > claimed_until_ms:
                    # Stopping, or the claim could run out mid-injection and let another
                    # worker overtake: hand the rest back, due at once.
                    self._window.give_back(len(request.rows))
                    unsent = [row.item for req in requests[r:] for row in req.rows]
                    break
                try:
                    sent.append((request, self._send(peer, request)))
                except wire.WireError:
                    # A row the wire format can not carry (rare: _send gave its slots back):
                    # refuse it for good and send the others.
                    requests[r:r + 1] = await self._drop_unencodable(request)
                    continue
                r += 1
            acked: list[tuple[outbox_store.Injected, Any]] = []
            for j, (request, d) in enumerate(sent):
                carried, k, why = request.rows, 0, None
                try:
                    outcomes = await d
                except Retry as e:
                    why = str(e)
                else:
                    if len(outcomes) != len(carried):
                        why = (f"the supernode answered {len(outcomes)} results for "
                               f"{len(carried)} rows")
                        outcomes = ()
                    for k, outcome in enumerate(outcomes):
                        row = carried[k]
                        if outcome.status in (MESSAGE_ACCEPTED if row.message is not None
                                              else MEMBERSHIP_APPLIED):
                            acked.append((row.injected, outcome))
                            continue
                        if (isinstance(outcome, wire.InjectResult)
                                and outcome.status == "failed" and outcome.code in REFUSALS):
                            await self._refuse(row.item, request.chat_id,
                                               f"the supernode refused it: {outcome.reason}")
                            continue
                        why = f"unexpected answer {outcome.status!r} from the supernode"
                        break
                    if why is None:
                        continue
                _forget(sent[j + 1:])  # still in flight: see the docstring
                unsent = ([row.item for row in carried[k:]]
                          + [row.item for later, _ in sent[j + 1:] for row in later.rows]
                          + unsent)
                failed = why
                break
            if unsent and failed is None:
                await self._hand_back(unsent, "handed back unattempted (stopping or claim "
                                      "ending)", self._now_ms())
            elif unsent:
                await self._release(unsent, failed)
            return acked
        except DatabaseUnavailable as e:
            # Rows not recorded stay claimed and come due again when the claim runs out;
            # injecting them again then is a no-op on the legacy side.
            self._database_down(e)
        except Exception:
            self.loop_failures += 1
            OUTBOX_LOOP_FAILURES.labels(reason="error").inc()
            log.failure("injecting conversation {cid} failed unexpectedly; its rows come due "
                        "again", cid=items[0].conversation_id)
        _forget(sent)
        return []

    @staticmethod
    def _ready(item: OutboxItem, members: tuple[str, ...]) -> Row | None:
        """``_prepare``'s common case without a coroutine: a message of a conversation with
        a chat id, someone on legacy and a list legacy takes (*members*: its handles,
        distinct and sorted). None for anything else, which ``_prepare`` handles."""
        if (item.legacy_chat_id is None or item.legacy_client_members == 0
                or item.kind != outbox_store.MESSAGE or _refusal(item, members) is not None):
            return None
        return _message_row(item, item.legacy_chat_id, members)

    async def _prepare(self, item: OutboxItem) -> Row | None:
        """What to inject for one row; None when the row was skipped or refused (and
        recorded already), before anything was sent. Nothing is encoded here: a row the
        wire format can not carry is found when its request is built (``_send``)."""
        chat_id = item.legacy_chat_id
        if chat_id is None:  # cloud-born, recorded before the rows go (_map_cloud_chats)
            chat_id = ids.chat_for_cloud_conversation(item.conversation_id)
            item = attrs.evolve(item, legacy_chat_id=chat_id)
        if item.legacy_client_members == 0:
            # Every member moved to cloud-only since it was posted: nobody to inject for.
            if await self._db.run("complete_outbox", outbox_store.complete_outbox, item, chat_id,
                                  None, self._now_ms(), skipped=True,
                                  skip_reason=outbox_store.NO_LEGACY_CLIENTS):
                self.skipped += 1
            else:
                self._claim_lost("skip", [item])
            return None
        if item.kind == outbox_store.MEMBERS:
            return Row(outbox_store.Injected(item, chat_id, None))
        members = _members(item)
        why = _refusal(item, members)
        if why is not None:
            return await self._refuse(item, chat_id, why)
        return _message_row(item, chat_id, members)

    async def _drop_unencodable(self, request: Request) -> list[Request]:
        """Refuse for good the rows of *request* that the wire format can not carry (each
        tried alone); the requests that send the rest, in order."""
        keep = []
        for row in request.rows:
            why = request.unencodable(row)
            if why is None:
                keep.append(row)
            else:
                await self._refuse(row.item, request.chat_id, f"not encodable for legacy: {why}")
        if len(keep) == 1 == len(request.rows):
            raise RuntimeError(f"the wire format refused seq {keep[0].item.seq} in a request, "
                               "but not alone")  # a bug: never sent, no refusal made up
        if len(keep) == len(request.rows):
            # each fits alone, together they do not (the frame was counted wrong): one by one
            log.warn("a batch of {count} rows did not fit a frame; sending them one by one",
                     count=len(keep))
            return [attrs.evolve(request, rows=[row]) for row in keep]
        return [attrs.evolve(request, rows=keep)] if keep else []

    def _send(self, peer: PeerConnection, request: Request) -> defer.Deferred:
        """Send one request under the window slots the caller took for its rows (given back
        at the answer, or at once when it can not be sent: ``WireError``, raised); a
        Deferred firing with one outcome per row, or failing with ``Retry``."""
        try:
            d = request.send(peer)
        except wire.WireError:
            self._window.give_back(len(request.rows))
            raise
        except Exception:
            d = defer.fail()
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        deadline = self._limits.start(expire)

        def answered(result: Any) -> Any:
            deadline.clear()
            self._window.give_back(len(request.rows))
            return result

        def classify(failure: Any) -> Any:
            try:
                return outcomes_of_failure(failure.value, len(request.rows), bool(timed_out),
                                           self.config.inject_timeout_s)
            except Unexpected:
                log.failure("injecting {count} rows from seq {seq} failed unexpectedly; "
                            "retrying later", failure, count=len(request.rows),
                            seq=request.rows[0].item.seq)
                raise

        return d.addBoth(answered).addErrback(classify)

    async def _complete(self, acked: list[tuple[outbox_store.Injected, Any]],
                        conversations: list[uuid.UUID]) -> bool:
        """Record acknowledged rows in one transaction, then count them; whether a row of
        *conversations* (the pass's) is due now, as that transaction saw them (True when
        there was nothing to record: the loop looks)."""
        if not acked:
            return True
        now_ms = self._now_ms()
        done, more = await self._db.run(
            "complete_outbox_batch", record_pass, [injected for injected, _ in acked],
            conversations, now_ms)
        completed = {(item.conversation_id, item.seq, item.sub) for item in done}
        self._recorded_since_count = self._recorded_since_count or bool(done)
        lost = []
        new = duplicates = 0
        lags = []
        now_s = now_ms / 1000
        for injected, answer in acked:
            item = injected.item
            if (item.conversation_id, item.seq, item.sub) not in completed:
                lost.append(item)
                continue
            if item.kind == outbox_store.MEMBERS:
                self.membership_changes += 1
                if answer.status == "changed":
                    _MEMBERS_ADDED.inc(len(item.add_handles))
                    _MEMBERS_REMOVED.inc(len(item.remove_handles))
                continue
            if answer.status == "new":
                new += 1
            else:
                duplicates += 1
            lag = max(0, now_ms - item.waiting_since_ms) / 1000
            lags.append(lag)
            # a row claimed before (by a worker that died, or whose claim ran out) met a fault
            # or went back before (here or at another worker)
            met = (item.attempts > 1 or item.retried
                   or self.faults.met(item.waiting_since_ms / 1000, now_s))
            self.recent_lags.append((now_s, lag, met))
        self.injected += new
        self.duplicates += duplicates
        if new:
            _MIRRORED.inc(new)
        if duplicates:
            _DUPLICATES.inc(duplicates)
        if lags:
            _LAG.observe_many(lags)
        if lost:
            self._claim_lost("complete", lost)
        return more

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        self.faults.mark(self._clock.seconds())  # rows queued before the start waited for it
        super().startService()

    def _database_down(self, error: Exception) -> None:
        self.faults.mark(self._clock.seconds())
        super()._database_down(error)

    def _claim_lost(self, what: str, items: Sequence[OutboxItem]) -> None:
        """A late call from a claim that ran out and was taken again: it changed nothing."""
        self.faults.mark(self._clock.seconds())
        self.late_claims += len(items)
        log.warn("outbox claim of conversation {cid} ran out before {what} ({count} rows, "
                 "from seq {seq}); another claim holds them now, nothing written",
                 cid=items[0].conversation_id, what=what, count=len(items), seq=items[0].seq)

    async def _hand_back(self, items: list[OutboxItem], reason: str, retry_at_ms: int, *,
                         tried: int = 0) -> None:
        held = await self._db.run("release_outbox_items", release_outbox_items, items, reason,
                                  retry_at_ms, tried)
        if held < len(items):
            self._claim_lost("release", items[held:])

    async def _refuse(self, item: OutboxItem, chat_id: str, reason: str) -> None:
        if not await self._db.run("refuse_outbox_item", refuse_outbox_item, item, chat_id,
                                  reason, self._now_ms()):
            return self._claim_lost("refuse", [item])
        self.skipped += 1
        log.warn("legacy refuses message {mid} of conversation {cid}: {reason}; skipped with "
                 "an inject_refused finding", mid=item.message_id, cid=item.conversation_id,
                 reason=reason)

    async def _release(self, items: list[OutboxItem], reason: str) -> None:
        first = items[0]
        now_ms = self._now_ms()
        too_old = now_ms - first.waiting_since_ms > self.config.max_age_s * 1000
        if first.attempts >= self.config.max_attempts or too_old:
            why = (f"given up after {first.attempts} attempts"
                   + (f" and {(now_ms - first.waiting_since_ms) // 1000} s" if too_old else "")
                   + f"; last error: {reason}")
            if await self._db.run("fail_outbox_item", fail_outbox_item, first, why, now_ms):
                self.given_up += 1
                metrics.OUTBOX_GIVEN_UP.inc()
                log.warn("gave up injecting message {mid} of conversation {cid} ({why}); "
                         "an inject_failed finding is open", mid=first.message_id,
                         cid=first.conversation_id, why=why)
            if len(items) == 1:
                return
            items = items[1:]  # the rest of the conversation goes back as usual, untried
            first = items[0]
            tried = 0
        else:
            tried = 1  # the first row failed; the rest waited behind it
        self.faults.mark(self._clock.seconds())
        delay_s = self.config.retry.delay(max(first.attempts, 1), self._rng)
        await self._hand_back(items, reason, self._now_ms() + round(delay_s * 1000),
                              tried=tried)
        self.failures += 1
        _RETRIES.inc()
        log.info("injecting into conversation {cid} failed ({reason}); {count} rows retry in "
                 "{delay:.1f}s (attempt {attempt})", cid=first.conversation_id, reason=reason,
                 count=len(items), delay=delay_s, attempt=first.attempts)
