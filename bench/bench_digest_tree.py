"""Digest request micro benchmark (not a test): prints one JSON document.

One chat of N messages (10^4, 10^5, 10^6 by default) spread over the 29 days before "now",
as the home supernode holds it (``ChatState``). Per size, the requests a gaps pass makes of
an in-sync chat and of one that differs: its window (from the retention floor to 10 s
before now) at 0 bits split by 0 (the root), then by 4 (``reconcilers.gaps.SPLIT_BITS``),
then one 4-bit child split by 4 again, each answered

- ``before``: as the supernode did, ``digest.split_digests`` over the whole history;
- ``after``: from the chat's maintained tree (``ChatState.digests``), what ``PeerApi``
  answers with now; the two answers are checked equal.

Also: seconds to build the history and its tree, microseconds per append and per prune
(one message each, through ``ChatState.add`` / ``drop``), and the bytes the tree holds
beside the history (tracemalloc, at 10^4 and 10^5).

Usage: python bench/bench_digest_tree.py [--sizes 10000 100000 1000000] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from legacy import digest  # noqa: E402
from legacy.digest_tree import ChatDigestTree  # noqa: E402
from legacy.supernode.state import ChatState  # noqa: E402
from legacy.wire import ChatMessage, Range  # noqa: E402

NOW = 1_800_000_000_000
DAY = 86_400_000


def history_of(n: int) -> dict[str, ChatMessage]:
    span = 29 * DAY
    return {f"m{i}": ChatMessage(chat_id="c", guid=f"m{i}", legacy_seq=i + 1, sender="alice",
                                 ts_ms=NOW - span + i * span // n, body=f"message {i} " * 4,
                                 origin="legacy")
            for i in range(n)}


def timed(fn, repeat: int) -> tuple[float, object]:
    runs, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), out


def one_size(n: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    history = history_of(n)
    t1 = time.perf_counter()
    chat = ChatState(members=("alice", "bob"), next_seq=n + 1, history=history)
    t2 = time.perf_counter()
    window = Range(chat_id="c", start_ms=NOW - 30 * DAY + 3_600_000, end_ms=NOW - 10_000,
                   prefix_bits=0, prefix=0)
    out: dict = {"messages": n, "build_history_s": round(t1 - t0, 2),
                 "build_tree_s": round(t2 - t1, 2), "slots": len(chat.digests.slots),
                 "tree_nodes": len(chat.digests.total)
                 + sum(len(s.nodes) for s in chat.digests.slots.values())}
    for pbits, split in ((0, 0), (0, 4), (4, 4)):
        rng = Range(chat_id="c", start_ms=window.start_ms, end_ms=window.end_ms,
                    prefix_bits=pbits, prefix=pbits and 5)
        before_s, before = timed(lambda r=rng, s=split: digest.split_digests(
            chat.history.values(), r, s), 1 if n >= 10**6 else repeat)
        after_s, after = timed(lambda r=rng, s=split: chat.digests.split_digests(r, s), repeat)
        assert before == after, "the tree and the scan disagree"
        out[f"bits_{pbits}_split_{split}"] = {"before_ms": round(before_s * 1000, 3),
                                 "after_ms": round(after_s * 1000, 4),
                                 "speedup": round(before_s / after_s)}
    extra = ChatMessage(chat_id="c", guid="extra", legacy_seq=n + 1, sender="bob",
                        ts_ms=NOW - 5_000, body="late", origin="legacy")
    t0 = time.perf_counter()
    for _ in range(1000):
        chat.add(extra)
        chat.drop("extra")
    out["append_plus_prune_us"] = round((time.perf_counter() - t0) * 1000, 2)
    if n <= 100_000:
        tracemalloc.start()
        a = tracemalloc.take_snapshot()
        tree = ChatDigestTree.of(history)
        b = tracemalloc.take_snapshot()
        tracemalloc.stop()
        out["tree_bytes"] = sum(s.size_diff for s in b.compare_to(a, "filename"))
        tracemalloc.start()
        a = tracemalloc.take_snapshot()
        again = history_of(n)
        b = tracemalloc.take_snapshot()
        tracemalloc.stop()
        out["history_bytes"] = sum(s.size_diff for s in b.compare_to(a, "filename"))
        del tree, again
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    print(json.dumps([one_size(n, args.repeat) for n in args.sizes], indent=2))


if __name__ == "__main__":
    main()
