"""Accounts against a real PostgreSQL: a handle names one account."""

from __future__ import annotations

import uuid

import pytest

from cloud.model import Account
from cloud.store import accounts as accounts_store
from cloud.store.errors import Conflict
from tests.cloud.store.storefixture import table_rows
from tests.dbfixture import make_account, tx


def test_handle_belongs_to_one_account(conn):
    """A second account may not take an existing handle; recreating the same one is a no-op."""
    a = make_account(conn, "alice")
    assert tx(conn, accounts_store.create_account, Account(a, "alice", "dual", "alice"),
              None) is False
    with pytest.raises(Conflict):
        tx(conn, accounts_store.create_account, Account(uuid.uuid4(), "alice", "dual"), None)
    assert table_rows(conn, "accounts") == 1
