"""The database fixture's reset: each test starts from an empty store, as a TRUNCATE of
every table would leave it, though only the tables written since are truncated."""

from __future__ import annotations

import psycopg
import pytest

from tests.dbfixture import make_account, make_conversation, truncate_all


def table_rows(conn: psycopg.Connection) -> dict[str, int]:
    tables = [r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename <> 'schema_migrations'")]
    return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def audit(conn: psycopg.Connection) -> int:
    return conn.execute(
        "INSERT INTO audit_log (actor, action, subject) VALUES ('test', 'x', 'y') "
        "RETURNING audit_id").fetchone()[0]


def test_a_reset_empties_what_was_written_and_restarts_its_sequences(conn):
    a, b = make_account(conn, "alice"), make_account(conn, "bob")
    make_conversation(conn, a, b)
    assert audit(conn) == 1 and audit(conn) == 2
    truncate_all(conn)
    assert set(table_rows(conn).values()) == {0}
    assert audit(conn) == 1  # the sequence started again


def test_rows_written_and_deleted_since_still_restart_the_sequence(conn):
    audit(conn)
    conn.execute("DELETE FROM audit_log")
    truncate_all(conn)
    assert audit(conn) == 1


def test_a_sequence_advanced_by_a_failed_insert_is_restarted(conn):
    with pytest.raises(psycopg.errors.NotNullViolation):
        conn.execute("INSERT INTO audit_log (actor, action, subject) VALUES (NULL, 'x', 'y')")
    assert conn.execute("SELECT pg_relation_size('audit_log')").fetchone()[0] == 0
    truncate_all(conn)
    assert audit(conn) == 1


def test_a_reset_of_a_clean_store_truncates_nothing(conn):
    truncate_all(conn)
    before = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 'accounts'").fetchone()
    truncate_all(conn)
    assert conn.execute(
        "SELECT relfilenode FROM pg_class WHERE relname = 'accounts'").fetchone() == before


def test_a_table_analyzed_empty_is_reset_to_never_analyzed(conn):
    """An ANALYZE of the whole store (some tests run one) leaves empty tables with
    reltuples 0, which the planner trusts where it would guess for a fresh table: the reset
    truncates them again, so each test plans against fresh tables as before."""
    conn.execute("ANALYZE")
    assert conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'outbox_to_legacy'"
                        ).fetchone()[0] == 0
    truncate_all(conn)
    assert conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'outbox_to_legacy'"
                        ).fetchone()[0] == -1
