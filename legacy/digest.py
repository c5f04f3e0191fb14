"""The range digest contract (docs/digest.md), legacy side.

A message's hash is the first 8 bytes, big-endian unsigned, of
``sha256(guid 0x1f sender 0x1f ts_ms-decimal 0x1f body)`` in UTF-8. A range digest is
``(count, sum of hashes mod 2**64)``: order-independent, and unlike XOR a duplicate changes it.
A range is one conversation, a time window ``[start_ms, end_ms)`` and a prefix of the GUID's
bucket, the first 4 bytes of ``sha256(guid)`` as a big-endian unsigned int; both stacks can
compute all of it without the other's sequence numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from legacy.wire import ChatMessage, Digest, Range

MOD = 1 << 64
MAX_PREFIX_BITS = 32


def message_hash(guid: str, sender: str, ts_ms: int, body: str) -> int:
    data = f"{guid}\x1f{sender}\x1f{ts_ms}\x1f{body}".encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def guid_bucket(guid: str) -> int:
    return int.from_bytes(hashlib.sha256(guid.encode()).digest()[:4], "big")


def in_range(rng: Range, ts_ms: int, bucket: int) -> bool:
    if not rng.start_ms <= ts_ms < rng.end_ms:
        return False
    if rng.prefix_bits == 0:
        return True
    return bucket >> (MAX_PREFIX_BITS - rng.prefix_bits) == rng.prefix


def valid_range(rng: Range, split_bits: int = 0) -> str | None:
    """None if the range (and split) is well formed, else why not."""
    if rng.start_ms > rng.end_ms:
        return "start_ms is after end_ms"
    if split_bits > 8:
        return "split_bits must be at most 8"
    if rng.prefix_bits + split_bits > MAX_PREFIX_BITS:
        return "prefix_bits + split_bits must be at most 32"
    if rng.prefix_bits < 32 and rng.prefix >> rng.prefix_bits:
        return "prefix has more bits than prefix_bits"
    return None


def sub_ranges(rng: Range, split_bits: int) -> list[Range]:
    """The 2**split_bits children of *rng*, split by the next bits of the GUID bucket."""
    return [Range(chat_id=rng.chat_id, start_ms=rng.start_ms, end_ms=rng.end_ms,
                  prefix_bits=rng.prefix_bits + split_bits,
                  prefix=(rng.prefix << split_bits) | i)
            for i in range(1 << split_bits)]


def digest_of(messages: Iterable[ChatMessage]) -> Digest:
    """Digest of the given messages, whatever their order."""
    count = 0
    total = 0
    for m in messages:
        count += 1
        total += message_hash(m.guid, m.sender, m.ts_ms, m.body)
    return Digest(count=count, total=total % MOD)


def split_digests(messages: Iterable[ChatMessage], rng: Range, split_bits: int) -> list[Digest]:
    """Digests of each child of *rng* in one pass over *messages*."""
    counts = [0] * (1 << split_bits)
    totals = [0] * (1 << split_bits)
    shift = MAX_PREFIX_BITS - rng.prefix_bits - split_bits
    mask = (1 << split_bits) - 1
    for m in messages:
        b = guid_bucket(m.guid)
        if not in_range(rng, m.ts_ms, b):
            continue
        i = (b >> shift) & mask
        counts[i] += 1
        totals[i] += message_hash(m.guid, m.sender, m.ts_ms, m.body)
    return [Digest(count=c, total=t % MOD) for c, t in zip(counts, totals, strict=True)]
