"""A background loop as a Service: tick, reschedule, never die silently.

    idle --start--> waiting --timer or wake()--> ticking --done, backlog or woken--> ticking
                       ^                            |
                       +-------- done --------------+    stop: cancel the timer, or wait
                                                         for the tick in flight

Never more than one tick is in flight. A tick that reports a backlog (a full batch) is
followed at once; otherwise the next waits ``poll_interval_s``. ``wake()`` (e.g. on a
NOTIFY) ticks at once, or right after the tick in flight. A failed tick is logged with its
traceback, counted, and followed by the next as usual; an unreachable database is logged
once per outage. The notification dispatcher and the outbox injector are such loops.
"""

from __future__ import annotations

import enum
from typing import Any

from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: The reasons a loop counts a failed tick under.
FAILURE_REASONS = ("error", "database_unavailable")


def failure_counter(name: str, documentation: str) -> Counter:
    """A loop's ``failure_counter``: labelled by reason, every reason exported at 0 from the
    start (so an alert's ``rate()`` sees the first failure)."""
    counter = Counter(name, documentation, ["reason"])
    for reason in FAILURE_REASONS:
        counter.labels(reason=reason)
    return counter


class LoopState(enum.Enum):
    IDLE = "idle"  # not running, nothing in flight
    WAITING = "waiting"  # running, next tick scheduled
    TICKING = "ticking"  # a tick is in flight (running or being stopped)


class PollingLoop(Service):
    """Subclasses implement ``_tick() -> bool`` (True: more is due) and set ``description``
    (for logs) and ``failure_counter`` (a Counter with a ``reason`` label)."""

    description = "loop"
    failure_counter: Counter

    def __init__(self, clock: IReactorTime, poll_interval_s: float, name: str) -> None:
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        # log under the subclass's module, where an operator would look for it
        self._log = Logger(namespace=type(self).__module__, source=self)
        self.setName(name)
        self.state = LoopState.IDLE
        self._timer: IDelayedCall | None = None
        self._tick_done: defer.Deferred | None = None
        self._woken = False
        self._outage_since: float | None = None
        self._tick_started: float | None = None
        #: Ticks run so far, and ticks that failed (for tests and debugging).
        self.ticks = 0
        self.loop_failures = 0

    @property
    def ready(self) -> bool:
        """Running and able to reach the database."""
        return self.running and self._outage_since is None

    def tick_running_s(self) -> float:
        """How long the tick in flight has run (0.0 with none): a tick is bounded by its
        own timeouts, so one that runs far longer hangs (what a watchdog asks)."""
        started = self._tick_started
        return 0.0 if started is None else max(0.0, self._clock.seconds() - started)

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        if self.state is LoopState.IDLE:
            self._schedule(0)

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        """Stop ticking; fires once the tick in flight (if any) has finished."""
        super().stopService()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.state is LoopState.WAITING:
            self.state = LoopState.IDLE
        if self._tick_done is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._tick_done.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    def wake(self) -> None:
        """Something is due now: tick at once, or right after the tick in flight."""
        if self.state is LoopState.WAITING and self._timer is not None:
            self._timer.cancel()
            self._schedule(0)
        elif self.state is LoopState.TICKING:
            self._woken = True  # its query may have run before what woke us committed

    async def _tick(self) -> bool:
        raise NotImplementedError

    def _schedule(self, delay_s: float) -> None:
        self.state = LoopState.WAITING
        self._timer = self._clock.callLater(delay_s, self._start_tick)

    def _start_tick(self) -> None:
        self._timer = None
        self._woken = False
        self.state = LoopState.TICKING
        self._tick_started = self._clock.seconds()
        self.ticks += 1
        d = defer.Deferred.fromCoroutine(self._tick())
        self._tick_done = d
        d.addErrback(self._tick_failed)
        d.addCallback(self._finish_tick)

    def _tick_failed(self, failure: Any) -> bool:
        self.loop_failures += 1
        self.failure_counter.labels(reason="error").inc()
        self._log.failure("{what} tick failed; carrying on", failure, what=self.description)
        return False

    def _finish_tick(self, backlog: bool) -> None:
        self._tick_done = None
        self._tick_started = None
        if self.running:
            self._schedule(0 if backlog or self._woken else self._poll_interval_s)
        else:
            self.state = LoopState.IDLE

    def _now_ms(self) -> int:
        return round(self._clock.seconds() * 1000)

    def _database_down(self, error: Exception) -> None:
        """Count every failure, but log only the first of an outage."""
        self.loop_failures += 1
        self.failure_counter.labels(reason="database_unavailable").inc()
        if self._outage_since is None:
            self._outage_since = self._clock.seconds()
            self._log.warn("database unavailable ({error}); the {what} keeps retrying every "
                     "{interval}s", error=error, what=self.description,
                     interval=self._poll_interval_s)

    def _database_up(self) -> None:
        if self._outage_since is not None:
            self._log.info("database reachable again after {seconds:.1f}s",
                     seconds=self._clock.seconds() - self._outage_since)
            self._outage_since = None
