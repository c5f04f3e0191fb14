"""pg_comparator as the reconcile benchmark's peer (not a test): prints one JSON document.

pg_comparator (Debian's ``postgresql-comparator``, its ``pgcmp`` extension on the server)
compares two tables in one PostgreSQL server with a tree of checksums, in SQL. Here it
compares a pair of tables shaped like the messages both stacks hold (GUID key; sender,
timestamp and body compared), N rows each side with D differences (half of them missing on
each side), on the same server the reconcile benchmark uses, so the two are timed alike.

    t1, t2  (guid text PRIMARY KEY, sender text, ts_ms bigint, body text)
            N rows, built in the server; D/2 deleted from t1, D - D/2 from t2

``seconds``: wall time of ``pg_comparator`` comparing them (the median of --repeat runs),
which must report exactly D differing keys. When pg_comparator, its server or its
extension is missing, ``available`` says why and nothing is timed.

Usage: python bench/bench_pg_comparator.py [--dsn DSN] [--rows N] [--diffs D] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import psycopg
from psycopg import conninfo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_cloud import scratch_database  # noqa: E402
from bench_stats import summarize  # noqa: E402

#: the system PostgreSQL, where Debian's pgcmp extension is installed
SYSTEM_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BINARY = "pg_comparator"


def unavailable(server: str) -> str | None:
    """Why pg_comparator can not run against *server* (None: it can)."""
    if shutil.which(BINARY) is None:
        return f"{BINARY} is not installed (Debian: postgresql-comparator)"
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=5) as conn:
            found = conn.execute("SELECT 1 FROM pg_available_extensions "
                                 "WHERE name = 'pgcmp'").fetchone()
    except psycopg.Error as e:
        return "its server is out of reach: " + " ".join(str(e).split())
    if found is None:
        return "the server has no pgcmp extension (Debian: postgresql-NN-comparator)"
    return None


def _build(dsn: str, rows: int, diffs: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgcmp")
        conn.execute("CREATE TABLE t1 (guid text PRIMARY KEY, sender text NOT NULL, "
                     "ts_ms bigint NOT NULL, body text NOT NULL)")
        conn.execute(
            "INSERT INTO t1 SELECT md5(i::text), 'user-' || (i %% 2000), "
            "1700000000000 + i * 600, 'message ' || i || ': ' || repeat('x', 40) "
            "FROM generate_series(1, %s) i", (rows,))
        conn.execute("CREATE TABLE t2 (LIKE t1 INCLUDING ALL)")
        conn.execute("INSERT INTO t2 SELECT * FROM t1")
        step = max(1, rows // (diffs + 1))
        picked = [1 + k * step for k in range(diffs)]
        half = diffs // 2
        conn.execute("DELETE FROM t1 WHERE guid = ANY(ARRAY(SELECT md5(i::text) "
                     "FROM unnest(%s::int[]) i))", (picked[:half],))
        conn.execute("DELETE FROM t2 WHERE guid = ANY(ARRAY(SELECT md5(i::text) "
                     "FROM unnest(%s::int[]) i))", (picked[half:],))
        conn.execute("VACUUM ANALYZE t1")
        conn.execute("VACUUM ANALYZE t2")


def _url(dsn: str, table: str) -> str:
    p = conninfo.conninfo_to_dict(dsn)
    user = p.get("user", "postgres")
    host = p.get("host", "127.0.0.1")
    port = p.get("port", "5432")
    return f"pgsql://{user}@{host}:{port}/{p['dbname']}/public.{table}?guid:sender,ts_ms,body"


def compare_once(dsn: str, diffs: int, timeout: float = 1800) -> float:
    """Wall seconds of one pg_comparator run; it must report *diffs* differing keys."""
    cmd = [BINARY, "--max-ratio", "2.0", _url(dsn, "t1"), _url(dsn, "t2")]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    found = [line for line in out.stdout.splitlines()
             if line.startswith(("INSERT ", "DELETE ", "UPDATE "))]
    if out.returncode not in (0, 1) or len(found) != diffs:
        raise RuntimeError(f"pg_comparator exited {out.returncode} reporting {len(found)} "
                           f"differences, not {diffs}:\n{out.stderr[-2000:]}")
    return wall


def run(server: str, rows: int, diffs: int, repeat: int) -> dict:
    """Build the pair of tables on *server* once, time *repeat* comparisons."""
    why = unavailable(server)
    if why is not None:
        return {"available": False, "why": why}
    with scratch_database(server, "bridge_benchpgc") as dsn:
        t0 = time.perf_counter()
        _build(dsn, rows, diffs)
        build = time.perf_counter() - t0
        runs = [compare_once(dsn, diffs) for _ in range(repeat)]
    with psycopg.connect(server, autocommit=True) as conn:
        server_version = conn.info.server_version
    return {"available": True, "rows": rows, "differences": diffs,
            "server_version": server_version, "build_seconds": round(build, 2),
            "seconds": summarize(runs, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=SYSTEM_DSN, help=f"the server (default {SYSTEM_DSN})")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--diffs", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    out = run(args.dsn, args.rows, args.diffs, args.repeat)
    if not out["available"]:
        print(f"pg_comparator: skipped, {out['why']}", file=sys.stderr)
    print(json.dumps({"pg_comparator": out}, indent=2))


if __name__ == "__main__":
    main()
