"""The notification dispatcher: drains the notifications outbox into the push gateway.

A notification row is written in the same transaction as its message (``cloud.store``);
this loop only moves it along. States of one row (``notifications.state``)::

                claim (attempt 1)           gateway accepted            device acks
    pending ---------------------> push ------------------> sent ----------------> acked
       ^  ^                         |                        |                       ^
       |  +-- PushRejected: retry at now + policy.delay -----+                       |
       |                                                     |   (a late ack counts) |
       +------ not acked within resend_after: claimed again, pushed again, same id --+
                                                             |
               ... attempts == max_attempts, still not acked v
                                                          failed  (+ an open finding of
                                                                   kind notification_failed,
                                                                   written by the store)

Claiming counts the attempt and moves the row's next attempt ``resend_after`` ahead in the
same transaction, before anything is pushed: a dispatcher that dies mid-push loses nothing,
the row simply comes due again. A resend carries the same notification id, which the
device's mailbox and ``notifications_store.ack_notification`` treat idempotently.

The loop itself::

    idle --start--> waiting --timer--> ticking --done, full batch--> ticking (at once)
                       ^                  |
                       +---- done --------+     stop: cancel the timer, or wait for the tick

Never more than one tick is in flight. A tick claims up to ``batch`` due rows (one
statement), pushes them concurrently and records their outcomes together in one more; a full
batch means a backlog, so the next tick runs at once instead of after ``poll_interval_s``.
A failed tick is logged (an unreachable database once per outage, anything else with its
traceback), counted in ``cloud_dispatcher_loop_failures_total`` and followed by the next
tick as usual.
"""

from __future__ import annotations

import random

import attrs
from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.model import Notification
from cloud.push import PushGateway, PushMessage, PushRejected
from cloud.store import notifications as notifications_store
from servicekit.loop import PollingLoop, failure_counter
from servicekit.retry import RetryPolicy
from servicekit.validators import positive

log = Logger()

NOTIFICATIONS_PUSHED = Counter(
    "cloud_notifications_pushed_total",
    "Notification pushes the gateway accepted (resends included).")
NOTIFICATIONS_PUSH_ERRORS = Counter(
    "cloud_notifications_push_errors_total",
    "Notification pushes the gateway refused or did not answer in time (retried later).")
NOTIFICATIONS_FAILED = Counter(
    "cloud_notifications_failed_total",
    "Notifications given up after max_attempts without an acknowledgement.")
LOOP_FAILURES = failure_counter(
    "cloud_dispatcher_loop_failures_total",
    "Dispatcher passes that failed; the loop carries on.")


@attrs.frozen
class DispatcherConfig:
    """How the dispatcher paces itself. Times in seconds."""

    #: Pause between ticks when the last one did not fill a batch.
    poll_interval_s: float = attrs.field(default=0.5, converter=float, validator=positive)
    #: Most notifications claimed by one tick.
    batch: int = attrs.field(default=200, validator=[attrs.validators.instance_of(int),
                                                     positive])
    #: How long a pushed notification may stay unacknowledged before it is pushed again.
    resend_after_s: float = attrs.field(default=10.0, converter=float, validator=positive)
    #: Pushes of one notification before it is failed.
    max_attempts: int = attrs.field(default=5, validator=[attrs.validators.instance_of(int),
                                                          positive])
    #: Backoff after the gateway refused a push.
    retry: RetryPolicy = attrs.field(
        factory=lambda: RetryPolicy(initial_s=1.0, factor=2.0, cap_s=30.0, jitter=0.2),
        validator=attrs.validators.instance_of(RetryPolicy))
    #: A gateway that has not answered by then is treated as having refused.
    push_timeout_s: float = attrs.field(default=5.0, converter=float, validator=positive)


def _cancel_unanswered(pushes: list[defer.Deferred]) -> None:
    """The pass's deadline: a push the gateway has not answered counts as refused."""
    for d in pushes:
        if not d.called:
            d.cancel()


