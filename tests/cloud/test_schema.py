"""The schema's migrations against a real PostgreSQL: applied once, in order, never edited;
sharding-ready constraints.
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from cloud import schema
from tests.cloud.store.storefixture import table_rows


def test_upgrade_from_empty_applies_every_version_then_nothing(empty_dsn):
    """Upgrading an empty database applies all shipped versions once; a rerun applies none."""
    shipped = [m.version for m in schema.shipped_migrations()]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert schema.status(conn).pending == tuple(
            (m.version, m.name) for m in schema.shipped_migrations())
        assert schema.upgrade(conn) == shipped
        assert schema.upgrade(conn) == []
        st = schema.status(conn)
        assert st.pending == () and [v for v, _ in st.applied] == shipped
        assert conn.execute("SELECT to_regclass('messages')").fetchone()[0] == "messages"


def test_concurrent_upgrades_apply_each_version_exactly_once(empty_dsn):
    """Two processes upgrading at once: the advisory lock makes one apply, the other wait."""
    results, errors = [], []

    def run():
        try:
            with psycopg.connect(empty_dsn, autocommit=True) as conn:
                results.append(schema.upgrade(conn))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    shipped = [m.version for m in schema.shipped_migrations()]
    assert sorted(results, key=len) == [[], [], shipped]
    with psycopg.connect(empty_dsn) as conn:
        assert table_rows(conn, "schema_migrations") == len(shipped)


def test_an_edited_applied_migration_is_refused(empty_dsn):
    """A migration changed after it was applied is reported, not silently skipped."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        schema.upgrade(conn)
        conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(schema.MigrationError, match="changed after it was applied"):
            schema.upgrade(conn)
        with pytest.raises(schema.MigrationError):
            schema.status(conn)


def test_every_unique_constraint_on_growing_tables_has_the_distribution_key(conn):
    """Citus-readiness: unique keys of message/account tables include their shard key."""
    keys = {"messages": "conversation_id", "members": "conversation_id",
            "outbox_to_legacy": "conversation_id", "notifications": "account_id",
            "presence": "account_id", "accounts": "account_id",
            "conversations": "conversation_id", "account_handles": "handle",
            "conversation_legacy_ids": "legacy_chat_id"}
    rows = conn.execute(
        "SELECT t.relname, array(SELECT a.attname FROM unnest(i.indkey) k "
        "  JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k) "
        "FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
        "WHERE i.indisunique AND t.relname = ANY(%s)", (list(keys),)).fetchall()
    assert {r[0] for r in rows} == set(keys)
    for table, columns in rows:
        assert keys[table] in columns, (table, columns)


def test_findings_migration_scopes_old_feed_gaps_to_their_supernode(empty_dsn, monkeypatch):
    """0012 on a store with findings: a feed_gap recorded before it gets its supernode as
    ``source`` (so it holds the accounts homed there); other findings get none; the new
    state ``unrecoverable`` is accepted and an unknown one still refused."""
    shipped = schema.shipped_migrations()
    before = [m for m in shipped if m.name != "findings_scope_coverage"]
    assert len(before) == len(shipped) - 1
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        monkeypatch.setattr(schema, "shipped_migrations", lambda: before)
        schema.upgrade(conn)
        conn.execute(
            "INSERT INTO reconcile_findings (kind, state, detail, created_ms) VALUES "
            "('feed_gap', 'open', '{\"source\": \"sn-2\", \"gap\": \"epoch\"}', 1), "
            "('inject_failed', 'open', '{\"source\": \"not a supernode\"}', 2)")
        monkeypatch.setattr(schema, "shipped_migrations", lambda: shipped)
        schema.upgrade(conn)
        assert conn.execute("SELECT kind, source FROM reconcile_findings ORDER BY created_ms"
                            ).fetchall() == [("feed_gap", "sn-2"), ("inject_failed", None)]
        conn.execute("UPDATE reconcile_findings SET state = 'unrecoverable' "
                     "WHERE kind = 'feed_gap'")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE reconcile_findings SET state = 'lost'")
