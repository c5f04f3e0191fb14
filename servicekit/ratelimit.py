"""Failure budgets on token buckets: failed attempts per principal and per client address.

Each key (a principal, a client address) has a token bucket of ``capacity`` failures that
refills at ``capacity`` per ``window_s``. An attempt takes one token from its principal's
bucket and one from its address's bucket *before* the costly check (a password hash), and
gives both back when the check passed: only failures spend the budget, so many honest users
behind one address (a NAT, a proxy, a simulation on loopback) are never throttled, while
someone guessing gets ``capacity`` tries per window and then a refusal that costs no check
at all::

    attempt(principal, address) --both have a token--> take both -> check
                                                             passed -> succeeded(): give back
                                --either is empty---> seconds until one refills (refused)

Memory is bounded: buckets live in least-recently-used order, a bucket that has refilled
completely holds no information and is dropped, and past ``max_keys`` per table the least
recently used bucket goes first (a flood of distinct keys can not grow memory, at worst it
forgets an older, quieter key early).

The legacy login server uses it as it is (``legacy.ratelimit``, per handle, in memory); the
cloud API keeps the same budgets, with the same ``FailureLimits`` and arithmetic, in its
store (``cloud.ratelimit``, per account), so that they hold across its processes.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

from servicekit.validators import positive


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
        """Return one token to *key* (an attempt that turned out right)."""
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


@attrs.frozen(kw_only=True)
class FailureLimits:
    """Failed attempts allowed per client address per window, and the memory bound; a
    stack's limits add the per-principal budget under their own name (handle, account)."""

    #: failed attempts per client address per window
    per_address: int = attrs.field(default=30, validator=positive)
    window_s: float = attrs.field(default=60.0, validator=positive)
    #: buckets kept per table (principals, addresses) at most
    max_keys: int = attrs.field(default=10_000, validator=positive)


class FailureLimiter:
    """Failed-attempt budgets per principal and per client address (see the module
    docstring)."""

    def __init__(self, clock: IReactorTime, per_principal: int, limits: FailureLimits) -> None:
        self.principals = TokenBuckets(clock, per_principal, limits.window_s, limits.max_keys)
        self.addresses = TokenBuckets(clock, limits.per_address, limits.window_s,
                                      limits.max_keys)

    def address_wait_s(self, address: str) -> float:
        """Seconds until *address* may try again (0.0: now); takes nothing."""
        return self.addresses.wait_s(address)

    def attempt(self, principal: str, address: str) -> float:
        """Take one try from both budgets and return 0.0, or, when either is spent, take
        nothing and return the seconds until both have a try again."""
        wait = max(self.principals.wait_s(principal), self.addresses.wait_s(address))
        if wait > 0:
            return wait
        self.principals.take(principal)
        self.addresses.take(address)
        return 0.0

    def succeeded(self, principal: str, address: str) -> None:
        """The check passed: give back the tries ``attempt`` took."""
        self.principals.give_back(principal)
        self.addresses.give_back(address)
