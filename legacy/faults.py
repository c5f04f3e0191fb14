"""Fault injection for the legacy network; every choice comes from one seeded RNG.

Hop faults (loss, duplication, delay, partitions) apply where one supernode forwards a frame
to another, identically in both runtimes. Process faults (crash and restart with memory lost,
link drops, a correlated crash of a fraction of supernodes, re-login storms) are scheduled on
the injected clock by ``FaultSchedule`` (see ``legacy.sim``).
"""

from __future__ import annotations

import random

import attrs


@attrs.frozen
class FaultPlan:
    """What a preset means. Rates are per hop; intervals are mean seconds between events."""

    name: str
    hop_loss: float = 0.0
    hop_duplicate: float = 0.0
    hop_delay_max: float = 0.0
    crash_interval: float = 0.0
    restart_after: float = 5.0
    link_drop_interval: float = 0.0
    partition_at: float = -1.0  # fraction of the fault window; negative: none
    partition_seconds: float = 0.0
    correlated_crash_at: float = -1.0
    correlated_fraction: float = 0.0
    relogin_storm_at: float = -1.0

    @property
    def any(self) -> bool:
        return self.name != "none"


PRESETS: dict[str, FaultPlan] = {
    "none": FaultPlan("none"),
    "light": FaultPlan("light", hop_loss=0.002, hop_duplicate=0.005, hop_delay_max=0.05,
                       crash_interval=30.0, restart_after=3.0, link_drop_interval=10.0),
    "heavy": FaultPlan("heavy", hop_loss=0.02, hop_duplicate=0.02, hop_delay_max=0.5,
                       crash_interval=8.0, restart_after=5.0, link_drop_interval=3.0,
                       partition_at=0.3, partition_seconds=10.0,
                       correlated_crash_at=0.5, correlated_fraction=0.3,
                       relogin_storm_at=0.55),
}


class HopFaults:
    """Decides the fate of one supernode-to-supernode frame: dropped, delayed, duplicated."""

    def __init__(self, plan: FaultPlan, rng: random.Random) -> None:
        self.plan = plan
        self.rng = rng
        self.enabled = plan.any
        self._sides: tuple[frozenset[str], frozenset[str]] | None = None
        self.lost = 0
        self.duplicated = 0

    def partition(self, side_a: frozenset[str], side_b: frozenset[str]) -> None:
        self._sides = (side_a, side_b)

    def unpartition(self) -> None:
        self._sides = None

    def heal(self) -> None:
        """Stop every fault (used before the final drain of a run)."""
        self.unpartition()
        self.enabled = False

    def is_cut(self, src: str, dst: str) -> bool:
        if self._sides is None:
            return False
        a, b = self._sides
        return (src in a and dst in b) or (src in b and dst in a)

    def delays(self, src: str, dst: str) -> list[float]:
        """Delays at which copies of one frame arrive: [] lost, [d] normal, [d1, d2] duplicated."""
        if self.is_cut(src, dst):
            self.lost += 1
            return []
        if not self.enabled:
            return [0.0]
        p = self.plan
        r = self.rng.random()
        if r < p.hop_loss:
            self.lost += 1
            return []
        d = self.rng.random() * p.hop_delay_max if p.hop_delay_max else 0.0
        if r < p.hop_loss + p.hop_duplicate:
            self.duplicated += 1
            return [d, d + self.rng.random() * max(p.hop_delay_max, 0.01)]
        return [d]
