"""The shared attrs validators: what they accept, and that a refusal names the field."""

from __future__ import annotations

import math

import attrs
import pytest

from servicekit.validators import finite_number, positive


@attrs.frozen
class Settings:
    size: float = attrs.field(default=1, validator=positive)
    delay_s: float = attrs.field(default=0.0, validator=finite_number(0, inclusive=True))
    share: float = attrs.field(default=0.5,
                               validator=finite_number(0, inclusive=False, high=1.0))


@pytest.mark.parametrize("value", [1, 0.001, 10**9, math.inf])
def test_positive_accepts_any_number_above_zero(value):
    """Integers, floats and infinity ("no limit") above 0 are positive."""
    assert Settings(size=value).size == value


@pytest.mark.parametrize("value", [0, -1, -0.5, math.nan, "3", None])
def test_positive_refuses_the_rest_naming_the_field_and_value(value):
    """Zero, negatives, NaN and non-numbers are a ValueError naming the field and value."""
    with pytest.raises(ValueError, match=r"^size must be a positive number, got "):
        Settings(size=value)


@pytest.mark.parametrize("kwargs", [{"delay_s": 0}, {"delay_s": 2.5}, {"share": 1.0},
                                    {"share": 1e-9}])
def test_finite_number_accepts_values_within_bounds(kwargs):
    """The low bound counts only when inclusive; the high bound always counts."""
    Settings(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"delay_s": -0.1}, "delay_s must be a finite number >= 0, got -0.1"),
    ({"delay_s": math.inf}, "delay_s must be a finite number >= 0, got inf"),
    ({"delay_s": math.nan}, "delay_s must be a finite number >= 0, got nan"),
    ({"delay_s": "1"}, "delay_s must be a finite number >= 0, got '1'"),
    ({"share": 0.0}, "share must be a finite number > 0 and <= 1.0, got 0.0"),
    ({"share": 1.5}, "share must be a finite number > 0 and <= 1.0, got 1.5"),
])
def test_finite_number_refuses_out_of_bounds_with_the_bound_in_the_message(kwargs, message):
    """Out of bounds, infinite, NaN or not a number: a ValueError saying what was expected."""
    with pytest.raises(ValueError) as info:
        Settings(**kwargs)
    assert str(info.value) == message
