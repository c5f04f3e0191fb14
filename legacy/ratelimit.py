"""Login rate limiting for the legacy login server: failed logins per handle and per address.

Each key (a handle, a peer address) has a token bucket of ``capacity`` failed logins that
refills at ``capacity`` per ``window_s``. A ``LoginRequest`` takes one token from its handle's
bucket and one from its address's bucket *before* the password is checked, and gives both
back when the password was right: only failures spend the budget, so many honest users
behind one address (a NAT, or every simulated client on loopback) are never throttled,
while someone guessing gets ``capacity`` tries per window and then an ``Error`` frame with
code ``rate_limited`` that costs no password work at all::

    attempt(handle, address) --both have a token--> take both -> check the password
                                                          right -> succeeded(): give back
                             --either is empty---> seconds until one refills (refused)

Memory is bounded: buckets live in least-recently-used order, a bucket that has refilled
completely holds no information and is dropped, and past ``max_keys`` per table the least
recently used bucket goes first (a flood of distinct handles can not grow memory, at worst
it forgets an older, quieter key early).

``cloud.ratelimit`` is the same algorithm for the cloud API: the two stacks are independent
systems (ARCHITECTURE.md: ``legacy`` and ``cloud`` never import each other), so each has its
own copy, and one test suite checks both.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime


def _positive(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.frozen
class LoginLimits:
    """How many failed logins are allowed per handle and per peer address per window."""

    #: failed logins per handle (known or not) per window
    per_handle: int = attrs.field(default=10, validator=_positive)
    #: failed logins per peer address per window
    per_address: int = attrs.field(default=30, validator=_positive)
    window_s: float = attrs.field(default=60.0, validator=_positive)
    #: buckets kept per table (handles, addresses) at most
    max_keys: int = attrs.field(default=10_000, validator=_positive)


class TokenBuckets:
    """Token buckets by key on an injected clock, with bounded memory.

    A bucket is stored as what it has spent (``used``) at a time; it refills continuously,
    so ``used`` decays by ``capacity / window_s`` per second. Keys absent from the table
    have a full bucket.
    """

    def __init__(self, clock: IReactorTime, capacity: int, window_s: float,
                 max_keys: int) -> None:
        self._clock = clock
        self.capacity = capacity
        self._rate = capacity / window_s  # tokens per second
        self._max_keys = max_keys
        self._spent: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (used, t)

    def __len__(self) -> int:
        return len(self._spent)

    def _used(self, key: str, now: float) -> float:
        entry = self._spent.get(key)
        if entry is None:
            return 0.0
        used, t = entry
        return max(0.0, used - (now - t) * self._rate)

    def wait_s(self, key: str) -> float:
        """Seconds until *key* has a whole token (0.0: it has one now)."""
        over = self._used(key, self._clock.seconds()) + 1 - self.capacity
        return over / self._rate if over > 1e-9 else 0.0

    def take(self, key: str) -> None:
        """Spend one token of *key* (callers check ``wait_s`` first)."""
        self._set(key, 1.0)

    def give_back(self, key: str) -> None:
        """Return one token to *key* (a login that turned out right)."""
        self._set(key, -1.0)

    def _set(self, key: str, delta: float) -> None:
        now = self._clock.seconds()
        used = max(0.0, self._used(key, now) + delta)
        self._spent.pop(key, None)
        if used > 0:
            self._spent[key] = (used, now)  # most recently used last
        self._evict(now)

    def _evict(self, now: float) -> None:
        spent = self._spent
        # The front is the least recently touched: drop what has refilled completely...
        while spent:
            key = next(iter(spent))
            if self._used(key, now) > 0:
                break
            del spent[key]
        # ... and, past the cap, the oldest even if it has not.
        while len(spent) > self._max_keys:
            spent.popitem(last=False)


class LoginLimiter:
    """Failed-login budgets per handle and per peer address (see the module docstring)."""

    def __init__(self, clock: IReactorTime, limits: LoginLimits | None = None) -> None:
        self.limits = limits or LoginLimits()
        lim = self.limits
        self.handles = TokenBuckets(clock, lim.per_handle, lim.window_s, lim.max_keys)
        self.addresses = TokenBuckets(clock, lim.per_address, lim.window_s, lim.max_keys)

    def address_wait_s(self, address: str) -> float:
        """Seconds until *address* may try again (0.0: now); takes nothing."""
        return self.addresses.wait_s(address)

    def attempt(self, handle: str, address: str) -> float:
        """Take one try from both budgets and return 0.0, or, when either is spent, take
        nothing and return the seconds until both have a try again."""
        wait = max(self.handles.wait_s(handle), self.addresses.wait_s(address))
        if wait > 0:
            return wait
        self.handles.take(handle)
        self.addresses.take(address)
        return 0.0

    def succeeded(self, handle: str, address: str) -> None:
        """The password was right: give back the tries ``attempt`` took."""
        self.handles.give_back(handle)
        self.addresses.give_back(address)
