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


def one_by_one(conn, presences):
    for p in presences:
        tx(conn, presence_store.set_presence, p)
    return conn.execute("SELECT account_id, source, status, version, expires_ms FROM presence "
                        "ORDER BY 1, 2").fetchall()


def test_a_batch_of_presence_ends_as_setting_each_in_turn_would(conn):
    """set_presences in one statement: repeats of one account and source, older versions
    than the stored one, equal versions (the later wins) end as one by one."""
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    stored = [Presence(a, "legacy:sn1", "online", 10, NOW + 100),
              Presence(b, "cloud", "away", 3, NOW + 100)]
    batch = [Presence(a, "legacy:sn1", "away", 9, NOW + 200),     # older than stored: ignored
             Presence(a, "legacy:sn1", "busy", 12, NOW + 300),
             Presence(a, "legacy:sn1", "online", 11, NOW + 400),  # older than the one before
             Presence(b, "cloud", "busy", 3, NOW + 500),          # equal: replaces
             Presence(b, "cloud", "offline", 3, NOW + 600),       # equal and later: wins
             Presence(b, "legacy:sn2", "online", 1, NOW + 700)]
    expected = one_by_one(conn, stored + batch)
    conn.execute("DELETE FROM presence")
    one_by_one(conn, stored)
    assert tx(conn, presence_store.set_presences, batch) == 3
    assert conn.execute("SELECT account_id, source, status, version, expires_ms FROM presence "
                        "ORDER BY 1, 2").fetchall() == expected
    assert tx(conn, presence_store.set_presences, []) == 0


def test_a_batch_with_an_unknown_status_writes_nothing(conn):
    a = make_account(conn, "alice")
    try:
        tx(conn, presence_store.set_presences, [Presence(a, "cloud", "online", 1, NOW),
                                                Presence(a, "legacy", "asleep", 1, NOW)])
    except ValueError as e:
        assert "asleep" in str(e)
    else:
        raise AssertionError("an unknown status was accepted")
    assert conn.execute("SELECT count(*) FROM presence").fetchone() == (0,)
