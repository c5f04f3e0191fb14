"""Range digests of a conversation's messages (the ``docs/digest.md`` contract, in SQL), and
the GUIDs and messages of a range, for the gaps reconciler.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg

from cloud.model import Digest

_U64 = 1 << 64


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
        "       sum(digest_hash::numeric) "
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
                     guids: Sequence[str]) -> list[tuple[str, str, int, str]]:
    """(guid, sender's legacy-side handle, sent_ms, body) of the cloud messages named."""
    return conn.execute(
        "SELECT m.legacy_guid, coalesce(a.legacy_handle, a.handle), m.sent_ms, m.body "
        "FROM messages m JOIN accounts a ON a.account_id = m.sender_account_id "
        "WHERE m.conversation_id = %s AND m.legacy_guid = ANY(%s) ORDER BY m.seq",
        (conversation_id, list(guids))).fetchall()
