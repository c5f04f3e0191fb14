"""How long to wait before trying again: exponential backoff with a cap and jitter.

A ``RetryPolicy`` only computes delays; the caller schedules the retry on its own injected
clock and decides which errors deserve one. With ``initial_s=0.5, factor=2, cap_s=10``::

    attempt:   1    2    3    4    5     6 ...
    base (s):  0.5  1    2    4    8    10   (capped)

and the delay is the base minus up to ``jitter`` of it, drawn from the caller's seeded
``random.Random``, so that many clients failing together do not retry in lockstep and a
seed still reproduces a run. Jitter only ever shortens a delay: ``cap_s`` is a hard bound.

``jitter_mode="spread"`` spreads the delay on both sides of the base instead, over
``[base*(1-jitter), base*(1+jitter)]``: the legacy network's clients and supernode links
have always backed off as ``base * (0.5 + r)``, which is ``jitter=0.5`` spread, bit for bit
(a seeded simulation's trace depends on it). There ``cap_s`` bounds the base, not the delay.
"""

from __future__ import annotations

import random

import attrs

from servicekit.validators import finite_number as _finite


@attrs.frozen
class RetryPolicy:
    """Exponential backoff: ``min(cap_s, initial_s * factor**(attempt - 1))``, jittered.

    ``jitter`` is the fraction (0..1) of the delay that may be taken off at random: 0 gives
    exact exponential delays, 1 gives "full jitter" (anything from 0 to the base delay).
    """

    initial_s: float = attrs.field(default=1.0, converter=float,
                                   validator=_finite(0.0, inclusive=False))
    factor: float = attrs.field(default=2.0, converter=float,
                                validator=_finite(1.0, inclusive=True))
    cap_s: float = attrs.field(default=60.0, converter=float,
                               validator=_finite(0.0, inclusive=False))
    jitter: float = attrs.field(default=0.1, converter=float,
                                validator=_finite(0.0, inclusive=True, high=1.0))
    #: "shorten": take up to ``jitter`` of the delay off; "spread": add or take off up to it.
    jitter_mode: str = attrs.field(default="shorten",
                                   validator=attrs.validators.in_(("shorten", "spread")))

    def __attrs_post_init__(self) -> None:
        if self.cap_s < self.initial_s:
            raise ValueError(f"cap_s ({self.cap_s}) must not be below initial_s "
                             f"({self.initial_s})")

    def base_delay(self, attempt: int) -> float:
        """The delay before retry number *attempt* (1 = the first retry), without jitter."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an integer >= 1, got {attempt!r}")
        try:
            return min(self.cap_s, self.initial_s * self.factor ** (attempt - 1))
        except OverflowError:  # a huge attempt number: long past the cap
            return self.cap_s

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number *attempt*, in ``[base*(1-jitter), base]``
        (``[base*(1-jitter), base*(1+jitter)]`` when the jitter mode is "spread").

        Draws exactly one number from *rng* per call (even with no jitter), so a seeded run
        stays reproducible whatever the policy.
        """
        base = self.base_delay(attempt)
        if self.jitter_mode == "spread":
            # (1 - j) + 2j*r, not 1 + j*(2r - 1): with j = 0.5 this is exactly 0.5 + r
            return base * ((1.0 - self.jitter) + 2.0 * self.jitter * rng.random())
        return base * (1.0 - self.jitter * rng.random())
