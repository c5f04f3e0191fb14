"""What the store refuses: one exception per reason, each with a stable ``code``.

Every domain module raises these; the cloud API turns ``code`` into its error responses.
"""

from __future__ import annotations


class StoreError(Exception):
    """A request the store refuses; ``code`` is stable for APIs and tests."""

    code = "store_error"


class NotFound(StoreError):
    code = "not_found"


class NotMember(StoreError):
    code = "not_member"


class UnknownAccount(StoreError):
    """The account a request acts for does not exist (any more)."""

    code = "unknown_account"


class PhaseRefused(StoreError):
    """The account is not in a phase the request allows (e.g. posting while in legacy)."""

    code = "phase_refused"


class Conflict(StoreError):
    code = "conflict"


class TooManyMembers(StoreError, ValueError):
    """A conversation would have more than ``MAX_MEMBERS`` members; nothing was added."""

    code = "too_many_members"


class StaleFence(StoreError):
    """A checkpoint from a worker whose lease was taken over; the whole batch rolls back."""

    code = "stale_fence"