class NotificationDispatcher(PollingLoop):
    """Pushes due notifications through *gateway*, records outcomes through *db*."""

    description = "notification dispatcher"
    failure_counter = LOOP_FAILURES

    def __init__(self, clock: IReactorTime, db: TransactionRunner, gateway: PushGateway,
                 rng: random.Random, config: DispatcherConfig | None = None, *,
                 name: str = "notification-dispatcher") -> None:
        self.config = config if config is not None else DispatcherConfig()
        super().__init__(clock, self.config.poll_interval_s, name)
        self._db = db
        self._gateway = gateway
        self._rng = rng

    async def _tick(self) -> bool:
        """One pass; True when it claimed a full batch (so more are probably due)."""
        cfg = self.config
        try:
            to_push, failed = await self._db.run(
                "claim_due_notifications", notifications_store.claim_due_notifications,
                self._now_ms(), cfg.batch, round(cfg.resend_after_s * 1000), cfg.max_attempts)
        except DatabaseUnavailable as e:
            self._database_down(e)
            return False
        self._database_up()
        if failed:
            NOTIFICATIONS_FAILED.inc(len(failed))
            log.warn("{count} notifications failed after {attempts} attempts without an "
                     "acknowledgement", count=len(failed), attempts=cfg.max_attempts)
        if to_push:
            # All of a pass's pushes start now, so one timer gives each the same deadline a
            # timer per push would (at one DelayedCall per push, a measurable share of the
            # API's CPU under load).
            pushes = [defer.maybeDeferred(self._gateway.push, self._message(n))
                      for n in to_push]
            timer = self._clock.callLater(cfg.push_timeout_s, _cancel_unanswered, pushes)
            outcomes = await defer.gatherResults(
                [defer.Deferred.fromCoroutine(self._push(n, d))
                 for n, d in zip(to_push, pushes, strict=True)],
                consumeErrors=True)
            if timer.active():
                timer.cancel()
            await self._record([o for o in outcomes if o is not None])
        return len(to_push) + len(failed) >= cfg.batch

    @staticmethod
    def _message(n: Notification) -> PushMessage:
        return PushMessage(n.account_id, n.notification_id, n.conversation_id,
                           n.message_id, n.seq)

    async def _push(self, n: Notification, pushed: defer.Deferred
                    ) -> notifications_store.PushOutcome | None:
        """The outcome of one claimed notification's push (*pushed*, cancelled if the
        gateway has not answered by the pass's deadline), or None after a bug (the row comes
        due again by itself). Never raises."""
        timeout_s = self.config.push_timeout_s
        try:
            await pushed
        except (PushRejected, defer.CancelledError) as e:
            NOTIFICATIONS_PUSH_ERRORS.inc()
            delay_s = self.config.retry.delay(n.attempts, self._rng)
            now_ms = self._now_ms()
            if isinstance(e, PushRejected):
                error = str(e) or "rejected by the push gateway"
            else:
                error = f"no answer from the push gateway within {timeout_s}s"
            return notifications_store.PushOutcome(
                n.account_id, n.notification_id, now_ms, now_ms + round(delay_s * 1000), error)
        except Exception:
            LOOP_FAILURES.labels(reason="error").inc()
            log.failure("pushing notification {nid} failed unexpectedly; it comes due again",
                        nid=n.notification_id)
            return None
        NOTIFICATIONS_PUSHED.inc()
        now_ms = self._now_ms()
        # the device's time to acknowledge runs from acceptance, not from the claim
        return notifications_store.PushOutcome(
            n.account_id, n.notification_id, now_ms,
            now_ms + round(self.config.resend_after_s * 1000))

    async def _record(self, outcomes: list[notifications_store.PushOutcome]) -> None:
        """The tick's outcomes in one transaction (one per push cost the API's database a
        transaction per message). If it fails, the rows were rescheduled when they were
        claimed, so they come due again by themselves."""
        if not outcomes:
            return
        try:
            await self._db.run("record_push_outcomes",
                               notifications_store.record_push_outcomes, outcomes)
        except DatabaseUnavailable as e:
            self._database_down(e)
        except Exception:
            LOOP_FAILURES.labels(reason="error").inc()
            log.failure("recording {count} push outcomes failed unexpectedly; those rows come "
                        "due again", count=len(outcomes))
