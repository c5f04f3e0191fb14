"""Rows and counts shared by the store's tests."""

from __future__ import annotations

import uuid

from cloud.model import MirroredMessage

#: The tests' "now", in milliseconds.
NOW = 1_700_000_000_000


def mirrored(cid, sender, handle, guid, ts, body="hi") -> MirroredMessage:
    return MirroredMessage(cid, uuid.uuid5(uuid.NAMESPACE_URL, guid), guid, sender, handle,
                           ts, body)


def table_rows(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
