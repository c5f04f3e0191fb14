"""Login rate limiting for the cloud API: failed logins per account and per client address,
per deployment.

The budgets are ``servicekit.ratelimit``'s failure budgets (token buckets spent only by
failures), kept in the store (``cloud.store.login_limits``, table ``login_buckets``) rather
than in the process: every ``cloud run`` behind a load balancer spends and checks the same
budget, so a guesser gets 10 tries per account per minute from the deployment, not 10 from
each process. A login takes one try from its account's budget (or its unknown login name's)
and one from its client address's *before* the password is checked, in one statement, and
gets both back when the password was right; past the budget it gets a 429 that costs no
password work::

    address_wait_s(address)      one read: an address that spent its budget is refused
                                 before the account is even looked up
    attempt(principal, address)  one statement: take from both budgets, or from neither
    succeeded(principal, address) one statement: give both back

Every call passes the injected clock's time. The table holds only budgets that are not
full; every ``PRUNE_INTERVAL_S`` an attempt also deletes those that are full again, and
keeps at most ``max_keys`` per scope (those that will be full soonest go first), so a flood
of distinct names or addresses can not grow it without bound.
"""

from __future__ import annotations

import math

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cloud.db import TransactionRunner
from cloud.store import login_limits as store
from servicekit.ratelimit import FailureLimits
from servicekit.validators import positive

log = Logger()

#: Seconds between two prunings of the table by one API process.
PRUNE_INTERVAL_S = 10.0


@attrs.frozen(kw_only=True)
class LoginLimits(FailureLimits):
    """How many failed logins are allowed per account and per client address per window."""

    #: failed logins per account (or per unknown login name) per window
    per_account: int = attrs.field(default=10, validator=positive)


class LoginLimiter:
    """Failed-login budgets per account and per client address, in the store."""

    def __init__(self, db: TransactionRunner, clock: IReactorTime,
                 limits: LoginLimits | None = None,
                 scopes: tuple[str, str] = store.SCOPES) -> None:
        self.limits = limits or LoginLimits()
        #: the (per account, per address) scopes of its budgets: the logins' by default,
        #: ``store.RECOVERY_SCOPES`` for account recovery
        self._scopes = scopes
        self._db, self._clock = db, clock
        self._window_ms = self.limits.window_s * 1000
        self._pruned_s: float | None = None
        self._pruning: defer.Deferred | None = None

    def _now_ms(self) -> float:
        return self._clock.seconds() * 1000

    def _address(self, address: str) -> store.Budget:
        return store.Budget(self._scopes[1], address, self.limits.per_address, self._window_ms)

    def _both(self, principal: str, address: str) -> list[store.Budget]:
        return [store.Budget(self._scopes[0], principal, self.limits.per_account, self._window_ms),
                self._address(address)]

    async def address_wait_s(self, address: str) -> float:
        """Seconds until *address* may try again (0.0: now); takes nothing."""
        wait = await self._db.run("login_budget_wait", store.wait_ms, self._address(address),
                                  self._now_ms())
        return wait / 1000

    async def attempt(self, principal: str, address: str) -> float:
        """Take one try from both budgets and return 0.0, or, when either is spent, take
        nothing and return the seconds until both have a try again."""
        wait = await self._db.run("login_budget_take", store.try_take,
                                  self._both(principal, address), self._now_ms())
        self._prune_now_and_then()
        return wait / 1000

    async def succeeded(self, principal: str, address: str) -> None:
        """The password was right: give back the tries ``attempt`` took."""
        await self._db.run("login_budget_give_back", store.give_back,
                           self._both(principal, address), self._now_ms())

    def prune(self) -> defer.Deferred:
        """Delete the budgets that are full again, and keep at most ``max_keys`` per scope;
        fires with how many rows went."""
        self._pruned_s = self._clock.seconds()
        return self._db.run("prune_login_budgets", store.prune, self._now_ms(),
                            self.limits.max_keys)

    def _prune_now_and_then(self) -> None:
        """Prune in the background, every ``PRUNE_INTERVAL_S`` while logins fail (no failed
        login, no new row: nothing to prune); a failure is logged and the next one tries."""
        now = self._clock.seconds()
        if self._pruning is not None or (
                self._pruned_s is not None and now - self._pruned_s < PRUNE_INTERVAL_S):
            return
        d = self._pruning = self.prune()
        d.addErrback(lambda f: log.warn("pruning the login budgets failed: {e}",
                                        e=f.getErrorMessage()))
        d.addBoth(lambda _: setattr(self, "_pruning", None))


def retry_after_header(wait_s: float) -> str:
    """A Retry-After value in whole seconds, never 0 for a refusal."""
    return str(max(1, math.ceil(wait_s)))
