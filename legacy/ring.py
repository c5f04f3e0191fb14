"""Consistent hashing over supernode ids: home SN of a chat, index owner of a handle."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

#: Answers a ring remembers before it starts over.
_MEMO_LIMIT = 1 << 20


def _point(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


class HashRing:
    """A static ring with virtual nodes; the same ids give the same answers everywhere."""

    def __init__(self, sn_ids: Sequence[str], vnodes: int = 64) -> None:
        if not sn_ids:
            raise ValueError("a ring needs at least one supernode")
        points = sorted((_point(f"{sn}#{v}"), sn) for sn in sn_ids for v in range(vnodes))
        self._keys = [p for p, _ in points]
        self._owners = [sn for _, sn in points]
        self.sn_ids = tuple(sn_ids)
        # The ring never changes, and every routed frame asks it again (a SHA-256 and a
        # bisection each time): remember the answers, up to a bound (the bridge asks about
        # every chat it ever mirrors).
        self._memo: dict[str, str] = {}

    def owner(self, key: str) -> str:
        sn = self._memo.get(key)
        if sn is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            i = bisect.bisect(self._keys, _point(key)) % len(self._keys)
            sn = self._memo[key] = self._owners[i]
        return sn

    def home_of(self, chat_id: str) -> str:
        """The supernode that orders and stores a conversation."""
        return self.owner("chat:" + chat_id)

    def index_owner(self, handle: str) -> str:
        """The supernode holding a handle's global-index entry and presence."""
        return self.owner("user:" + handle)
