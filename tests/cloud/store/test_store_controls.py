"""Operator controls in the store: the migration freeze is set once, lifted once, each
change audited; a second freeze or a lift of none is refused and writes nothing."""

from __future__ import annotations

import pytest

from cloud.store import controls as controls_store
from cloud.store.errors import Conflict
from tests.dbfixture import tx

NOW = 1_700_000_000_000


def audit(conn) -> list[tuple]:
    return conn.execute("SELECT actor, action, subject, detail FROM audit_log "
                        "ORDER BY audit_id").fetchall()


def test_freeze_on_then_off_is_read_back_and_audited(conn):
    """on stores who, when and why (read back as such); off removes it and its audit row
    keeps the freeze it ended."""
    assert tx(conn, controls_store.read_freeze) is None
    got = tx(conn, controls_store.freeze_on, reason="incident 42", actor="ops-dana", now_ms=NOW)
    assert got == controls_store.Freeze("incident 42", "ops-dana", NOW)
    assert tx(conn, controls_store.read_freeze) == got
    ended = tx(conn, controls_store.freeze_off, actor="ops-eve", now_ms=NOW + 60_000)
    assert ended == got and tx(conn, controls_store.read_freeze) is None
    assert audit(conn) == [
        ("ops-dana", "migration_frozen", "migration_freeze", {"reason": "incident 42"}),
        ("ops-eve", "migration_unfrozen", "migration_freeze",
         {"ended": {"reason": "incident 42", "set_by": "ops-dana", "set_ms": NOW},
          "frozen_ms": 60_000})]


def test_a_second_freeze_and_a_lift_of_none_are_refused_and_change_nothing(conn):
    """Freezing twice names who froze first and keeps their reason; lifting when not frozen
    is refused; neither writes an audit row."""
    with pytest.raises(Conflict, match="promotions are not frozen"):
        tx(conn, controls_store.freeze_off, actor="a", now_ms=NOW)
    tx(conn, controls_store.freeze_on, reason="first", actor="ops-dana", now_ms=NOW)
    with pytest.raises(Conflict, match="already frozen by ops-dana: first"):
        tx(conn, controls_store.freeze_on, reason="second", actor="ops-eve", now_ms=NOW + 1)
    assert tx(conn, controls_store.read_freeze) == controls_store.Freeze("first", "ops-dana",
                                                                         NOW)
    assert [r[1] for r in audit(conn)] == ["migration_frozen"]
