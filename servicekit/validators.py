"""attrs validators for configuration values, shared by every package's config classes.

Configuration is checked where it is built (STYLE.md: frozen attrs values, validators where
input arrives), so a nonsensical setting fails at once with the field's name and the value
given, instead of as a server that refuses everyone or a loop that never ticks.

``positive`` accepts any number above 0 (infinity included: "no limit" is a setting some
callers may mean); ``finite_number`` is for values that must also be finite, with a lower
bound and optionally an upper one (``finite_number(0, inclusive=True)`` is "not negative").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float))


def positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An attrs validator: a number above 0 (NaN is not)."""
    if not (_is_number(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def finite_number(low: float, *, inclusive: bool, high: float | None = None) -> Validator:
    """An attrs validator: a finite number above *low* (or equal, when *inclusive*), and at
    most *high* when given."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        above = _is_number(value) and (value >= low if inclusive else value > low)
        if not above or not math.isfinite(value) or (high is not None and value > high):
            bound = f"{'>=' if inclusive else '>'} {low}"
            if high is not None:
                bound += f" and <= {high}"
            raise ValueError(f"{attribute.name} must be a finite number {bound}, got {value!r}")

    return check
