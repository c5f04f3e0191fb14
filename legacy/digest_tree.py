"""A chat's range digests kept up to date on append and prune (docs/digest.md, "Maintained
digests"), so that a DigestRequest costs what the tree touches, not the chat's length.

::

    ChatDigestTree                        one per chat, beside its history (guid -> message)
      total         {node: [count, sum]}  every message, at 0, 4 and 8 bucket bits
      slots         slot id -> Slot       a slot is a time window of SLOT_MS, aligned to 0
        Slot.nodes  {node: [count, sum]}  the slot's messages, at 0 and 4 bucket bits
        Slot.guids  [guid]                sorted by ts_ms: a boundary slot is split here
        Slot.buckets array of uint32      each guid's bucket, beside it: a list of a range's
                                          GUIDs hashes none of them
      slot_ids      sorted slot ids       bisect finds the slots a time window covers

A node is a bucket prefix, keyed ``(1 << bits) | prefix``; the levels kept are those the gaps
reconciler's descent asks for (4 bits a step). A request ``(start, end, prefix_bits, prefix)``
split by ``k`` bits is answered at level ``prefix_bits + k``, one of two ways, whichever
touches less:

- inside: the sum of what each slot holds inside ``[start, end)``;
- outside: ``total`` less what each slot holds outside the window.

A slot wholly in (or out) gives its nodes; a boundary slot (at most two) is bisected by
time and only its smaller side is hashed. A level deeper than a slot keeps (5 to 8 bits) is
summed from the hashes of the slots' messages instead, and a level deeper than ``total``
keeps (9 bits and more) from the window's messages: that last, rare, request is counted in
``fallbacks``. Every answer equals ``digest.split_digests`` over the history; the tests
check that against random appends, prunes and restarts.

Memory: at most 17 nodes a slot and 273 for the chat, and per message one reference (its
slot's sorted list) and 4 bytes (its bucket); nothing else grows with the history.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Mapping

import attrs

from legacy.digest import MAX_PREFIX_BITS, MOD, guid_bucket, in_range, message_hash
from legacy.wire import ChatMessage, Digest, Range

#: Width of a time slot: a 30-day retention is 720 slots, and a boundary slot holds 1/720
#: of an evenly busy chat (of which only the smaller side is hashed).
SLOT_MS = 3_600_000
#: The bucket levels a slot keeps, and the deeper one the chat's total keeps as well.
SLOT_BITS = (0, 4)
TOTAL_BITS = (0, 4, 8)

Sums = tuple[list, list]  # per child: counts, totals


def _node(bits: int, prefix: int) -> int:
    return (1 << bits) | prefix


@attrs.define
class Slot:
    nodes: dict = attrs.Factory(dict)  # node -> [count, sum mod 2**64]
    guids: list = attrs.Factory(list)  # sorted by the messages' ts_ms
    buckets: array = attrs.Factory(lambda: array("I"))  # guid_bucket of guids[i], at i


@attrs.define
class Work:
    """What answering requests touched: aggregate nodes read and messages hashed."""

    nodes: int = 0
    messages: int = 0


def _apply(nodes: dict, levels: tuple, bucket: int, h: int, sign: int) -> None:
    """Add (sign 1) or take away (sign -1) one message's hash at each of *levels*."""
    for bits in levels:
        key = _node(bits, bucket >> (MAX_PREFIX_BITS - bits) if bits else 0)
        agg = nodes.get(key)
        if agg is None:
            nodes[key] = [1, h]  # only an add reaches a node that is not there
            continue
        agg[0] += sign
        if agg[0] == 0:
            del nodes[key]  # an empty node is dropped: memory follows what the slot holds
        else:
            agg[1] = (agg[1] + sign * h) % MOD


