"""Consistent hashing over supernode ids: home SN of a chat, index owner of a handle."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence


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

    def owner(self, key: str) -> str:
        i = bisect.bisect(self._keys, _point(key)) % len(self._keys)
        return self._owners[i]

    def home_of(self, chat_id: str) -> str:
        """The supernode that orders and stores a conversation."""
        return self.owner("chat:" + chat_id)

    def index_owner(self, handle: str) -> str:
        """The supernode holding a handle's global-index entry and presence."""
        return self.owner("user:" + handle)
