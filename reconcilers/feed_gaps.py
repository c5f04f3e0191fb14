"""The ``feed_gap`` findings' lifecycle on the reconciler's side: which supernodes have open
gaps (their chats go first in a gaps pass), and how a completed pass closes them.

A follower opens one per range its feed could not give (``bridge.follower.feed_gaps``): the
finding names the supernode (``detail.source``) and the range; what it lost can not be told
from the feed, so its scope is that whole supernode. A pass closes it by what the range was::

    expired       entries out of a live feed's buffer, still in    -> repaired
                  the supernode's history: the pass compared them
    epoch, ahead  an old incarnation's tail, which died with its   -> unrecoverable
                  memory: the pass put back what the cloud had,       (never repaired)
                  what only the lost one held is gone
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg.types.json import Jsonb

#: The gaps whose entries died with the supernode's memory: closed ``unrecoverable``.
LOST_WITH_MEMORY = ("epoch", "ahead")


def open_gap_sources(conn: psycopg.Connection) -> list[str]:
    """The supernodes with open feed gaps."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT detail->>'source' FROM reconcile_findings "
        "WHERE kind = 'feed_gap' AND state = 'open'")]


def close_gap_findings(conn: psycopg.Connection, before_ms: int, sources: Sequence[str],
                       run_id: int | None, now_ms: int, *, window_start_ms: int = 0,
                       whole_retention: bool = True,
                       repaired: dict[str, list[str]] | None = None) -> dict[str, int]:
    """Close the feed_gap findings a completed pass covered: those of the supernodes whose
    chats it compared first, found before its watermark, and whose losses its window
    reached: lost after ``window_start_ms`` (``detail.lost_after_ms``), or, when that is
    not known, by a pass over everything legacy still holds (*whole_retention*).
    A gap whose entries died with a supernode's memory ends ``unrecoverable``, never
    ``repaired``; the rest ``repaired``. *repaired* (supernode -> conversation ids the pass
    repaired there) goes into each finding's ``detail.repaired_conversations``: what a gap
    concerned, as far as it can be known. Returns how many ended in each state."""
    rows = conn.execute(
        "UPDATE reconcile_findings SET resolved_ms = %s, "
        "state = CASE WHEN detail->>'gap' = ANY(%s) THEN 'unrecoverable' ELSE 'repaired' END, "
        "detail = detail || jsonb_build_object('covered_by_run', %s::bigint, "
        "    'repaired_conversations', coalesce(%s::jsonb -> (detail->>'source'), '[]')) "
        "WHERE kind = 'feed_gap' AND state = 'open' AND created_ms < %s "
        "AND detail->>'source' = ANY(%s) "
        "AND (%s OR (detail->>'lost_after_ms')::bigint >= %s) RETURNING state",
        (now_ms, list(LOST_WITH_MEMORY), run_id, Jsonb(repaired or {}), before_ms,
         list(sources), whole_retention, window_start_ms)).fetchall()
    closed = {"repaired": 0, "unrecoverable": 0}
    for (state,) in rows:
        closed[state] += 1
    return closed
