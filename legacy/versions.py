"""Client versions: how a legacy client names its version, and how a run spreads them.

A version is dotted decimal numbers, one to four of them, each at most 65535 (``7.4``,
``8.0.1``); it compares as the tuple of its numbers, so ``8.0`` < ``8.0.1`` < ``8.1``. A
client that reports none (an old client sending ``LoginRequest``) has version ``0``, which
every minimum refuses. A spread (``7.1:0.2,7.4:0.5,8.0:0.3``) gives each version a weight;
a run draws each device's version from it with its own seeded stream.
"""

from __future__ import annotations

import random

import attrs

#: The version of a client that reported none.
UNKNOWN = "0"
MAX_PARTS = 4
MAX_PART = 65535


def parse_version(text: str) -> tuple[int, ...]:
    """The numbers of *text* (``"7.4"`` -> ``(7, 4)``); ``ValueError`` with a reason for
    anything that is not one to four dot-separated decimal numbers."""
    if not isinstance(text, str):
        raise ValueError(f"a version is text, not {type(text).__name__}")
    parts = text.split(".")
    if not text or len(parts) > MAX_PARTS or not all(p.isascii() and p.isdigit()
                                                     for p in parts):
        raise ValueError(f"bad version {text!r}: give one to {MAX_PARTS} dot-separated "
                         f"numbers, e.g. 7.4 or 8.0.1")
    numbers = tuple(int(p) for p in parts)
    if any(n > MAX_PART for n in numbers) or any(len(p) > 5 for p in parts):
        raise ValueError(f"bad version {text!r}: each number is at most {MAX_PART}")
    return numbers


def normalize(text: str) -> str:
    """*text* as a version written canonically (``"07.4"`` -> ``"7.4"``); ``ValueError``
    when it is not a version."""
    return ".".join(str(n) for n in parse_version(text))


def at_least(version: str, minimum: str) -> bool:
    """Whether *version* is *minimum* or newer (both valid versions)."""
    return _padded(parse_version(version)) >= _padded(parse_version(minimum))


def _padded(numbers: tuple[int, ...]) -> tuple[int, ...]:
    return numbers + (0,) * (MAX_PARTS - len(numbers))


@attrs.frozen
class VersionSpread:
    """Versions with weights; ``pick`` draws one."""

    entries: tuple[tuple[str, float], ...] = ()

    def pick(self, rng: random.Random) -> str | None:
        """A version drawn by weight, or None for an empty spread (clients report none)."""
        if not self.entries:
            return None
        return rng.choices([v for v, _ in self.entries],
                           weights=[w for _, w in self.entries])[0]

    def to_text(self) -> str:
        return ",".join(f"{v}:{w:g}" for v, w in self.entries)


def parse_spread(text: str) -> VersionSpread:
    """``"7.1:0.2,7.4:0.5,8.0:0.3"`` as a spread (a version without a weight weighs 1);
    ``ValueError`` with a reason for a bad version, a bad or negative weight, a version
    named twice, or weights that sum to zero."""
    entries: list[tuple[str, float]] = []
    for item in text.split(","):
        version, _, weight = item.strip().partition(":")
        version = normalize(version.strip())
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} for version {version}") from None
        if not w >= 0 or w == float("inf"):
            raise ValueError(f"bad weight {weight!r} for version {version}: a number >= 0")
        if any(v == version for v, _ in entries):
            raise ValueError(f"version {version} is named twice")
        entries.append((version, w))
    if sum(w for _, w in entries) <= 0:
        raise ValueError("the weights of the client versions sum to zero")
    return VersionSpread(tuple(entries))
