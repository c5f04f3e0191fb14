"""Cloud -> legacy: drain ``outbox_to_legacy`` into the legacy network.

``cloud.store.messages.post_message`` writes an outbox row in the message's own transaction and
NOTIFYs ``outbox_to_legacy``; ``bridge.outbox_listener.OutboxListener`` turns each notification into
``OutboxInjector.wake()``, and the injector's poll is the fallback for a missed one.

One outbox row (``outbox_to_legacy.state``)::

              claim (attempts + 1, invisible for claim_s)      Ack new / duplicate
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

A row of kind ``members`` (a membership change made on the cloud) takes the same path and
the same order, as an InjectMembership of its delta (``inject_membership_change``).

The GUID is derived from the cloud message id (``bridge.ids``), so injecting a row again
after a crash between the Ack and ``complete_outbox`` is a no-op on the legacy side (Ack
``duplicate``). Each claim carries a token; completes and releases touch only rows still held
under it, so a late one from a claim that ran out changes nothing (counted in
``late_claims``, logged). Order per conversation: rows of one conversation are injected one at
a time in seq order, each after the previous one's Ack, and the acknowledged ones are
completed together in one transaction (``complete_outbox_batch``); when one fails, it and
every later claimed row of that conversation are released together, and ``claim_outbox``
never hands out a row
while an earlier one of its conversation is still claimed. Conversations run concurrently,
at most ``concurrency`` at a time.

The loop is the dispatcher's (``cloud.dispatcher``)::

    idle --start--> waiting --timer or wake()--> ticking --done, full batch or woken--> ticking
                       ^                            |
                       +---------- done ------------+   stop: cancel the timer, or wait for
                                                        the tick (which injects no further row)
"""

from __future__ import annotations

import collections
import random
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import psycopg
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge import ids
from bridge.ops import metrics
from bridge.outbox_membership import (
    MEMBERSHIP_APPLIED,
    ORIGIN,
    inject_membership_change,
    membership_detail,
)
from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.store import findings as findings_store
from cloud.store import outbox as outbox_store
from cloud.store.outbox import OutboxItem
from legacy import wire
from legacy.peer import PeerConnection, PeerRefused, PeerRequestFailed
from servicekit.loop import PollingLoop, failure_counter
from servicekit.retry import RetryPolicy
from servicekit.validators import positive

log = Logger()

DIRECTION = "to_legacy"
#: Finding kind for a message the legacy network will never accept.
INJECT_REFUSED = "inject_refused"
#: Finding kind for a message given up after ``max_attempts`` or ``max_age_s``.
INJECT_FAILED = "inject_failed"

OUTBOX_LOOP_FAILURES = failure_counter(
    "bridge_outbox_loop_failures_total",
    "Outbox injector passes (or conversations within one) that failed; the loop carries on.")
metrics.RETRIES.labels(what="inject")

#: Failures of one injection that only mean "not now": the row is released and retried.
_TRANSIENT = (defer.TimeoutError, error.ConnectionLost, error.ConnectionDone,
              error.ConnectError, PeerRefused)


class LegacyPeers(Protocol):
    """Privileged connections into the legacy network (the worker keeps them over TCP)."""

    def for_chat(self, chat_id: str) -> PeerConnection | None:
        """A ready connection to the chat's home supernode, or None if it is unreachable now."""

    def any(self) -> PeerConnection | None:
        """A ready connection to any supernode, or None if none is reachable now."""


_COUNT = [attrs.validators.instance_of(int), positive]


