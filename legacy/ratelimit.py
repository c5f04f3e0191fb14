"""Login rate limiting for the legacy login server: failed logins per handle and per address.

The algorithm is ``servicekit.ratelimit``'s failure budgets (token buckets per key, spent
only by failures, bounded memory); this module holds the legacy login server's limits. A
``LoginRequest`` takes one try from its handle's budget and one from its peer address's
*before* the password is checked, and gets both back when the password was right; past the
budget it gets an ``Error`` frame with code ``rate_limited`` that costs no password work.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime

from servicekit.ratelimit import FailureLimiter, TokenBuckets
from servicekit.validators import positive


@attrs.frozen
class LoginLimits:
    """How many failed logins are allowed per handle and per peer address per window."""

    #: failed logins per handle (known or not) per window
    per_handle: int = attrs.field(default=10, validator=positive)
    #: failed logins per peer address per window
    per_address: int = attrs.field(default=30, validator=positive)
    window_s: float = attrs.field(default=60.0, validator=positive)
    #: buckets kept per table (handles, addresses) at most
    max_keys: int = attrs.field(default=10_000, validator=positive)


class LoginLimiter(FailureLimiter):
    """Failed-login budgets per handle and per peer address."""

    def __init__(self, clock: IReactorTime, limits: LoginLimits | None = None) -> None:
        self.limits = limits or LoginLimits()
        lim = self.limits
        super().__init__(clock, per_principal=lim.per_handle, per_address=lim.per_address,
                         window_s=lim.window_s, max_keys=lim.max_keys)

    @property
    def handles(self) -> TokenBuckets:
        """The budgets per handle."""
        return self.principals
