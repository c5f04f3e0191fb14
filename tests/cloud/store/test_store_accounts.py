"""Accounts against a real PostgreSQL: a handle names one account."""

from __future__ import annotations

import itertools
import uuid

import pytest

from cloud.model import Account
from cloud.store import accounts as accounts_store
from cloud.store.errors import Conflict
from tests.cloud.store.storefixture import prepared_plan, table_rows
from tests.dbfixture import make_account, tx


def test_handle_belongs_to_one_account(conn):
    """A second account may not take an existing handle; recreating the same one is a no-op."""
    a = make_account(conn, "alice")
    assert tx(conn, accounts_store.create_account, Account(a, "alice", "dual", "alice"),
              None) is False
    with pytest.raises(Conflict):
        tx(conn, accounts_store.create_account, Account(uuid.uuid4(), "alice", "dual"), None)
    assert table_rows(conn, "accounts") == 1


def test_a_reimport_page_probes_its_handles_in_a_generic_plan(conn):
    """The re-import's read of a page's existing accounts probes account_handles and accounts
    by their keys, in a custom and in a generic plan (psycopg prepares the statement after
    five pages), before and after an ANALYZE of a store of 2,000 accounts: its cost follows
    the page, not the store. As ``handle = ANY($1)``, the generic plan without statistics
    scanned account_handles and compared every row with every handle of the page (8-10 ms a
    page against 0.6, EXPLAIN ANALYZE)."""
    records = [accounts_store.LegacyAccountRecord(f"u{i:05d}", uuid.uuid4(), f"pw-{i}")
               for i in range(2000)]
    for i in range(0, 2000, 200):
        tx(conn, accounts_store.upsert_linked_accounts, records[i:i + 200], 1000)
    page = [r.handle for r in records[:200]]
    statement = accounts_store._LINKED_NOW.replace("%s::text[]", "$1::text[]").replace(
        "%s", "$2::bigint", 1)
    for analyzed, mode in itertools.product((False, True),
                                            ("force_custom_plan", "force_generic_plan")):
        if analyzed:
            conn.execute("ANALYZE")
        plan = prepared_plan(conn, statement, (page, 1000), mode)
        with conn.transaction():  # the statement as the import runs it, prepared
            conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
            assert len(conn.execute(accounts_store._LINKED_NOW, (page, 1000),
                                    prepare=True).fetchall()) == 200
        for table in ("account_handles", "accounts"):
            assert f"Seq Scan on {table} " not in plan, f"{analyzed} {mode}\n{plan}"