class ChatDigestTree:
    """Range digests of one chat's *history*, updated in O(levels + log slot) per message
    appended or pruned. The history is the chat's own map: a message is in it when it is
    added here, and still in it when it is removed."""

    def __init__(self, history: Mapping[str, ChatMessage], slot_ms: int = SLOT_MS) -> None:
        if slot_ms <= 0:
            raise ValueError("slot_ms must be positive")
        self.history = history
        self.slot_ms = slot_ms
        self.total: dict = {}
        self.slots: dict[int, Slot] = {}
        self.slot_ids: list[int] = []
        self.work = Work()
        self.fallbacks = 0
        self._ts: Callable[[str], int] = lambda g: history[g].ts_ms

    @classmethod
    def of(cls, history: Mapping[str, ChatMessage], slot_ms: int = SLOT_MS) -> ChatDigestTree:
        """A tree holding every message of *history* (a chat rebuilt from one)."""
        tree = cls(history, slot_ms)
        for m in history.values():
            tree.add(m)
        return tree

    def __len__(self) -> int:
        return self.total.get(_node(0, 0), (0, 0))[0]

    def add(self, m: ChatMessage) -> None:
        """Count a message just put in the history (each GUID once)."""
        bucket = guid_bucket(m.guid)
        h = message_hash(m.guid, m.sender, m.ts_ms, m.body)
        sid = m.ts_ms // self.slot_ms
        slot = self.slots.get(sid)
        if slot is None:
            slot = self.slots[sid] = Slot()
            bisect.insort(self.slot_ids, sid)
        guids = slot.guids
        if not guids or self._ts(guids[-1]) <= m.ts_ms:
            guids.append(m.guid)  # the usual case: the newest message of its slot
            slot.buckets.append(bucket)
        else:
            i = bisect.bisect_right(guids, m.ts_ms, key=self._ts)
            guids.insert(i, m.guid)
            slot.buckets.insert(i, bucket)
        _apply(slot.nodes, SLOT_BITS, bucket, h, 1)
        _apply(self.total, TOTAL_BITS, bucket, h, 1)

    def remove(self, m: ChatMessage) -> None:
        """Forget a message about to leave the history (it must have been added)."""
        slot = self.slots.get(sid := m.ts_ms // self.slot_ms)
        guids = slot.guids if slot else []
        i = bisect.bisect_left(guids, m.ts_ms, key=self._ts)
        while i < len(guids) and guids[i] != m.guid and self._ts(guids[i]) == m.ts_ms:
            i += 1
        if i == len(guids) or guids[i] != m.guid:
            raise KeyError(m.guid)
        del guids[i]
        bucket = slot.buckets.pop(i)
        h = message_hash(m.guid, m.sender, m.ts_ms, m.body)
        _apply(slot.nodes, SLOT_BITS, bucket, h, -1)
        _apply(self.total, TOTAL_BITS, bucket, h, -1)
        if not guids:
            del self.slots[sid]
            del self.slot_ids[bisect.bisect_left(self.slot_ids, sid)]

    # -- answering ---------------------------------------------------------------------------

    def guids_in(self, rng: Range) -> list[tuple[int, str]]:
        """``(ts_ms, guid)`` of each message in *rng* (valid), sorted: the slots the window
        covers are read with their stored buckets, so nothing is hashed."""
        lo, hi, ids, w = rng.start_ms, rng.end_ms, self.slot_ids, self.slot_ms
        if hi <= lo:
            return []
        found = []
        for sid in ids[bisect.bisect_left(ids, lo // w):bisect.bisect_right(ids, (hi - 1) // w)]:
            slot = self.slots[sid]
            for guid, bucket in zip(slot.guids, slot.buckets, strict=True):
                ts = self._ts(guid)
                if in_range(rng, ts, bucket):
                    found.append((ts, guid))
        found.sort()
        return found

    def split_digests(self, rng: Range, split_bits: int) -> list[Digest]:
        """``digest.split_digests(history.values(), rng, split_bits)``, from the tree (*rng*
        and *split_bits* valid, as ``digest.valid_range`` checks)."""
        n = 1 << split_bits
        sums: Sums = ([0] * n, [0] * n)
        lo, hi = rng.start_ms, rng.end_ms
        level = rng.prefix_bits + split_bits
        ids, w = self.slot_ids, self.slot_ms
        if hi <= lo or not ids:
            return _digests(sums)
        first, last = lo // w, (hi - 1) // w
        if level > TOTAL_BITS[-1]:
            self.fallbacks += 1  # deeper than the tree: hash the window's messages
            for sid in ids[bisect.bisect_left(ids, first):bisect.bisect_right(ids, last)]:
                self._hash(self.slots[sid].guids, rng, split_bits, sums, 1, True)
            return _digests(sums)
        # slots wholly inside are ids[a:b]; the boundary slots are first and last, if partial
        full_lo = first if first * w >= lo else first + 1
        full_hi = last if (last + 1) * w <= hi else last - 1
        a = bisect.bisect_left(ids, full_lo)
        b = max(a, bisect.bisect_right(ids, full_hi))
        boundary = [s for s in sorted({first, last})
                    if not full_lo <= s <= full_hi and s in self.slots]
        inside, outside = ids[a:b], [s for s in ids[:a] + ids[b:] if s not in boundary]
        deep = level > SLOT_BITS[-1]
        if deep:  # the slots hash their messages: compare messages, not slots
            cost_in = sum(len(self.slots[s].guids) for s in inside)
            cost_out = sum(len(self.slots[s].guids) for s in outside)
        else:
            cost_in, cost_out = len(inside), len(outside)
        read = self._reader(rng, split_bits, sums)
        if cost_in <= cost_out:
            whole, sign = inside, 1
        else:  # most of the chat is inside: everything, less what is not
            read(self.total, 1)
            whole, sign = outside, -1
        for sid in whole:
            if deep:
                self._hash(self.slots[sid].guids, rng, split_bits, sums, sign, False)
            else:
                read(self.slots[sid].nodes, sign)
        for sid in boundary:
            self._boundary(self.slots[sid], rng, split_bits, sums, sign, read, deep)
        return _digests(sums)

    def _reader(self, rng: Range, split_bits: int, sums: Sums) -> Callable[[dict, int], None]:
        """A function adding (or taking away) a node map's children of *rng* to *sums*."""
        level = rng.prefix_bits + split_bits
        stored = next(b for b in TOTAL_BITS if b >= level)
        fan = stored - level
        base = rng.prefix << split_bits
        work = self.work
        counts, totals = sums
        keys = [[_node(stored, ((base | i) << fan) | j) for j in range(1 << fan)]
                for i in range(1 << split_bits)]

        def read(nodes: dict, sign: int) -> None:
            for i, child in enumerate(keys):
                for key in child:
                    work.nodes += 1
                    agg = nodes.get(key)
                    if agg is not None:
                        counts[i] += sign * agg[0]
                        totals[i] += sign * agg[1]
        return read

    def _boundary(self, slot: Slot, rng: Range, split_bits: int, sums: Sums, sign: int,
                  read: Callable[[dict, int], None], deep: bool) -> None:
        """Add (sign 1) the part of a boundary slot inside the window, or take away (sign -1)
        the part outside it, hashing the smaller side."""
        guids = slot.guids
        i = bisect.bisect_left(guids, rng.start_ms, key=self._ts)
        j = bisect.bisect_left(guids, rng.end_ms, key=self._ts)
        self.work.messages += 2  # the bisection's ends
        part_in, part_out = guids[i:j], guids[:i] + guids[j:]
        want, other = (part_in, part_out) if sign == 1 else (part_out, part_in)
        if deep or len(want) <= len(other):
            self._hash(want, rng, split_bits, sums, sign, False)
        else:  # the whole slot, less the other side
            read(slot.nodes, sign)
            self._hash(other, rng, split_bits, sums, -sign, False)

    def _hash(self, guids: list, rng: Range, split_bits: int, sums: Sums, sign: int,
              check_time: bool) -> None:
        """Add (or take away) the hashes of *guids* in *rng*'s prefix to their children."""
        shift = MAX_PREFIX_BITS - rng.prefix_bits - split_bits
        mask = (1 << split_bits) - 1
        counts, totals = sums
        for guid in guids:
            m = self.history[guid]
            self.work.messages += 1
            if check_time and not rng.start_ms <= m.ts_ms < rng.end_ms:
                continue
            b = guid_bucket(guid)
            if rng.prefix_bits and b >> (MAX_PREFIX_BITS - rng.prefix_bits) != rng.prefix:
                continue
            k = (b >> shift) & mask
            counts[k] += sign
            totals[k] += sign * message_hash(guid, m.sender, m.ts_ms, m.body)


def _digests(sums: Sums) -> list[Digest]:
    return [Digest(count=c, total=t % MOD) for c, t in zip(*sums, strict=True)]
