"""Range digests in SQL against a real PostgreSQL: the shared vectors, and children that add up
to their parent.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.model import MirrorBatch
from cloud.store import digests as digests_store
from cloud.store import mirror as mirror_store
from legacy import digest as legacy_digest
from tests.cloud.store.storefixture import NOW, mirrored
from tests.dbfixture import make_account, make_conversation, tx

VECTORS = json.loads((Path(__file__).parents[3] / "docs" / "digest-vectors.json").read_text())


def test_sql_digest_matches_the_shared_vectors(conn):
    """The SQL message hash, bucket and range digests reproduce docs/digest-vectors.json."""
    senders = {}
    for m in VECTORS["messages"]:
        if m["sender"] not in senders:
            senders[m["sender"]] = make_account(conn, m["sender"])
    cid = make_conversation(conn, *senders.values(), chat=VECTORS["chat_id"])
    batch = MirrorBatch(tuple(
        mirrored(cid, senders[m["sender"]], m["sender"], m["guid"], m["ts_ms"], m["body"])
        for m in VECTORS["messages"]))
    tx(conn, mirror_store.write_mirrored_batch, batch, NOW)
    for m in VECTORS["messages"]:
        h, b = conn.execute(
            "SELECT digest_hash, digest_bucket FROM messages WHERE legacy_guid = %s",
            (m["guid"],)).fetchone()
        assert h % (1 << 64) == int(m["message_hash"]) and b == m["bucket"]
    assert VECTORS["range_digests"]
    for r in VECTORS["range_digests"]:
        got = tx(conn, digests_store.range_digest, cid, r["start_ms"], r["end_ms"],
                 r["prefix_bits"], r["prefix"])
        assert (got.count, got.total) == (r["count"], int(r["total"])), r


def test_split_digests_add_up_to_the_parent(conn):
    """Children of a range split by bucket bits sum (count and mod 2**64) to the parent."""
    a = make_account(conn, "alice")
    cid = make_conversation(conn, a)
    batch = MirrorBatch(tuple(mirrored(cid, a, "alice", f"g{i}", NOW + i, f"b{i}")
                              for i in range(200)))
    tx(conn, mirror_store.write_mirrored_batch, batch, NOW)
    parent = tx(conn, digests_store.range_digest, cid, NOW, NOW + 200)
    children = tx(conn, digests_store.range_digests, cid, NOW, NOW + 200, 0, 0, 4)
    assert parent.count == 200 and len(children) == 16
    assert sum(c.count for c in children) == 200
    assert sum(c.total for c in children) % (1 << 64) == parent.total
    grand = tx(conn, digests_store.range_digests, cid, NOW, NOW + 200, 4, 5, 2)
    assert sum(c.count for c in grand) == children[5].count


#: text PostgreSQL stores (no NUL, no lone surrogates), backslashes and escapes often
_TEXT = st.text(st.one_of(st.sampled_from("\\x'\"01 "),
                          st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
                max_size=30)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(guid=_TEXT, sender=_TEXT, ts_ms=st.integers(-(2 ** 62), 2 ** 62), body=_TEXT)
def test_sql_hashes_match_the_legacy_sides_for_any_text(conn, guid, sender, ts_ms, body):
    """The SQL message hash and bucket equal legacy/digest.py's for any text PostgreSQL
    stores: backslashes (which the bytes are read through), non-ASCII, control characters
    (migration 0021 reads a text's UTF-8 bytes without convert_to)."""
    h, b = conn.execute("SELECT legacy_message_hash(%s, %s, %s, %s), legacy_guid_bucket(%s)",
                        (guid, sender, ts_ms, body, guid)).fetchone()
    assert h % (1 << 64) == legacy_digest.message_hash(guid, sender, ts_ms, body)
    assert b == legacy_digest.guid_bucket(guid)


def test_the_digest_functions_are_inlined_into_their_callers(conn):
    """The message hash, the bucket and the slot are expanded into the statement that calls
    them (the generated columns of every message with a GUID, the digest triggers'
    grouping): called as SQL functions, each cost an executor set-up per row."""
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN (VERBOSE) SELECT legacy_message_hash(legacy_guid, sender_handle, sent_ms, "
        "  body), legacy_guid_bucket(legacy_guid), message_digest_slot(sent_ms) FROM messages"))
    assert "sha256" in plan and "3600000" in plan, plan
    for name in ("legacy_message_hash", "legacy_guid_bucket", "message_digest_slot"):
        assert name not in plan, plan
