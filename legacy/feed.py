"""A supernode's ordered change feed: an epoch, gapless offsets, a bounded replay buffer."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class FeedPosition:
    """Where a subscriber will resume, and any range it can never get back."""

    start: int
    gap: str  # "none", "epoch", "expired" or "ahead"
    gap_epoch: int = 0
    gap_from: int = 0
    gap_to: int = 0


class Feed:
    """Entries are feed frames (``FeedMessage`` etc.) whose ``offset`` this feed assigns."""

    def __init__(self, epoch: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("feed capacity must be positive")
        self.epoch = epoch
        self.capacity = capacity
        # A list read by index, its evicted head cut off in bulk: a deque's index costs a walk
        # from its nearer end, and a subscriber catching up reads the middle (8% of a
        # supernode's time serving a 12,500-entry backlog).
        self._entries: list[Any] = []
        self._evicted = 0  # entries at the list's head that fell out of the buffer
        self.first_offset = 0
        self.next_offset = 0

    def append(self, make_entry: Any) -> Any:
        """Append ``make_entry(offset)`` and return it, evicting the oldest past capacity."""
        entry = make_entry(self.next_offset)
        self._entries.append(entry)
        self.next_offset += 1
        if self.next_offset - self.first_offset > self.capacity:
            self.first_offset += 1
            self._evicted += 1
            if self._evicted >= max(1024, self.capacity // 8):
                # amortized: one memmove per capacity/8 evictions; what is kept beyond the
                # buffer is under an eighth of it, or under 1,024 entries for a small one
                del self._entries[:self._evicted]
                self._evicted = 0
        return entry

    def get(self, offset: int) -> Any:
        if not self.first_offset <= offset < self.next_offset:
            raise IndexError(f"offset {offset} is not in the buffer")
        return self._entries[self._evicted + offset - self.first_offset]

    def position_for(self, epoch: int, offset: int) -> FeedPosition:
        """Where a subscriber asking for (epoch, offset) resumes.

        Epoch 0 means "from the start of what you have". An old epoch or an offset that fell out
        of the buffer is a gap, reported so the range can be repaired, never silently skipped.
        An offset beyond this feed's end in this epoch ("ahead") was read from another
        incarnation that had the same epoch (a network started again with the same seed,
        before epochs mixed in a run id): what that one held from *offset* on is gone, and
        this feed is new to the subscriber, so it resumes at this feed's start. Waiting for
        the feed to grow past *offset* would skip every entry before it.
        """
        if epoch == 0:
            if self.first_offset > 0:
                return FeedPosition(self.first_offset, "expired", self.epoch, 0, self.first_offset)
            return FeedPosition(0, "none")
        if epoch != self.epoch:
            return FeedPosition(self.first_offset, "epoch", epoch, offset, 0)
        if offset > self.next_offset:
            return FeedPosition(self.first_offset, "ahead", epoch, offset, 0)
        if offset < self.first_offset:
            return FeedPosition(self.first_offset, "expired", epoch, offset, self.first_offset)
        return FeedPosition(offset, "none")
