"""What one whole-migration simulation runs (``drills.simulation``): its settings
(``SimConfig``), the cohort plan (``PlanStep``, ``parse_plan``, the built-in default) and
what each ``--faults`` profile means over days rather than minutes (``FaultProfile``).

Everything here is validated when it is built, so the command line, a plan file and a test
get the same clear errors (``ValueError`` with a sentence a user can act on).
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from cloud.model import PHASES
from legacy.versions import normalize, parse_spread

#: One simulated day, in seconds.
DAY_S = 86_400.0
#: Users per supernode when ``--supernodes`` is not given (the fact sheet's clients per
#: supernode): client-hosted supernodes (2012), and the dedicated ones that followed.
USERS_PER_SUPERNODE = 800
USERS_PER_DEDICATED_SUPERNODE = 4100
#: ... and the fewest a sized ring has: 16 client-hosted (the default before sizing, what a
#: small rehearsal expects), 2 dedicated (a ring, not a single host).
MIN_SUPERNODES = 16
MIN_DEDICATED_SUPERNODES = 2


def ring_size(users: int, *, dedicated: bool) -> int:
    """The supernodes of a run of *users* when none are asked for."""
    if dedicated:
        return max(MIN_DEDICATED_SUPERNODES, math.ceil(users / USERS_PER_DEDICATED_SUPERNODE))
    return max(MIN_SUPERNODES, math.ceil(users / USERS_PER_SUPERNODE))


@attrs.frozen
class PlanStep:
    """On *day* (from the start, fractions allowed), move the stable *percent* cohort of
    linked accounts forward to *phase* (a cohort never moves back: its accounts already past
    *phase* stay where they are). Gates decide per account; a held account is tried again at
    the next step.

    A *reverse* step rolls back the forward step just before it (in day order): each account
    that step moved goes back to the phase it had before it (``bridgectl cohort reverse``),
    with the back-fill to legacy when it leaves cloud-only. It has no *phase*; its
    *percent*, if given, must be the forward step's (a check that the plan says what its
    author meant).
    """

    day: float
    percent: int | None = None
    phase: str | None = None
    reverse: bool = False

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self.day, (int, float)) and math.isfinite(self.day)
                and self.day >= 0):
            raise ValueError(f"a plan step's day must be a number >= 0, not {self.day!r}")
        if not isinstance(self.reverse, bool):
            raise ValueError(f"a plan step's reverse must be true or false, "
                             f"not {self.reverse!r}")
        if self.percent is None and not self.reverse:
            raise ValueError("missing 'percent'")
        if self.percent is not None and (
                not isinstance(self.percent, int) or isinstance(self.percent, bool)
                or not 0 <= self.percent <= 100):
            raise ValueError(f"a plan step's percent must be a whole number 0..100, "
                             f"not {self.percent!r}")
        if self.reverse:
            if self.phase is not None:
                raise ValueError(
                    "a reverse step has no phase: it moves each account of the forward step "
                    "before it back to the phase it had before that step")
        elif self.phase is None:
            raise ValueError("missing 'phase'")
        elif self.phase not in PHASES[1:]:
            raise ValueError(f"a plan step's phase must be one of {', '.join(PHASES[1:])}, "
                             f"not {self.phase!r}")

    def label(self) -> str:
        """The step as a plan file reader would say it."""
        if self.reverse:
            return f"day {self.day:g}: reverse"
        return f"day {self.day:g}: {self.percent}% to {self.phase}"


#: The built-in plan, laid out over 45 days (``default_plan`` stretches it to the run):
#: a pilot cohort, then wider waves, each cohort dual for a few days before cloud, and the
#: first cloud-only accounts after three weeks, past the legacy retention's first month.
#: The second cloud-only wave (day 32, past the first month: the legacy network is already
#: dropping history) is rolled back two days later, as an operator would on a bad report,
#: with what its accounts posted meanwhile back-filled to legacy; a day later it goes
#: forward again. ``None`` marks a reverse step.
_DEFAULT_45: tuple[tuple[float, int | None, str | None], ...] = (
    (2, 5, "dual"), (4, 5, "cloud"), (6, 20, "dual"), (9, 20, "cloud"),
    (12, 50, "dual"), (16, 50, "cloud"), (20, 5, "cloud-only"), (24, 80, "dual"),
    (28, 80, "cloud"), (32, 20, "cloud-only"), (34, None, None), (35, 20, "cloud-only"),
    (36, 100, "dual"), (40, 100, "cloud"), (43, 50, "cloud-only"))


def default_plan(days: float) -> tuple[PlanStep, ...]:
    """The built-in plan, its days scaled from 45 to *days*."""
    scale = days / 45.0
    return tuple(PlanStep(round(d * scale, 3), p, ph, reverse=ph is None)
                 for d, p, ph in _DEFAULT_45)


def check_plan(steps: tuple[PlanStep, ...] | list[PlanStep]) -> tuple[PlanStep, ...]:
    """The steps in day order (steps of the same day in the order given), each reverse
    checked against the forward step it undoes. ValueError ``plan step N: ...`` (N: the
    step's place as given, from 1)."""
    order = sorted(enumerate(steps, 1), key=lambda item: item[1].day)
    last: tuple[int, PlanStep] | None = None  # the latest step, forward or reverse
    for n, step in order:
        if step.reverse:
            if last is None:
                raise ValueError(f"plan step {n}: a reverse undoes the forward step before "
                                 f"it, and no forward step comes before day {step.day:g}")
            m, before = last
            if before.reverse:
                raise ValueError(
                    f"plan step {n}: a reverse undoes the forward step just before it, but "
                    f"step {m} ({before.label()}) is a reverse already: move forward again "
                    "before another reverse")
            if step.percent is not None and step.percent != before.percent:
                raise ValueError(
                    f"plan step {n}: this reverse undoes step {m} ({before.label()}): its "
                    f"percent must be {before.percent} or left out, not {step.percent}")
        last = (n, step)
    return tuple(step for _, step in order)


def parse_plan(text: str) -> tuple[PlanStep, ...]:
    """A plan file: JSON, a list of ``{"day": D, "percent": P, "phase": "dual"}`` (or
    ``[D, P, "dual"]``) steps, and ``{"day": D, "reverse": true}`` rollbacks (optionally
    with the percent of the step they undo). ValueError naming the step that is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the plan is not JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError("the plan must be a non-empty JSON list of steps")
    steps = []
    for i, item in enumerate(raw, 1):
        try:
            if isinstance(item, dict):
                extra = set(item) - {"day", "percent", "phase", "reverse"}
                if extra:
                    raise ValueError(f"unknown key {sorted(extra)[0]!r} (a step has day, "
                                     "percent and phase, or day and reverse)")
                steps.append(PlanStep(item["day"], item.get("percent"), item.get("phase"),
                                      reverse=item.get("reverse", False)))
            elif isinstance(item, list) and len(item) == 3:
                steps.append(PlanStep(*item))
            else:
                raise ValueError('want {"day": D, "percent": P, "phase": NAME} or '
                                 '{"day": D, "reverse": true}')
        except KeyError as e:
            raise ValueError(f"plan step {i}: missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"plan step {i}: {e}") from None
    return check_plan(steps)


@attrs.frozen
class FaultProfile:
    """What ``--faults`` means over a months-long run. Rates are per simulated day."""

    #: supernode crashes (memory lost, restarted after ``restart_after_s``)
    crashes_per_day: float = 0.0
    restart_after_s: float = 120.0
    #: link drops (one supernode connection closed)
    link_drops_per_day: float = 0.0
    #: windows of per-hop loss, duplication and delay (the legacy preset of that name)
    hop_windows_per_day: float = 0.0
    hop_window_s: float = 1800.0
    hop_preset: str = "none"
    #: pushes the simulated gateway loses or refuses
    push_loss: float = 0.0
    push_errors: float = 0.0
    #: bridge workers killed (as SIGKILL: nothing drained or released), restarted after
    #: ``worker_restart_s`` under a new id
    worker_kills_per_day: float = 0.0
    worker_restart_s: float = 60.0
    #: the 2010 outage, at this fraction of the run (None: none)
    outage_at: float | None = None


FAULTS: dict[str, FaultProfile] = {
    "none": FaultProfile(),
    "light": FaultProfile(crashes_per_day=0.5, link_drops_per_day=4, hop_windows_per_day=0.5,
                          hop_preset="light", push_loss=0.02, worker_kills_per_day=0.5),
    "heavy": FaultProfile(crashes_per_day=3, link_drops_per_day=20, hop_windows_per_day=2,
                          hop_preset="heavy", push_loss=0.1, push_errors=0.05,
                          worker_kills_per_day=2),
    "outage-2010": FaultProfile(crashes_per_day=0.5, link_drops_per_day=4,
                                hop_windows_per_day=0.5, hop_preset="light", push_loss=0.02,
                                worker_kills_per_day=0.5, outage_at=0.6),
}


def _positive_int(name: str, low: int, high: int) -> Any:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"--{name} must be a whole number between {low} and {high}")
    return check


def _finite(name: str, low: float, high: float) -> Any:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or not low < value <= high:
            raise ValueError(f"--{name} must be a number above {low:g} and at most {high:g}")
    return check


@attrs.frozen
class SimConfig:
    """One simulated migration."""

    days: float = attrs.field(default=45.0, validator=_finite("days", 0, 3650))
    users: int = attrs.field(default=2000, validator=_positive_int("users", 2, 1_000_000))
    #: None: sized from the users (``ring_size``); an int once built
    supernodes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive_int("supernodes", 1, 5000)))
    #: messages per user per simulated day, spread over the working-day cycle
    rate: float = attrs.field(default=3.0, validator=_finite("rate", 0, 10_000))
    seed: int = attrs.field(default=1, validator=_positive_int("seed", 0, 2**63 - 1))
    faults: str = "light"
    plan: tuple[PlanStep, ...] | None = None  # None: default_plan(days)
    #: the seed's intermediate stage: supernodes on fixed hosts that restart only by faults
    dedicated_supernodes: bool = False
    #: cron interval of the reconcilers, in simulated hours
    reconcile_every_h: float = attrs.field(default=6.0, validator=_finite(
        "reconcile-every", 0, 24 * 30))
    #: bridge workers sharing the feeds
    workers: int = attrs.field(default=1, validator=_positive_int("workers", 1, 16))
    #: the legacy devices' client versions, e.g. "7.1:0.2,8.0:0.8" (``legacy.versions``);
    #: "": they report none
    client_versions: str = ""
    #: (day, version): from that day on the login server refuses older clients
    min_versions: tuple[tuple[float, str], ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.supernodes is None:
            object.__setattr__(self, "supernodes", ring_size(
                self.users, dedicated=self.dedicated_supernodes))
        if self.faults not in FAULTS:
            raise ValueError(f"--faults must be one of {', '.join(FAULTS)}")
        if self.client_versions:
            try:
                parse_spread(self.client_versions)
            except ValueError as e:
                raise ValueError(f"--client-versions: {e}") from None
        for day, version in self.min_versions:
            if not (isinstance(day, (int, float)) and math.isfinite(day) and day >= 0):
                raise ValueError(f"--min-version: the day must be a number >= 0, not {day!r}")
            if day >= self.days:
                raise ValueError(f"--min-version: day {day:g} is not within the run's "
                                 f"{self.days:g} days")
            try:
                normalize(version)
            except ValueError as e:
                raise ValueError(f"--min-version: {e}") from None
        if self.plan is not None:
            check_plan(self.plan)

    @property
    def steps(self) -> tuple[PlanStep, ...]:
        """The plan's steps in day order (``check_plan``)."""
        return check_plan(self.plan if self.plan is not None else default_plan(self.days))

    @property
    def profile(self) -> FaultProfile:
        return FAULTS[self.faults]
