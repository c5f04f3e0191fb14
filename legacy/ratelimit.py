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

from servicekit.ratelimit import FailureLimiter, FailureLimits, TokenBuckets
from servicekit.validators import positive


@attrs.frozen(kw_only=True)
class LoginLimits(FailureLimits):
    """How many failed logins are allowed per handle and per peer address per window."""

    #: failed logins per handle (known or not) per window
    per_handle: int = attrs.field(default=10, validator=positive)


class LoginLimiter(FailureLimiter):
    """Failed-login budgets per handle and per peer address."""

    def __init__(self, clock: IReactorTime, limits: LoginLimits | None = None) -> None:
        self.limits = limits or LoginLimits()
        super().__init__(clock, self.limits.per_handle, self.limits)

    @property
    def handles(self) -> TokenBuckets:
        """The budgets per handle."""
        return self.principals
