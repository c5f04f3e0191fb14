"""A push gateway that behaves like a real one, badly: it refuses, loses and delays.

Each push draws its fate from the injected ``random.Random`` and answers after
``latency_s`` on the injected clock::

    push --error_rate--> rejected         (Deferred errbacks PushRejected)
      |
      +--loss----------> accepted, lost   (Deferred fires None; the device never sees it)
      |
      +--otherwise-----> accepted, delivered to the NotificationChannel, then fires None

``loss`` is the share of *accepted* pushes that are silently dropped, so ``loss=1.0`` with
any ``error_rate`` is valid. The lost ones are exactly what only a device acknowledgement
can reveal; they are counted in ``cloud_push_lost_total`` so a test or an operator can see
that the simulation really dropped something.
"""

from __future__ import annotations

import math
import random

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from cloud.push import NotificationChannel, PushMessage, PushRejected

PUSH_ACCEPTED = Counter("cloud_push_accepted_total",
                        "Pushes the (simulated) gateway accepted, lost ones included.")
PUSH_REJECTED = Counter("cloud_push_rejected_total",
                        "Pushes the (simulated) gateway refused with an error.")
PUSH_LOST = Counter("cloud_push_lost_total",
                    "Pushes the simulated gateway accepted and then silently dropped.")


def _check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    return float(value)


class SimulatedPushGateway:
    """A ``PushGateway`` with configurable loss, errors and latency, on an injected clock."""

    def __init__(self, clock: IReactorTime, rng: random.Random,
                 channel: NotificationChannel, *, loss: float = 0.0,
                 error_rate: float = 0.0, latency_s: float = 0.0) -> None:
        self.loss = _check_fraction("loss", loss)
        self.error_rate = _check_fraction("error_rate", error_rate)
        if not isinstance(latency_s, (int, float)) or isinstance(latency_s, bool) \
                or not math.isfinite(latency_s) or latency_s < 0:
            raise ValueError(f"latency_s must be a finite number >= 0, got {latency_s!r}")
        self.latency_s = float(latency_s)
        self._clock = clock
        self._rng = rng
        self._channel = channel

    def push(self, message: PushMessage) -> defer.Deferred:
        """Fires None once accepted (delivered or lost), or errbacks ``PushRejected``."""
        # Two draws per push whatever the rates, so a seed replays the same fates even
        # when only one of the rates changes.
        rejected = self._rng.random() < self.error_rate
        lost = self._rng.random() < self.loss
        d: defer.Deferred = defer.Deferred()

        def answer() -> None:
            if rejected:
                PUSH_REJECTED.inc()
                d.errback(PushRejected(f"simulated gateway error for {message.notification_id}"))
                return
            PUSH_ACCEPTED.inc()
            if lost:
                PUSH_LOST.inc()
            else:
                self._channel.deliver(message)
            d.callback(None)

        # Even with no latency the answer comes from the clock, never from inside push():
        # a caller must not depend on a gateway answering synchronously.
        self._clock.callLater(self.latency_s, answer)
        return d
