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

from servicekit.ratelimit import FailureLimiter, FailureLimits, TokenBuckets
from servicekit.validators import positive


@attrs.frozen(kw_only=True)
class LoginLimits(FailureLimits):
    """How many failed logins are allowed per account and per client address per window."""

    #: failed logins per account (or per unknown login name) per window
    per_account: int = attrs.field(default=10, validator=positive)


class LoginLimiter(FailureLimiter):
    """Failed-login budgets per account and per client address."""

    def __init__(self, clock: IReactorTime, limits: LoginLimits | None = None) -> None:
        self.limits = limits or LoginLimits()
        super().__init__(clock, self.limits.per_account, self.limits)

    @property
    def accounts(self) -> TokenBuckets:
        """The budgets per account."""
        return self.principals


def retry_after_header(wait_s: float) -> str:
    """A Retry-After value in whole seconds, never 0 for a refusal."""
    return str(max(1, math.ceil(wait_s)))
