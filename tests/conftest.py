"""Fixtures shared by every test package, and the ``db`` marker for database tests."""

from __future__ import annotations

import gc

import pytest
from twisted.logger import globalLogPublisher

from tests.dbfixture import conn, db_dsn, db_server, empty_dsn  # noqa: F401 - fixtures

_DB_FIXTURES = {"db_server", "db_dsn", "conn", "empty_dsn"}


@pytest.fixture
def log_events():
    """``log_events(namespace)``: the Twisted log events of that namespace during the test."""
    observers = []

    def capture(namespace: str) -> list[dict]:
        events: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == namespace:
                events.append(event)

        globalLogPublisher.addObserver(observe)
        observers.append(observe)
        return events

    yield capture
    for observe in observers:
        globalLogPublisher.removeObserver(observe)


@pytest.fixture
def failures():
    """Every logged failure (a handler that raised) while the test runs: the fuzz tests
    assert it stays empty."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            events.append(event)

    # An earlier test's Deferred that failed unhandled is logged when it is collected: let
    # that happen now, not at some collection during this test (once, in CI, a crash test's
    # SimulatedCrash was logged in the middle of the operations endpoint's fuzzing).
    gc.collect()
    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _DB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)