@attrs.frozen
class InjectorConfig:
    """How the outbox injector paces itself. Times in seconds."""

    #: Most outbox rows claimed by one tick.
    batch: int = attrs.field(default=200, validator=_COUNT)
    #: How long claimed rows stay invisible to other workers; must outlast an injection.
    claim_s: float = attrs.field(default=30.0, converter=float, validator=positive)
    #: Pause between ticks when the last one did not fill a batch (NOTIFY wakes it earlier).
    poll_interval_s: float = attrs.field(default=1.0, converter=float, validator=positive)
    #: A supernode that has not acknowledged an injection by then is treated as unreachable.
    inject_timeout_s: float = attrs.field(default=10.0, converter=float, validator=positive)
    #: Backoff after a failed injection.
    retry: RetryPolicy = attrs.field(
        factory=lambda: RetryPolicy(initial_s=1.0, factor=2.0, cap_s=60.0, jitter=0.2),
        validator=attrs.validators.instance_of(RetryPolicy))
    #: Conversations injected concurrently (rows within one are always sequential).
    concurrency: int = attrs.field(default=16, validator=_COUNT)
    #: A row whose injection failed this many times is given up: state ``failed``, with an
    #: ``inject_failed`` finding (its conversation's later rows go on).
    max_attempts: int = attrs.field(default=30, validator=_COUNT)
    #: ... and so is a row whose injection failed once it is older than this.
    max_age_s: float = attrs.field(default=6 * 3600.0, converter=float, validator=positive)
    #: How often the pending rows are counted (for the heartbeat, the metrics and status):
    #: not every tick, where a count over a large backlog would cost more than the claim.
    backlog_every_s: float = attrs.field(default=5.0, converter=float, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.claim_s <= self.inject_timeout_s:
            raise ValueError(f"claim_s ({self.claim_s}) must be longer than inject_timeout_s "
                             f"({self.inject_timeout_s}): a claim must outlast one injection")


# ---------------------------------------------------------------- transactions

def _lock_if_held(conn: psycopg.Connection, item: OutboxItem) -> bool:
    """Lock *item*'s row if it is still pending under *item*'s claim; False otherwise."""
    return conn.execute(
        "SELECT 1 FROM outbox_to_legacy WHERE conversation_id = %s AND seq = %s AND sub = %s "
        "AND state = 'pending' AND claim_token = %s FOR UPDATE",
        (item.conversation_id, item.seq, item.sub, item.claim_token)).fetchone() is not None


def refuse_outbox_item(conn: psycopg.Connection, item: OutboxItem, legacy_chat_id: str,
                       reason: str, now_ms: int) -> bool:
    """Skip a row the legacy network will never accept, with an open ``inject_refused``
    finding; False (and nothing written) if the row is no longer pending under its claim."""
    if not _lock_if_held(conn, item):
        return False
    findings_store.record_finding(
        conn, INJECT_REFUSED,
        {"reason": reason, "message_id": str(item.message_id), "seq": item.seq,
         "legacy_chat_id": legacy_chat_id, "sender": item.sender_handle,
         **membership_detail(item)},
        now_ms, conversation_id=item.conversation_id)
    outbox_store.complete_outbox(conn, item, legacy_chat_id, None, now_ms, skipped=True)
    return True


def fail_outbox_item(conn: psycopg.Connection, item: OutboxItem, reason: str,
                     now_ms: int) -> bool:
    """Give up on a row: state ``failed`` with an open ``inject_failed`` finding; False (and
    nothing written) if the row is no longer pending under its claim."""
    if not _lock_if_held(conn, item):
        return False
    findings_store.record_finding(
        conn, INJECT_FAILED,
        {"reason": reason, "message_id": str(item.message_id), "seq": item.seq,
         "attempts": item.attempts, "sent_ms": item.sent_ms, "sender": item.sender_handle,
         **membership_detail(item)},
        now_ms, conversation_id=item.conversation_id)
    conn.execute(
        "UPDATE outbox_to_legacy SET state = 'failed', done_ms = %s, last_error = %s "
        "WHERE conversation_id = %s AND seq = %s AND sub = %s AND state = 'pending'",
        (now_ms, reason[:500], item.conversation_id, item.seq, item.sub))
    return True


def release_outbox_items(conn: psycopg.Connection, items: Sequence[OutboxItem], error: str,
                         retry_at_ms: int, tried: int = 0) -> int:
    """Hand claimed rows of one conversation back together, all due at *retry_at_ms*; how
    many were still held under their claim (the others belong to a newer claim now). Only
    the first *tried* of them were injected; the rest get their claim's attempt back."""
    return sum(outbox_store.release_outbox(conn, item, error, retry_at_ms, tried=i < tried)
               for i, item in enumerate(items))


# ---------------------------------------------------------------- the injector

class _Retry(Exception):
    """This injection failed for now; the row and the rest of its conversation go back."""


class _Refused(Exception):
    """The home supernode refuses this message for good (``bad_message``)."""


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
        #: (time, lag seconds) of recent injections, for the worker's heartbeat
        self.recent_lags: deque[tuple[float, float]] = deque(maxlen=10_000)
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

    async def _tick(self) -> bool:
        """One pass; True when it claimed a full batch (so more are probably due)."""
        cfg = self.config
        started = self._clock.seconds()
        now_ms = self._now_ms()
        claim_ms = round(cfg.claim_s * 1000)
        try:
            # spread a claim over at least `concurrency` conversations, each injected in order
            per_conversation = max(1, cfg.batch // cfg.concurrency)
            token = uuid.UUID(int=self._tokens.getrandbits(128), version=4)
            items = await self._db.run("claim_outbox", outbox_store.claim_outbox, now_ms, cfg.batch,
                                       claim_ms, per_conversation, token)
        except DatabaseUnavailable as e:
            self._database_down(e)
            return False
        self._database_up()
        if items:
            by_conversation: dict[Any, list[OutboxItem]] = {}
            for item in items:  # claim_outbox returns them in seq order per conversation
                by_conversation.setdefault(item.conversation_id, []).append(item)
            limit = defer.DeferredSemaphore(cfg.concurrency)
            await defer.gatherResults(
                [limit.run(lambda rows=rows: defer.Deferred.fromCoroutine(
                    self._conversation(rows, now_ms + claim_ms)))
                 for rows in by_conversation.values()],
                consumeErrors=True)
            metrics.BATCH_SIZE.labels(direction=DIRECTION).observe(len(items))
            metrics.BATCH_SECONDS.labels(direction=DIRECTION).observe(
                self._clock.seconds() - started)
        await self._read_backlog()
        # more is probably due when the batch was full or a conversation hit its share
        per_conv = collections.Counter(item.conversation_id for item in items)
        return len(items) >= cfg.batch or max(per_conv.values(), default=0) >= per_conversation

    async def _read_backlog(self) -> None:
        """Count the pending rows, at most every ``backlog_every_s``: the heartbeat reports
        them, the metrics show them, and the migration gate reads the oldest's age."""
        now = self._clock.seconds()
        if (self._backlog_read_at is not None
                and now - self._backlog_read_at < self.config.backlog_every_s):
            return
        try:
            self.backlog = await self._db.run("outbox_backlog", outbox_store.outbox_backlog,
                                              self._now_ms())
        except DatabaseUnavailable as e:
            self._database_down(e)
            return
        self._backlog_read_at = now
        pending, oldest_ms = self.backlog
        metrics.BACKLOG.labels(direction=DIRECTION).set(pending)
        metrics.OUTBOX_PENDING.set(pending)
        metrics.OUTBOX_OLDEST_AGE.set(0.0 if oldest_ms is None else oldest_ms / 1000)

    async def _conversation(self, items: list[OutboxItem], claimed_until_ms: int) -> None:
        """Inject one conversation's claimed rows in seq order, then record the acknowledged
        ones in one transaction; never raises."""
        timeout_ms = round(self.config.inject_timeout_s * 1000)
        acked: list[tuple[outbox_store.Injected, wire.Ack]] = []
        try:
            try:
                for i, item in enumerate(items):
                    if not self.running or self._now_ms() + timeout_ms > claimed_until_ms:
                        # Stopping, or the claim could run out mid-injection and let another
                        # worker overtake: hand the rest back, due at once.
                        await self._hand_back(items[i:], "handed back unattempted (stopping "
                                              "or claim ending)", self._now_ms())
                        return
                    try:
                        outcome = await self._inject(item)
                    except _Retry as e:
                        await self._release(items[i:], str(e))
                        return
                    if outcome is not None:
                        acked.append(outcome)
            finally:
                # Acknowledged rows stay claimed until here; the later rows of the
                # conversation (if any went back) wait behind them, so order holds.
                await self._complete(acked)
        except DatabaseUnavailable as e:
            # Rows not completed stay claimed and come due again when the claim runs out;
            # injecting them again then is a no-op on the legacy side.
            self._database_down(e)
        except Exception:
            self.loop_failures += 1
            OUTBOX_LOOP_FAILURES.labels(reason="error").inc()
            log.failure("injecting conversation {cid} failed unexpectedly; its rows come due "
                        "again", cid=items[0].conversation_id)

    async def _inject(self, item: OutboxItem) -> tuple[outbox_store.Injected, wire.Ack] | None:
        """Inject one row: the Ack to record, None when the row was skipped or refused (and
        recorded already); ``_Retry`` if it must be tried again."""
        chat_id = item.legacy_chat_id or ids.chat_for_cloud_conversation(item.conversation_id)
        if item.legacy_client_members == 0:
            # Every member moved to cloud-only since it was posted: nobody to inject for.
            if await self._db.run("complete_outbox", outbox_store.complete_outbox, item, chat_id,
                                  None, self._now_ms(), skipped=True):
                self.skipped += 1
            else:
                self._claim_lost("skip", [item])
            return None
        if item.kind == outbox_store.MEMBERS:
            return await self._inject_membership(item, chat_id)
        guid = ids.guid_for_cloud_message(item.message_id)
        members = tuple(sorted(set(item.member_handles)))
        if len(members) < 2:
            return await self._refuse(item, chat_id, "fewer than 2 distinct members")
        if item.sender_handle not in members:
            return await self._refuse(item, chat_id, "the sender is not among the members")
        message = wire.ChatMessage(chat_id=chat_id, guid=guid, legacy_seq=0,
                                   sender=item.sender_handle, ts_ms=item.sent_ms,
                                   body=item.body, origin=ORIGIN)
        try:  # a body or member list the wire format cannot carry will never fit
            wire.encode(wire.InjectMessage(req_id=0, message=message, members=members))
        except wire.WireError as e:
            return await self._refuse(item, chat_id, f"not encodable for legacy: {e}")
        try:
            ack = await self._send(chat_id, lambda peer: peer.inject_message(message, members),
                                   message.guid)
        except _Refused as e:
            return await self._refuse(item, chat_id, f"the supernode refused it: {e}")
        if ack.status not in ("new", "duplicate"):
            raise _Retry(f"unexpected Ack status {ack.status!r} from the supernode")
        return outbox_store.Injected(item, chat_id, guid), ack

    async def _inject_membership(self, item: OutboxItem, chat_id: str
                                 ) -> tuple[outbox_store.Injected, wire.Ack] | None:
        """Apply one membership change row at the chat's home (as ``_inject`` does a
        message)."""
        try:  # a handle the wire format cannot carry will never fit
            wire.encode(wire.InjectMembership(req_id=0, chat_id=chat_id, add=item.add_handles,
                                              remove=item.remove_handles, origin=ORIGIN))
        except wire.WireError as e:
            return await self._refuse(item, chat_id, f"not encodable for legacy: {e}")
        try:
            ack = await self._send(
                chat_id, lambda peer: inject_membership_change(peer, item, chat_id),
                f"membership change {item.seq}.{item.sub}")
        except _Refused as e:
            return await self._refuse(item, chat_id, f"the supernode refused it: {e}")
        if ack.status not in MEMBERSHIP_APPLIED:
            raise _Retry(f"unexpected Ack status {ack.status!r} from the supernode")
        return outbox_store.Injected(item, chat_id, None), ack

    async def _complete(self, acked: list[tuple[outbox_store.Injected, wire.Ack]]) -> None:
        """Record acknowledged rows in one transaction, then count them."""
        if not acked:
            return
        now_ms = self._now_ms()
        done = await self._db.run("complete_outbox_batch", outbox_store.complete_outbox_batch,
                                  [injected for injected, _ in acked], now_ms)
        completed = {(item.conversation_id, item.seq, item.sub) for item in done}
        lost = []
        for injected, ack in acked:
            item = injected.item
            if (item.conversation_id, item.seq, item.sub) not in completed:
                lost.append(item)
                continue
            if item.kind == outbox_store.MEMBERS:
                self.membership_changes += 1
                if ack.status == "changed":
                    metrics.MEMBER_CHANGES.labels(direction=DIRECTION, change="added").inc(
                        len(item.add_handles))
                    metrics.MEMBER_CHANGES.labels(direction=DIRECTION, change="removed").inc(
                        len(item.remove_handles))
                continue
            if ack.status == "new":
                self.injected += 1
                metrics.MIRRORED.labels(direction=DIRECTION).inc()
            else:
                self.duplicates += 1
                metrics.DUPLICATES.labels(direction=DIRECTION).inc()
            lag = max(0, now_ms - item.sent_ms) / 1000
            metrics.LAG.labels(direction=DIRECTION).observe(lag)
            self.recent_lags.append((now_ms / 1000, lag))
        if lost:
            self._claim_lost("complete", lost)

    def _claim_lost(self, what: str, items: Sequence[OutboxItem]) -> None:
        """A late call from a claim that ran out and was taken again: it changed nothing."""
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

    async def _send(self, chat_id: str, request: Callable[[PeerConnection], defer.Deferred],
                    what: str) -> wire.Ack:
        """The home supernode's Ack to *request* (an inject of *what*, for the log);
        ``_Refused`` if it never will, else ``_Retry``."""
        timeout_s = self.config.inject_timeout_s
        try:
            peer = self._peers.for_chat(chat_id)
            if peer is None:
                raise _Retry(f"home supernode of {chat_id!r} is unreachable")
            return await defer.maybeDeferred(request, peer).addTimeout(timeout_s, self._clock)
        except _Retry:
            raise
        except PeerRequestFailed as e:
            if e.code in ("bad_message", "bad_members"):
                raise _Refused(e.reason) from e
            raise _Retry(str(e)) from e  # not_home (the ring changed) and the like: later
        except defer.TimeoutError as e:
            raise _Retry(f"no Ack from the home supernode within {timeout_s}s") from e
        except _TRANSIENT as e:
            raise _Retry(f"{type(e).__name__}: {e}") from e
        except Exception as e:
            log.failure("injecting {what} failed unexpectedly; retrying later", what=what)
            raise _Retry(f"{type(e).__name__}: {e}") from e

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
        too_old = now_ms - first.sent_ms > self.config.max_age_s * 1000
        if first.attempts >= self.config.max_attempts or too_old:
            why = (f"given up after {first.attempts} attempts"
                   + (f" and {(now_ms - first.sent_ms) // 1000} s" if too_old else "")
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
        delay_s = self.config.retry.delay(max(first.attempts, 1), self._rng)
        await self._hand_back(items, reason, self._now_ms() + round(delay_s * 1000),
                              tried=tried)
        self.failures += 1
        metrics.RETRIES.labels(what="inject").inc()
        log.info("injecting into conversation {cid} failed ({reason}); {count} rows retry in "
                 "{delay:.1f}s (attempt {attempt})", cid=first.conversation_id, reason=reason,
                 count=len(items), delay=delay_s, attempt=first.attempts)
