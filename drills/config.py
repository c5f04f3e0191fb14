"""What one drill runs: the demo's settings (``DemoConfig``), what ``--faults`` means, the
cohort plan, and the chaos scenarios' shape (``Scenario``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs

from legacy.versions import parse_spread

#: Cohort plan: (share of the traffic window, percent of linked accounts, target phase).
#: Percent cohorts are stable, so "30% to dual" includes the earlier 10%.
COHORTS = ((0.10, 10, "dual"), (0.25, 30, "dual"), (0.40, 10, "cloud"),
           (0.55, 60, "dual"), (0.70, 30, "cloud"), (0.85, 10, "cloud-only"))

#: The client versions the demo's legacy devices report (``legacy run --client-versions``):
#: most are current, some a release behind, a few two (what ``legacy min-version`` sunsets).
CLIENT_VERSIONS = "7.1:0.1,7.4:0.3,8.0:0.6"


@attrs.frozen
class FaultSettings:
    """What ``--faults`` means beyond the legacy preset of the same name."""

    push_loss: float = 0.0
    push_errors: float = 0.0
    bridge_kills: int = 0  # SIGKILLs of a bridge worker during the traffic window


FAULTS = {"none": FaultSettings(),
          "light": FaultSettings(push_loss=0.05, bridge_kills=1),
          "heavy": FaultSettings(push_loss=0.2, push_errors=0.05, bridge_kills=3)}


@attrs.frozen
class Scenario:
    """A chaos scenario (``drills.chaos``): the faults, and when, instead of a preset's.

    ``plan(rng, window)`` returns ``(seconds into the traffic, action, arguments)``; actions:
    ``kill_worker`` (SIGKILL, restart after ``restart_after`` s), ``pause_worker`` (SIGSTOP
    for ``seconds``, then SIGCONT), ``legacy`` (a ``legacy run --control-dir`` command),
    ``pg_restart`` (the embedded PostgreSQL stopped for ``down_s`` and started again),
    ``reconcile`` (an operator's ``reconcile all`` by hand, alongside the cron runs, with
    ``--max-seconds max_seconds``).

    ``reconcile_every`` / ``reconcile_max_seconds`` replace the cron runs' interval and
    deadline; with ``reconcile_max_seconds`` the verdict also wants every run during the
    traffic to exit 0, 3 or 4 within its deadline (``drills.chaos.verdict``).
    """

    name: str
    description: str
    plan: Callable[[random.Random, float], list[tuple[float, str, dict[str, Any]]]]
    legacy_faults: str = "none"
    push_loss: float = 0.0
    push_errors: float = 0.0
    needs_embedded: bool = False
    reconcile_every: float | None = None
    reconcile_max_seconds: float | None = None


@attrs.frozen
class DemoConfig:
    """One demo run; validated here so the CLI reports every bad value the same way."""

    duration: float = 60.0  # seconds of traffic; 0: until stopped
    supernodes: int = 6
    legacy_users: int = 120
    cloud_users: int = 20
    rate: float = 20.0  # legacy messages per second; cloud devices post at half of it
    faults: str = "light"
    seed: int = 1
    workers: int = 2
    reconcile_every: float | None = None  # default: a quarter of the duration, 10-60 s
    settle_timeout: float = 90.0
    #: what the legacy devices report at login (``legacy.versions`` spread)
    client_versions: str = CLIENT_VERSIONS

    def __attrs_post_init__(self) -> None:
        if not (self.duration == 0 or 5 <= self.duration <= 86400):
            raise ValueError("--duration must be 0 (until Ctrl-C) or 5 to 86400 seconds")
        if not 1 <= self.supernodes <= 64:
            raise ValueError("--supernodes must be between 1 and 64")
        if not 4 <= self.legacy_users <= 5000:
            raise ValueError("--legacy-users must be between 4 and 5000")
        if not 2 <= self.cloud_users <= 1000:
            raise ValueError("--cloud-users must be between 2 and 1000")
        if not 0 < self.rate <= 2000:
            raise ValueError("--rate must be above 0 and at most 2000 messages per second")
        if self.faults not in FAULTS:
            raise ValueError(f"--faults must be one of {', '.join(FAULTS)}")
        if not 1 <= self.workers <= 8:
            raise ValueError("--workers must be between 1 and 8")
        if self.seed < 0:
            raise ValueError("--seed must not be negative")
        try:
            parse_spread(self.client_versions)
        except ValueError as e:
            raise ValueError(f"--client-versions: {e}") from None

    @property
    def reconcile_interval(self) -> float:
        if self.reconcile_every is not None:
            return self.reconcile_every
        return 30.0 if self.duration == 0 else min(60.0, max(10.0, self.duration / 4))

    def cohort_times(self) -> list[float]:
        """When each step of ``COHORTS`` is due (seconds into the traffic)."""
        span = 120.0 if self.duration == 0 else self.duration
        return [share * span for share, _, _ in COHORTS]
