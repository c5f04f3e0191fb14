"""Cloud store and API benchmarks (not a test): prints one JSON document.

1. Rows per second into ``messages``: raw binary ``COPY`` straight into the table (the
   ceiling: no dedup, no seq assignment, no notifications), and the bridge's idempotent mirror write
   path (``store.write_mirrored_batch``: COPY into staging, lock, dedup, numbered insert,
   notification rows, checkpoint) on the same server in the same run, and their ratio.
   The write path is measured twice: members in phase ``legacy`` (no notifications owed,
   the shadow-mirroring case) and in phase ``dual`` (one notification row per message).
2. API posts per second with 50 concurrent clients over loopback HTTP against
   ``bridgectl cloud run`` in a subprocess (see ``bench_api``).

Every figure is the median of several runs, with min and max.

Usage: python bench/bench_cloud.py [--dsn DSN] [--quick]
  Without --dsn (or $BRIDGE_DSN) it uses the embedded server under $BRIDGE_HOME (.bridge).
  It creates its own database on that server and drops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import conninfo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cloud import embedded, schema, store  # noqa: E402
from cloud.model import Account, FeedCheckpoint, MirrorBatch, MirroredMessage  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_api import bench_api  # noqa: E402
from bench_stats import summarize  # noqa: E402

NOW = 1_700_000_000_000


def with_db(dsn: str, name: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = name
    return conninfo.make_conninfo(**params)


@contextlib.contextmanager
def scratch_database(server: str, prefix: str = "bridge_bench") -> Iterator[str]:
    """A fresh database with the current schema on *server* (its DSN); dropped on exit."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_db(server, name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.upgrade(conn)
        yield dsn
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup(conn: psycopg.Connection, conversations: int, phase: str) -> list[tuple]:
    """Fresh conversations of two members each; returns (cid, sender, handle) triples."""
    out = []
    with conn.transaction():
        for i in range(conversations):
            a, b = uuid.uuid4(), uuid.uuid4()
            store.create_account(conn, Account(a, f"a{i}-{a.hex[:6]}", phase), None)
            store.create_account(conn, Account(b, f"b{i}-{b.hex[:6]}", phase), None)
            cid = uuid.uuid4()
            store.create_conversation(conn, cid, [a, b])
            out.append((cid, a, f"a{i}"))
    return out


def make_messages(convs: list[tuple], n: int, tag: str) -> list[MirroredMessage]:
    msgs = []
    for i in range(n):
        cid, sender, handle = convs[i % len(convs)]
        guid = f"{tag}-{i}"
        msgs.append(MirroredMessage(cid, uuid.uuid5(uuid.NAMESPACE_OID, guid), guid, sender,
                                    handle, NOW + i, f"message body number {i} " * 2))
    return msgs


def raw_copy(conn: psycopg.Connection, msgs: list[MirroredMessage], batch: int,
             seq_base: int) -> float:
    """Rows/s of plain COPY into messages, batch by batch, one transaction per batch.

    Seqs are numbered from *seq_base*, far above what the mirror path hands out.
    """
    seqs: dict = {}
    t0 = time.perf_counter()
    for start in range(0, len(msgs), batch):
        with conn.transaction(), conn.cursor().copy(
                "COPY messages (conversation_id, seq, message_id, legacy_guid, "
                "sender_account_id, sender_handle, sent_ms, body, origin) "
                "FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["uuid", "int8", "uuid", "text", "uuid", "text", "int8", "text",
                          "text"])
            for m in msgs[start:start + batch]:
                seq = seqs[m.conversation_id] = seqs.get(m.conversation_id, seq_base) + 1
                cp.write_row((m.conversation_id, seq, m.message_id, m.legacy_guid,
                              m.sender_account_id, m.sender_handle, m.sent_ms, m.body,
                              m.origin))
    return len(msgs) / (time.perf_counter() - t0)


def mirror_path(conn: psycopg.Connection, msgs: list[MirroredMessage], batch: int) -> float:
    t0 = time.perf_counter()
    for k, start in enumerate(range(0, len(msgs), batch)):
        b = MirrorBatch(tuple(msgs[start:start + batch]), (FeedCheckpoint("sn-0", "e", k),))
        with conn.transaction():
            store.write_mirrored_batch(conn, b, NOW)
    return len(msgs) / (time.perf_counter() - t0)


def bench_write_path(dsn: str, rows: int, runs: int, batch: int) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        shadow = setup(conn, 100, "legacy")
        dual = setup(conn, 100, "dual")
        copy_rates, shadow_rates, dual_rates, replay_rates = [], [], [], []
        for r in range(runs):
            copy_rates.append(raw_copy(conn, make_messages(shadow, rows, f"c{r}"), batch,
                                       seq_base=(r + 1) * 10_000_000))
            shadow_msgs = make_messages(shadow, rows, f"s{r}")
            shadow_rates.append(mirror_path(conn, shadow_msgs, batch))
            replay_rates.append(mirror_path(conn, shadow_msgs, batch))
            dual_rates.append(mirror_path(conn, make_messages(dual, rows, f"d{r}"), batch))
            conn.execute("VACUUM ANALYZE messages")
    copy_med = statistics.median(copy_rates)
    return {
        "rows_per_run": rows, "batch": batch,
        "copy_rows_per_s": summarize(copy_rates),
        "mirror_rows_per_s": summarize(shadow_rates),
        "mirror_ratio_to_copy": round(statistics.median(shadow_rates) / copy_med, 3),
        "mirror_with_notifications_rows_per_s": summarize(dual_rates),
        "mirror_with_notifications_ratio_to_copy":
            round(statistics.median(dual_rates) / copy_med, 3),
        "replay_rows_per_s": summarize(replay_rates),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=os.environ.get("BRIDGE_DSN"))
    p.add_argument("--quick", action="store_true", help="fewer rows and runs")
    args = p.parse_args()
    server = args.dsn or embedded.ensure_running(
        os.environ.get("BRIDGE_HOME", ".bridge"))
    with scratch_database(server) as dsn:
        rows, runs = (20_000, 3) if args.quick else (100_000, 5)
        result = {"write_path": bench_write_path(dsn, rows, runs, batch=1000)}
        result["api"] = bench_api(dsn, quick=args.quick)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
