"""A ``DeferredSemaphore`` whose limit can change while it is in use.

Twisted's semaphore has a fixed limit. An operator who changes a concurrency at runtime
(``bridgectl control set injector-concurrency``) needs it to change in place, without
waiting for the holders to finish and without dropping the waiters:

- raising the limit hands the new tokens to waiters at once (or keeps them free);
- lowering it takes free tokens away at once, and the rest as holders release theirs
  (``owed``): no holder is interrupted, and no new one acquires until fewer than the new
  limit hold a token.
"""

from __future__ import annotations

from twisted.internet import defer


class ResizableSemaphore(defer.DeferredSemaphore):
    """A ``DeferredSemaphore`` with ``resize(limit)``; otherwise the same."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        #: tokens still to be taken away from holders as they release (after a shrink)
        self.owed = 0

    @property
    def holders(self) -> int:
        """How many hold a token now."""
        return self.limit + self.owed - self.tokens

    def resize(self, limit: int) -> None:
        """Let at most *limit* hold a token from now on (see the module docstring)."""
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"a semaphore's limit must be a positive integer, not {limit!r}")
        change, self.limit = limit - self.limit, limit
        if change >= 0:
            repaid = min(self.owed, change)
            self.owed -= repaid
            for _ in range(change - repaid):
                super().release()  # one more token: to the first waiter, or kept free
        else:
            taken = min(self.tokens, -change)
            self.tokens -= taken
            self.owed += -change - taken

    def release(self) -> None:
        """Give a token back, unless it is owed to a shrink (then it is gone)."""
        if self.owed:
            self.owed -= 1
            return
        super().release()
