"""The users in a whole-migration simulation (``drills.simulation``): when devices are
online and when messages are sent, over a working day and a week (pure functions of a
seeded ``random.Random`` and the time since day 0, so the shape can be tested on its own),
and the cloud devices' side of the push channel (``AckingChannel``).
"""

from __future__ import annotations

import random

import psycopg
from twisted.internet.interfaces import IReactorTime

from cloud.db import run_transaction
from cloud.push import NotificationChannel, PushMessage
from cloud.store import notifications as notifications_store
from drills.simplan import DAY_S

#: Relative message rate by hour of the day (a working day: quiet nights, a morning and an
#: afternoon peak, an evening tail), scaled to mean 1, so a rate stays messages per day.
_HOURLY = (0.1, 0.05, 0.05, 0.05, 0.1, 0.2, 0.5, 1.0, 1.6, 2.0, 2.0, 1.8,
           1.5, 1.8, 2.0, 1.9, 1.7, 1.4, 1.1, 1.0, 0.9, 0.7, 0.4, 0.2)
_HOURLY_MEAN = sum(_HOURLY) / 24
#: The highest weight: candidates drawn at the peak rate are thinned by weight / PEAK.
PEAK = max(_HOURLY) / _HOURLY_MEAN
#: A weekend day carries this share of a working day's traffic and sessions.
WEEKEND = 0.35

#: Share of a user's messages sent from cloud clients, by migration phase.
CLOUD_SHARE = {"legacy": 0.0, "dual": 0.5, "cloud": 0.9, "cloud-only": 1.0}


def is_weekend(day: int) -> bool:
    """Days 5 and 6 of each week from day 0."""
    return day % 7 in (5, 6)


def weight(seconds: float) -> float:
    """The relative message rate *seconds* after day 0 began (mean 1 over a working day)."""
    w = _HOURLY[int(seconds % DAY_S // 3600)] / _HOURLY_MEAN
    return w * WEEKEND if is_weekend(int(seconds // DAY_S)) else w


def day_sessions(rng: random.Random, day: int) -> list[tuple[float, float]]:
    """One device's sessions of *day*, as (on, off) hours from that day's midnight: a
    working-day session most days (around 9 to 17), an evening one sometimes."""
    sessions = []
    if rng.random() < (WEEKEND if is_weekend(day) else 0.9):
        on = rng.gauss(9.0, 1.0)
        sessions.append((on, on + max(1.0, rng.gauss(8.0, 1.5))))
    if rng.random() < 0.3:
        on = rng.uniform(19.0, 22.0)
        sessions.append((on, on + rng.uniform(0.5, 2.5)))
    return sessions


class AckingChannel(NotificationChannel):
    """The cloud devices' side of the push channel: each notification the gateway delivers
    is acknowledged by its device 1 to 60 s later (from *rng*), as a real device would."""

    def __init__(self, clock: IReactorTime, conn: psycopg.Connection,
                 rng: random.Random) -> None:
        super().__init__(clock)
        self._clock, self._conn, self._rng = clock, conn, rng

    def deliver(self, message: PushMessage) -> None:
        self._clock.callLater(self._rng.uniform(1.0, 60.0), self._ack, message)

    def _ack(self, message: PushMessage) -> None:
        run_transaction(self._conn, "ack_notification", notifications_store.ack_notification,
                        message.account_id, message.notification_id,
                        int(self._clock.seconds() * 1000))
