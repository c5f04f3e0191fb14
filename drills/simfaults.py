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
- the 2010 outage (``Outage2010``): 25-30% of supernodes lost at once, back after an hour;
  the offline-message service overloaded, and the 2010 client crashing on its late answers.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from drills.simplan import DAY_S, FaultProfile
from drills.simtraffic import is_weekend
from legacy.faults import HopFaults
from legacy.sim import LegacyDeployment

_SHORT_SHARE, _SHORT_MEDIAN_D, _LONG_MEDIAN_D, _LIFETIME_SIGMA = 0.4, 1.75, 67.5, 0.8
#: A client-hosted supernode that went away is replaced (same ring slot) after this.
_REPLACE_AFTER_S = 300.0

#: The 2010 outage. It strikes at the first working-day afternoon (this hour) from the
#: profile's fraction of the run on, when most devices are online, as the real one did (a
#: weekday afternoon); at the fraction itself when that afternoon would leave no time for
#: the recovery before the run ends.
_OUTAGE_HOUR = 14
#: The share of supernodes lost at once (at least one), and how long they stay down.
_OUTAGE_FRACTION = 0.28
_OUTAGE_DOWN_S = 3600.0
#: From the loss until this long after the supernodes are back, each supernode's
#: offline-message service answers at most its share of the devices (devices / supernodes)
#: in _OFFLINE_ANSWER_ALL_S: a normal morning's logins ask a few percent of that, the
#: devices of the lost supernodes logging in again at once ask it many times over. Then the
#: bound is lifted (capacity added, as in 2010) and what waits is answered at once.
_RECOVERY_S = 3600.0
_OFFLINE_ANSWER_ALL_S = 300.0
#: Every legacy device of an outage run is the 2010 client: an answer later than this after
#: it attached crashes it (``legacy.client``).
_LATE_REPLY_CRASH_S = 30.0
#: Stale presence is counted this often while the supernodes are down.
_STALE_SAMPLE_S = 600.0


@attrs.define
class FaultCounts:
    supernode_crashes: int = 0
    supernode_replacements: int = 0
    link_drops: int = 0
    hop_windows: int = 0
    outages: int = 0
    worker_kills: int = 0
    #: the 2010 outage's figures (``Outage2010``); zero, or None, in a run without one
    client_crashes: int = 0
    flush_delayed: int = 0
    logins_peak_per_min: int = 0
    logins_busy_hour_per_min: float = 0.0
    relogin_peak_ratio: float | None = None
    stale_presence_peak: int = 0


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
        self.outage = Outage2010(self) if profile.outage_at is not None else None

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
        if self.outage is not None:
            self.outage.schedule(window)
        if not self.dedicated:
            for sn in sorted(self.legacy.supernodes):
                self._later(self._lifetime(), self._replace, sn)

    def report(self) -> dict[str, Any]:
        """The counts, the outage's figures filled in (the report's ``faults``)."""
        if self.outage is not None:
            self.outage.fill(self.counts)
        return attrs.asdict(self.counts)

    def cancel(self) -> None:
        """No more faults: pending ones are cancelled and the hop faults switched off (the
        caller restarts what is down, ``LegacyDeployment.heal``)."""
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        self.hops.enabled = False
        if self.outage is not None:
            self.outage.end()

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



