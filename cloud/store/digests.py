"""Range digests of a conversation's messages (the ``docs/digest.md`` contract, in SQL), and
the GUIDs and messages of a range, for the gaps reconciler.

Two ways to the same answer::

    range_digests      scan: sum the digest columns of the range's messages (any range)
    maintained_digests the root of a time window (0 bits, no split) from the maintained
                       slots (message_digest_slots, migration 0019) plus the messages of the
                       at most two slots the window's ends cut; any other request: the scan

The slots and the dirty set (digest_dirty) are kept by triggers on ``messages`` in the
writing statement's transaction; this module reads them, and clears a conversation from the
dirty set when a compare found it equal (``clear_dirty``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import attrs
import psycopg
from psycopg.types.json import Jsonb

from cloud.model import Digest

_U64 = 1 << 64
#: Width of a maintained time slot, as migration 0019's ``message_digest_slot`` and the
#: legacy tree's ``SLOT_MS`` (a test checks the SQL function against it).
SLOT_MS = 3_600_000


@attrs.frozen
class DigestAnswer:
    """Digests of a request's children, and how many stored rows were summed for them
    (slot rows plus message rows): what a request cost, counted rather than timed."""

    digests: list[Digest]
    rows_read: int


def range_digest(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                 end_ms: int, prefix_bits: int = 0, prefix: int = 0) -> Digest:
    """The docs/digest.md digest of one range, computed in SQL from stored columns.

    Only messages with a legacy GUID take part (a cloud message gets its GUID when the
    bridge injects it into the legacy network).
    """
    return range_digests(conn, conversation_id, start_ms, end_ms, prefix_bits, prefix, 0)[0]


def range_digests(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                  end_ms: int, prefix_bits: int, prefix: int, split_bits: int) -> list[Digest]:
    """Digests of the ``2**split_bits`` bucket-prefix children of a range, in child order."""
    if not 0 <= prefix_bits <= 32 or not 0 <= split_bits <= 8 or prefix_bits + split_bits > 32:
        raise ValueError("prefix_bits + split_bits must be within 0..32 (split at most 8)")
    if not 0 <= prefix < (1 << prefix_bits) or (prefix_bits == 0 and prefix != 0):
        raise ValueError("prefix must be below 2**prefix_bits")
    bits = prefix_bits + split_bits
    shift = 32 - bits
    rows = conn.execute(
        "SELECT (digest_bucket >> %(shift)s) & %(mask)s AS child, count(*), "
        "       sum(digest_hash) "  # bigint's sum adds in 128 bits: exact, not numeric's
        "FROM messages WHERE conversation_id = %(cid)s AND legacy_guid IS NOT NULL "
        "  AND sent_ms >= %(start)s AND sent_ms < %(end)s "
        "  AND (%(pbits)s = 0 OR digest_bucket >> (32 - %(pbits)s) = %(prefix)s) "
        "GROUP BY 1",
        {"shift": shift, "mask": (1 << split_bits) - 1, "cid": conversation_id,
         "start": start_ms, "end": end_ms, "pbits": prefix_bits, "prefix": prefix}).fetchall()
    out = [Digest(0, 0) for _ in range(1 << split_bits)]
    for child, count, total in rows:
        out[int(child)] = Digest(int(count), int(total) % _U64)
    return out


def range_guids(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                end_ms: int, prefix_bits: int, prefix: int) -> list[str]:
    """The legacy GUIDs of the cloud messages in one digest range (for a leaf comparison)."""
    return [r[0] for r in conn.execute(
        "SELECT legacy_guid FROM messages WHERE conversation_id = %(cid)s "
        "  AND legacy_guid IS NOT NULL AND sent_ms >= %(start)s AND sent_ms < %(end)s "
        "  AND (%(pbits)s = 0 OR digest_bucket >> (32 - %(pbits)s) = %(prefix)s) "
        "ORDER BY sent_ms, legacy_guid",
        {"cid": conversation_id, "start": start_ms, "end": end_ms, "pbits": prefix_bits,
         "prefix": prefix})]


def messages_by_guid(conn: psycopg.Connection, conversation_id: uuid.UUID,
                     guids: Sequence[str]) -> tuple[list[tuple[str, str, int, str]], int]:
    """(guid, sender's legacy-side handle, sent_ms, body) of the cloud messages named, but
    those the outbox to legacy still holds or has decided on (a row pending: in flight,
    the injector delivers it in order; skipped or failed: not sent, with the outbox's own
    finding); and how many of those there were. A message whose row is done, or that has
    none (mirrored from legacy), is the reconciler's to repair."""
    rows = conn.execute(
        "SELECT m.legacy_guid, coalesce(a.legacy_handle, a.handle), m.sent_ms, m.body, "
        "  EXISTS (SELECT 1 FROM outbox_to_legacy o WHERE o.conversation_id = "
        "    m.conversation_id AND o.seq = m.seq AND o.sub = 0 AND o.state <> 'done') "
        "FROM messages m JOIN accounts a ON a.account_id = m.sender_account_id "
        "WHERE m.conversation_id = %s AND m.legacy_guid = ANY(%s) ORDER BY m.seq",
        (conversation_id, list(guids))).fetchall()
    return [r[:4] for r in rows if not r[4]], sum(1 for r in rows if r[4])


_WINDOW_ROOT = (
    "SELECT count(*), coalesce(sum(n), 0), coalesce(sum(t), 0) FROM ("
    "  SELECT count AS n, total AS t FROM message_digest_slots "
    "  WHERE conversation_id = %(cid)s AND slot >= %(full_lo)s AND slot <= %(full_hi)s "
    "  UNION ALL "
    "  SELECT 1, digest_hash::numeric FROM messages WHERE conversation_id = %(cid)s "
    "    AND digest_hash IS NOT NULL AND sent_ms >= %(a1)s AND sent_ms < %(b1)s "
    "  UNION ALL "
    "  SELECT 1, digest_hash::numeric FROM messages WHERE conversation_id = %(cid)s "
    "    AND digest_hash IS NOT NULL AND sent_ms >= %(a2)s AND sent_ms < %(b2)s) x")


def window_parts(start_ms: int, end_ms: int) -> tuple[int, int, tuple[int, int],
                                                      tuple[int, int]]:
    """How a window ``[start_ms, end_ms)`` is read: the whole slots ``full_lo..full_hi``
    (none when ``full_lo > full_hi``), and the head and tail time ranges of the slots its
    ends cut (empty ranges ``(0, 0)`` when an end falls on a slot boundary)."""
    w = SLOT_MS
    first, last = start_ms // w, (end_ms - 1) // w
    full_lo = first if first * w == start_ms else first + 1
    full_hi = last if (last + 1) * w == end_ms else last - 1
    if first == last and not full_lo <= first <= full_hi:  # inside one cut slot
        return 1, 0, (start_ms, end_ms), (0, 0)
    head = (start_ms, (first + 1) * w) if full_lo > first else (0, 0)
    tail = (last * w, end_ms) if full_hi < last else (0, 0)
    return full_lo, full_hi, head, tail


def window_root(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                end_ms: int) -> DigestAnswer:
    """The root digest of ``[start_ms, end_ms)`` from the maintained slots: the whole slots
    inside, plus the messages of the cut slots at its ends. Reads at most one row per hour of
    the window and the messages of two hours, whatever the conversation's history."""
    if end_ms <= start_ms:
        return DigestAnswer([Digest(0, 0)], 0)
    full_lo, full_hi, (a1, b1), (a2, b2) = window_parts(start_ms, end_ms)
    rows, count, total = conn.execute(_WINDOW_ROOT, {
        "cid": conversation_id, "full_lo": full_lo, "full_hi": full_hi,
        "a1": a1, "b1": b1, "a2": a2, "b2": b2}).fetchone()
    return DigestAnswer([Digest(int(count), int(total) % _U64)], int(rows))


_WINDOW_ROOTS = (
    "SELECT cid, count(*), coalesce(sum(n), 0), coalesce(sum(t), 0) FROM ("
    "  SELECT conversation_id AS cid, count AS n, total AS t FROM message_digest_slots "
    "  WHERE conversation_id = ANY(%(cids)s) AND slot >= %(full_lo)s AND slot <= %(full_hi)s "
    "  UNION ALL "
    "  SELECT conversation_id, 1, digest_hash::numeric FROM messages "
    "  WHERE conversation_id = ANY(%(cids)s) "
    "    AND digest_hash IS NOT NULL AND sent_ms >= %(a1)s AND sent_ms < %(b1)s "
    "  UNION ALL "
    "  SELECT conversation_id, 1, digest_hash::numeric FROM messages "
    "  WHERE conversation_id = ANY(%(cids)s) "
    "    AND digest_hash IS NOT NULL AND sent_ms >= %(a2)s AND sent_ms < %(b2)s) x "
    "GROUP BY cid")


def window_roots(conn: psycopg.Connection, conversation_ids: Sequence[uuid.UUID],
                 start_ms: int, end_ms: int) -> dict[uuid.UUID, DigestAnswer]:
    """``window_root`` of many conversations in one statement (a pass reads the roots of
    the conversations it is about to compare together: one round trip, not one each)."""
    out = {c: DigestAnswer([Digest(0, 0)], 0) for c in conversation_ids}
    if end_ms <= start_ms or not out:
        return out
    full_lo, full_hi, (a1, b1), (a2, b2) = window_parts(start_ms, end_ms)
    for cid, rows, count, total in conn.execute(_WINDOW_ROOTS, {
            "cids": list(out), "full_lo": full_lo, "full_hi": full_hi,
            "a1": a1, "b1": b1, "a2": a2, "b2": b2}):
        out[cid] = DigestAnswer([Digest(int(count), int(total) % _U64)], int(rows))
    return out


def maintained_digests(conn: psycopg.Connection, conversation_id: uuid.UUID, start_ms: int,
                       end_ms: int, prefix_bits: int, prefix: int,
                       split_bits: int) -> DigestAnswer:
    """``range_digests``, from the maintained slots when the request is a window's root
    (what an in-sync compare asks), else by the scan (a descent below a root that differs:
    its cost is that conversation's window, paid only where the roots differ)."""
    if prefix_bits == 0 and split_bits == 0:
        return window_root(conn, conversation_id, start_ms, end_ms)
    digests = range_digests(conn, conversation_id, start_ms, end_ms, prefix_bits, prefix,
                            split_bits)
    return DigestAnswer(digests, sum(d.count for d in digests))


# -- the dirty set ---------------------------------------------------------------------------

def dirty_versions(conn: psycopg.Connection) -> dict[uuid.UUID, int]:
    """The dirty set: conversation -> version (what ``clear_dirty`` must see unchanged).
    One read of a table as large as what changed since the last clean compares."""
    return dict(conn.execute("SELECT conversation_id, version FROM digest_dirty").fetchall())


def mark_dirty(conn: psycopg.Connection, conversation_ids: Sequence[uuid.UUID]) -> None:
    """Put conversations in the dirty set (a compare found them different: they are not
    clean until a later compare finds them equal, whichever side the repair wrote)."""
    conn.execute(
        "INSERT INTO digest_dirty AS x (conversation_id, version, top_ms) "
        "SELECT c, 1, 0 FROM unnest(%s::uuid[]) c ORDER BY 1 "
        "ON CONFLICT (conversation_id) DO UPDATE SET version = x.version + 1",
        (sorted(set(conversation_ids)),))


def clear_dirty(conn: psycopg.Connection, versions: dict[uuid.UUID, int],
                watermark_ms: int) -> int:
    """These conversations were compared equal below *watermark_ms*: leave the dirty set,
    each only if no write changed it since its version was read, and none wrote a message
    at or above the watermark (not compared yet). Returns how many left."""
    if not versions:
        return 0
    cids = sorted(versions)
    # the rows' locks in conversation order, as the writers' triggers take them
    conn.execute("SELECT 1 FROM digest_dirty WHERE conversation_id = ANY(%s) "
                 "ORDER BY conversation_id FOR UPDATE", (cids,))
    return conn.execute(
        "DELETE FROM digest_dirty d USING unnest(%s::uuid[], %s::bigint[]) v(cid, ver) "
        "WHERE d.conversation_id = v.cid AND d.version = v.ver AND d.top_ms < %s",
        (cids, [versions[c] for c in cids], watermark_ms)).rowcount


def clean_through(conn: psycopg.Connection) -> int | None:
    """The watermark of the newest gaps pass that went through the whole dirty set clean."""
    row = conn.execute("SELECT watermark_ms FROM gaps_clean_through").fetchone()
    return None if row is None else row[0]


def clean_through_epochs(conn: psycopg.Connection) -> dict[str, int] | None:
    """Each supernode's epoch when the pass ``clean_through`` names began (None: no pass
    has gone through everything yet)."""
    row = conn.execute("SELECT supernodes FROM gaps_clean_through").fetchone()
    return None if row is None else {k: int(v) for k, v in row[0].items()}


def record_clean_through(conn: psycopg.Connection, watermark_ms: int, run_id: int | None,
                         now_ms: int, epochs: dict[str, int]) -> None:
    """A gaps pass went through everything it had to compare (the dirty set, the feed
    gaps' and restarted supernodes' conversations) without a failure, an uncovered
    supernode or a dry run, with the supernodes in *epochs* (theirs when it began)
    unrestarted: every conversation not dirty that was compared clean once is clean up to
    its watermark."""
    conn.execute(
        "INSERT INTO gaps_clean_through (only_row, watermark_ms, run_id, recorded_ms, "
        "  supernodes) VALUES (true, %s, %s, %s, %s) ON CONFLICT (only_row) DO UPDATE SET "
        "watermark_ms = greatest(gaps_clean_through.watermark_ms, excluded.watermark_ms), "
        "run_id = excluded.run_id, recorded_ms = excluded.recorded_ms, "
        "supernodes = excluded.supernodes",
        (watermark_ms, run_id, now_ms, Jsonb(epochs)))


# -- checks ----------------------------------------------------------------------------------

def maintained_slots(conn: psycopg.Connection,
                     conversation_id: uuid.UUID | None = None) -> dict[tuple, Digest]:
    """(conversation, slot) -> Digest as maintained (every conversation when None)."""
    rows = conn.execute(
        "SELECT conversation_id, slot, count, total FROM message_digest_slots "
        "WHERE %(cid)s::uuid IS NULL OR conversation_id = %(cid)s",
        {"cid": conversation_id}).fetchall()
    return {(c, s): Digest(int(n), int(t) % _U64) for c, s, n, t in rows}


def scratch_slots(conn: psycopg.Connection,
                  conversation_id: uuid.UUID | None = None) -> dict[tuple, Digest]:
    """(conversation, slot) -> Digest computed from the messages themselves: what
    ``maintained_slots`` must equal."""
    rows = conn.execute(
        "SELECT conversation_id, message_digest_slot(sent_ms), count(*), "
        "       sum(digest_hash::numeric) FROM messages "
        "WHERE digest_hash IS NOT NULL AND (%(cid)s::uuid IS NULL OR conversation_id = %(cid)s) "
        "GROUP BY 1, 2", {"cid": conversation_id}).fetchall()
    return {(c, s): Digest(int(n), int(t) % _U64) for c, s, n, t in rows}
