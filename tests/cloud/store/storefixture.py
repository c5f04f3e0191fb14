"""Rows and counts shared by the store's tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg

from cloud.model import MirroredMessage

#: The tests' "now", in milliseconds.
NOW = 1_700_000_000_000


def mirrored(cid, sender, handle, guid, ts, body="hi") -> MirroredMessage:
    return MirroredMessage(cid, uuid.uuid5(uuid.NAMESPACE_URL, guid), guid, sender, handle,
                           ts, body)


def table_rows(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def numbered(sql: str, names: Sequence[str], start: int = 1) -> str:
    """A psycopg query's named placeholders (``%(name)s`` or ``%(name)b``) as the positional
    ones of a PREPARE body, *names* in order from ``$start``."""
    for i, name in enumerate(names, start=start):
        sql = sql.replace(f"%({name})s", f"${i}").replace(f"%({name})b", f"${i}")
    return sql


def prepared_plan(conn, body: str, args: Sequence[object], mode: str) -> str:
    """The plan of *body* (``$1``... placeholders) PREPAREd under ``plan_cache_mode`` *mode*
    (``force_custom_plan`` or ``force_generic_plan``), for *args*: the plan a prepared
    statement gets. The arguments are bound on the client (EXECUTE takes no server-side
    parameters)."""
    with conn.transaction():
        conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
        conn.execute(f"PREPARE inspected AS {body}")
        try:
            marks = ", ".join(["%s"] * len(args))
            return "\n".join(r[0] for r in psycopg.ClientCursor(conn).execute(
                f"EXPLAIN EXECUTE inspected({marks})", list(args)))
        finally:
            conn.execute("DEALLOCATE inspected")
