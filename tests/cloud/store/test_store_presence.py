"""Presence in the store against a real PostgreSQL: the newest version per source, expiry."""

from __future__ import annotations

from cloud.model import Presence
from cloud.store import presence as presence_store
from tests.cloud.store.storefixture import NOW
from tests.dbfixture import make_account, tx


def test_presence_keeps_the_newest_version_per_source_and_hides_expired(conn):
    """An older version never overwrites a newer one; expired sources are not read."""
    a = make_account(conn, "alice")
    tx(conn, presence_store.set_presence, Presence(a, "cloud", "online", 5, NOW + 1000))
    assert not tx(conn, presence_store.set_presence, Presence(a, "cloud", "away", 4, NOW + 9000))
    tx(conn, presence_store.set_presence, Presence(a, "legacy", "busy", 1, NOW + 10))
    live = tx(conn, presence_store.read_presence, [a], NOW + 20)
    assert live == {a: [Presence(a, "cloud", "online", 5, NOW + 1000)]}
