"""The faults of a whole-migration simulation (``drills.simulation``), over days: what a
``FaultProfile`` (``drills.simplan``) asks for, scheduled on the run's clock from the run's
fault stream, plus the lifetimes of client-hosted supernodes.

- supernode crashes (memory lost, restarted after the profile's delay) and link drops, as
  Poisson events at the profile's daily rates;
- windows of per-hop loss, duplication and delay (the legacy preset the profile names);
- client-hosted supernode lifetimes (the fact sheet in ARCHITECTURE.md): 40% short-lived
  (median 1.75 days), the rest long-lived (median 67.5 days), both log-normal; at the end of
  one the slot comes back as a new incarnation, memory lost. ``--dedicated-supernodes``
  turns these off: dedicated hosts restart only by faults;
- bridge workers killed as by SIGKILL (nothing drained, no lease released) and started
  again under a new id a minute later (invariant 4 over months);
- the 2010 outage: 25-30% of supernodes lost at once, back after an hour, every device
  logging in again as they return.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from drills.simplan import DAY_S, FaultProfile
from legacy.faults import HopFaults
from legacy.sim import LegacyDeployment

_SHORT_SHARE, _SHORT_MEDIAN_D, _LONG_MEDIAN_D, _LIFETIME_SIGMA = 0.4, 1.75, 67.5, 0.8
#: A client-hosted supernode that went away is replaced (same ring slot) after this.
_REPLACE_AFTER_S = 300.0
_OUTAGE_FRACTION = 0.28
_OUTAGE_DOWN_S = 3600.0


@attrs.define
class FaultCounts:
    supernode_crashes: int = 0
    supernode_replacements: int = 0
    link_drops: int = 0
    hop_windows: int = 0
    outages: int = 0
    worker_kills: int = 0


class SimFaults:
    """Schedules a profile's faults over *days* on *clock*; ``cancel`` stops them all."""

    def __init__(self, clock: IReactorTime, legacy: LegacyDeployment, hops: HopFaults,
                 profile: FaultProfile, rng: random.Random, *, dedicated: bool,
                 kill_worker: Callable[[random.Random], bool]) -> None:
        """*kill_worker(rng)* kills one bridge worker (False: none to kill) and sees to its
        restart."""
        self.clock, self.legacy, self.hops = clock, legacy, hops
        self._kill_worker = kill_worker
        self.profile, self.rng, self.dedicated = profile, rng, dedicated
        self.counts = FaultCounts()
        self._calls: list[Any] = []

    def active(self) -> bool:
        """Whether a fault is in effect now (a hop window open, or a supernode down)."""
        return self.hops.enabled or bool(self.legacy.down_supernodes())

    def schedule(self, days: float) -> None:
        profile, rng = self.profile, self.rng
        window = days * DAY_S

        def every(per_day: float, fn: Callable[[], None]) -> None:
            if per_day <= 0:
                return
            t = rng.expovariate(per_day / DAY_S)
            while t < window:
                self._later(t, fn)
                t += rng.expovariate(per_day / DAY_S)

        every(profile.crashes_per_day, self._crash_one)
        every(profile.link_drops_per_day, self._drop_link)
        every(profile.hop_windows_per_day, self._hop_window)
        every(profile.worker_kills_per_day, self._worker_kill)
        if profile.outage_at is not None:
            self._later(window * profile.outage_at, self._outage)
        if not self.dedicated:
            for sn in sorted(self.legacy.supernodes):
                self._later(self._lifetime(), self._replace, sn)

    def cancel(self) -> None:
        """No more faults: pending ones are cancelled and the hop faults switched off (the
        caller restarts what is down, ``LegacyDeployment.heal``)."""
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        self.hops.enabled = False

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(self.clock.callLater(delay, fn, *args))

    def _lifetime(self) -> float:
        rng = self.rng
        median = _SHORT_MEDIAN_D if rng.random() < _SHORT_SHARE else _LONG_MEDIAN_D
        return median * DAY_S * math.exp(rng.gauss(0.0, _LIFETIME_SIGMA))

    def _replace(self, sn: str) -> None:
        if sn not in self.legacy.down_supernodes():
            self.legacy.crash(sn, _REPLACE_AFTER_S)
            self.counts.supernode_replacements += 1
        self._later(_REPLACE_AFTER_S + self._lifetime(), self._replace, sn)

    def _crash_one(self) -> None:
        running = self.legacy.running_supernodes()
        if len(running) > 1:
            self.legacy.crash(running[self.rng.randrange(len(running))],
                              self.profile.restart_after_s)
            self.counts.supernode_crashes += 1

    def _drop_link(self) -> None:
        if self.legacy.drop_link():
            self.counts.link_drops += 1

    def _worker_kill(self) -> None:
        if self._kill_worker(self.rng):
            self.counts.worker_kills += 1

    def _hop_window(self) -> None:
        self.hops.enabled = True
        self.counts.hop_windows += 1
        self._later(self.profile.hop_window_s, self._hop_window_end)

    def _hop_window_end(self) -> None:
        self.hops.enabled = False

    def _outage(self) -> None:
        self.counts.outages += 1
        running = self.legacy.running_supernodes()
        for sn in self.rng.sample(running, int(len(running) * _OUTAGE_FRACTION)):
            self.legacy.crash(sn, _OUTAGE_DOWN_S)
            self.counts.supernode_crashes += 1
        self._later(_OUTAGE_DOWN_S + 1.0, self.legacy.traffic.relogin_storm)