def outage_start_s(fraction: float, window: float) -> float:
    """When, in seconds from a run's start, the outage strikes: ``_OUTAGE_HOUR`` of the
    first working day from *fraction* of the *window* on, or at that fraction when the
    afternoon leaves no time for the recovery (earlier still when that does not either)."""
    at = window * fraction
    day = int(at // DAY_S)
    while True:
        t = day * DAY_S + _OUTAGE_HOUR * 3600.0
        if t >= at and not is_weekend(day):
            break
        day += 1
    if t + _OUTAGE_DOWN_S + _RECOVERY_S <= window:
        return t
    # no afternoon leaves time for the recovery: at the fraction, or earlier if even that
    # leaves none (the bound must be lifted before the run heals)
    return max(0.0, min(at, window - _OUTAGE_DOWN_S - _RECOVERY_S))


class Outage2010:
    """The 2010 outage over a run, and what it is measured by.

    ::

        t0: a quarter of the supernodes lost ----- t0 + 1 h: back ----- t0 + 2 h: bound lifted
            every supernode's offline-message answers bounded (its share of devices / 5 min)
            devices of the lost supernodes log in again at once -> answers queue up ->
            answers later than 30 s crash their devices -> they log in again -> ...

    ``logins_peak_per_min`` is the busiest minute of logins (credentials issued) from t0 to
    an hour after the bound is lifted; ``logins_busy_hour_per_min`` the mean per minute of
    the busiest hour of the 24 before t0 (the load a normal day peaks at, what the network
    is sized for); their ratio is ``relogin_peak_ratio``. Lifting the bound answers what
    waits at once, every answer of it late: the devices waiting then crash together and log
    in again, a wave the peak may come from (as adding capacity did in 2010).
    ``stale_presence_peak`` is the most handles seen at once (every 10 minutes while the
    supernodes are down) shown online at their presence hub on the word of a lost
    supernode, with no device of the user online.
    """

    def __init__(self, faults: SimFaults) -> None:
        self.faults = faults
        self.legacy = legacy = faults.legacy
        devices = [d for ds in legacy.devices.values() for d in ds]
        for dev in devices:
            dev.late_reply_crash_s = _LATE_REPLY_CRASH_S
        for node in legacy.supernodes.values():
            node.offline.enabled = True
        self.rate = len(devices) / len(legacy.supernodes) / _OFFLINE_ANSWER_ALL_S
        self._logins: list[int] = []  # cumulative logins, a minute apart
        self._normal_minutes = 0  # how many of their differences are before t0
        self.stale_peak = 0

    def schedule(self, window: float) -> None:
        faults = self.faults
        t0 = outage_start_s(faults.profile.outage_at, window)
        faults._later(t0, self._strike)
        self._normal_minutes = int(min(DAY_S, t0) // 60)
        first = t0 - 60.0 * self._normal_minutes
        last = min(window, t0 + _OUTAGE_DOWN_S + _RECOVERY_S + 3600.0)
        faults._later(first, self._sample_logins, last - first)
        t = t0 + _STALE_SAMPLE_S
        while t < t0 + _OUTAGE_DOWN_S:
            faults._later(t, self._sample_stale)
            t += _STALE_SAMPLE_S

    def _strike(self) -> None:
        faults, legacy = self.faults, self.legacy
        faults.counts.outages += 1
        running = legacy.running_supernodes()
        lost = max(1, int(len(running) * _OUTAGE_FRACTION)) if len(running) > 1 else 0
        for sn in faults.rng.sample(running, lost):
            legacy.crash(sn, _OUTAGE_DOWN_S)
            faults.counts.supernode_crashes += 1
        for node in legacy.supernodes.values():
            node.offline.set_rate(self.rate)
        faults._later(_OUTAGE_DOWN_S + _RECOVERY_S, self._recovered)

    def _recovered(self) -> None:
        for node in self.legacy.supernodes.values():
            node.offline.set_rate(None)

    def end(self) -> None:
        """No more faults (the run heals): the bound is lifted if it still holds, and the
        devices lose the 2010 client's bug, so that what the lifted queue answers late does
        not crash them while the run drains and reconciles."""
        for ds in self.legacy.devices.values():
            for dev in ds:
                dev.late_reply_crash_s = None
        self._recovered()

    def _sample_logins(self, left_s: float) -> None:
        self._logins.append(self.legacy.stats.logins)
        if left_s >= 60.0:
            self.faults._later(60.0, self._sample_logins, left_s - 60.0)

    def _sample_stale(self) -> None:
        legacy = self.legacy
        down = set(legacy.down_supernodes())
        now_ms = int(legacy.clock.seconds() * 1000)
        stale = 0
        for sn in legacy.running_supernodes():
            mem = legacy.supernodes[sn].mem
            for handle, merged in mem.hub.items():
                if merged.status == "offline" or merged.expires_ms <= now_ms:
                    continue
                if not any(src in down and e.status != "offline" and e.expires_ms > now_ms
                           for src, e in mem.hub_sources.get(handle, {}).items()):
                    continue
                if not any(d.state == "online" for d in legacy.devices.get(handle, ())):
                    stale += 1
        self.stale_peak = max(self.stale_peak, stale)

    def fill(self, counts: FaultCounts) -> None:
        legacy = self.legacy
        counts.client_crashes = legacy.stats.client_crashes
        counts.flush_delayed = sum(n.offline.delayed for n in legacy.supernodes.values())
        per_min = [b - a for a, b in itertools.pairwise(self._logins)]
        normal = per_min[:self._normal_minutes]
        during = per_min[self._normal_minutes:]
        span = min(60, len(normal))  # a run shorter than a day before t0: what there is
        hours = [sum(normal[i:i + span]) for i in range(max(1, len(normal) - span + 1))]
        busy = max(hours, default=0) / span if span else 0.0
        counts.logins_busy_hour_per_min = round(busy, 2)
        counts.logins_peak_per_min = max(during, default=0)
        counts.relogin_peak_ratio = (round(counts.logins_peak_per_min / busy, 1)
                                     if during and busy else None)
        counts.stale_presence_peak = self.stale_peak
