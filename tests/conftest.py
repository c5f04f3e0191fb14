"""Fixtures shared by every test package, and the ``db`` marker for database tests."""

from __future__ import annotations

import pytest

from tests.dbfixture import conn, db_dsn, db_server  # noqa: F401 - fixtures, used by name

_DB_FIXTURES = {"db_server", "db_dsn", "conn"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _DB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)
