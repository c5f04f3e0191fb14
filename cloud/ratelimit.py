"""Login rate limiting for the cloud API: failed logins per account and per client address.

The algorithm is ``servicekit.ratelimit``'s failure budgets (token buckets per key, spent
only by failures, bounded memory); this module holds the cloud API's limits and its
``Retry-After`` header. A login takes one try from its account's budget (or its unknown
login name's) and one from its client address's *before* the password is checked, and gets
both back when the password was right; past the budget it gets a 429 that costs no
password work.
"""

from __future__ import annotations

import math

import attrs
from twisted.internet.interfaces import IReactorTime

from servicekit.ratelimit import FailureLimiter, TokenBuckets
from servicekit.validators import positive


@attrs.frozen
class LoginLimits:
    """How many failed logins are allowed per account and per client address per window."""

    #: failed logins per account (or per unknown login name) per window
    per_account: int = attrs.field(default=10, validator=positive)
    #: failed logins per client address per window
    per_address: int = attrs.field(default=30, validator=positive)
    window_s: float = attrs.field(default=60.0, validator=positive)
    #: buckets kept per table (accounts, addresses) at most
    max_keys: int = attrs.field(default=10_000, validator=positive)


class LoginLimiter(FailureLimiter):
    """Failed-login budgets per account and per client address."""

    def __init__(self, clock: IReactorTime, limits: LoginLimits | None = None) -> None:
        self.limits = limits or LoginLimits()
        lim = self.limits
        super().__init__(clock, per_principal=lim.per_account, per_address=lim.per_address,
                         window_s=lim.window_s, max_keys=lim.max_keys)

    @property
    def accounts(self) -> TokenBuckets:
        """The budgets per account."""
        return self.principals


def retry_after_header(wait_s: float) -> str:
    """A Retry-After value in whole seconds, never 0 for a refusal."""
    return str(max(1, math.ceil(wait_s)))
