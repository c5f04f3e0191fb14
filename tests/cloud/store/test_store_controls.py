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


# ---------------------------------------------------------------- runtime controls

def test_pauses_are_read_back_and_audited_each_on_its_own(conn):
    """Pausing injection stores who, when and why and leaves the reconcilers running;
    resuming removes it, its audit row keeping the pause it ended."""
    assert tx(conn, controls_store.read_runtime_controls) == controls_store.RuntimeControls()
    got = tx(conn, controls_store.pause, "injection", reason="legacy SN upgrade",
             actor="ops-dana", now_ms=NOW)
    assert got == controls_store.Pause("injection", "legacy SN upgrade", "ops-dana", NOW)
    read = tx(conn, controls_store.read_runtime_controls)
    assert read.paused("injection") == got and read.paused("reconcilers") is None
    assert read.to_json(NOW + 5) == {
        "paused": {"injection": {"what": "injection", "reason": "legacy SN upgrade",
                                 "set_by": "ops-dana", "set_ms": NOW, "age_ms": 5},
                   "reconcilers": None},
        "injector_concurrency": None}
    tx(conn, controls_store.pause, "reconcilers", reason="", actor="ops-eve", now_ms=NOW + 1)
    ended = tx(conn, controls_store.resume, "injection", actor="ops-eve", now_ms=NOW + 60_000)
    assert ended == got
    read = tx(conn, controls_store.read_runtime_controls)
    assert read.paused("injection") is None
    assert read.paused("reconcilers") == controls_store.Pause("reconcilers", "", "ops-eve",
                                                               NOW + 1)
    assert audit(conn) == [
        ("ops-dana", "control_paused", "injection_paused", {"reason": "legacy SN upgrade"}),
        ("ops-eve", "control_paused", "reconcilers_paused", {"reason": ""}),
        ("ops-eve", "control_resumed", "injection_paused",
         {"ended": {"what": "injection", "reason": "legacy SN upgrade", "set_by": "ops-dana",
                    "set_ms": NOW}, "paused_ms": 60_000})]


def test_a_second_pause_and_a_resume_of_none_are_refused_and_change_nothing(conn):
    """Pausing twice names who paused first and keeps their reason; resuming what is not
    paused is refused; neither writes an audit row; an unknown target is a ValueError."""
    with pytest.raises(Conflict, match="reconcilers is not paused"):
        tx(conn, controls_store.resume, "reconcilers", actor="a", now_ms=NOW)
    tx(conn, controls_store.pause, "injection", reason="first", actor="ops-dana", now_ms=NOW)
    with pytest.raises(Conflict, match="injection is already paused by ops-dana: first"):
        tx(conn, controls_store.pause, "injection", reason="second", actor="ops-eve",
           now_ms=NOW + 1)
    with pytest.raises(ValueError, match="unknown pause 'everything'"):
        tx(conn, controls_store.pause, "everything", reason="", actor="a", now_ms=NOW)
    assert tx(conn, controls_store.read_runtime_controls).paused("injection") == \
        controls_store.Pause("injection", "first", "ops-dana", NOW)
    assert [r[1] for r in audit(conn)] == ["control_paused"]


def test_the_injector_concurrency_is_set_changed_and_reset_each_audited_once(conn):
    """Set, set again to the same value (nothing written), changed, then back to the
    configured window (None); each change audited with from and to; a bad value is
    refused before anything is written."""
    read = controls_store.read_runtime_controls
    before, after = tx(conn, controls_store.set_injector_concurrency, 200, actor="ops-dana",
                       now_ms=NOW)
    assert before is None and after == controls_store.Setting(200, "ops-dana", NOW)
    assert tx(conn, read).injector_concurrency == after
    assert tx(conn, controls_store.set_injector_concurrency, 200, actor="ops-eve",
              now_ms=NOW + 1) == (after, after)
    before, after = tx(conn, controls_store.set_injector_concurrency, 50, actor="ops-eve",
                       now_ms=NOW + 2)
    assert before.value == 200 and after == controls_store.Setting(50, "ops-eve", NOW + 2)
    assert tx(conn, controls_store.set_injector_concurrency, None, actor="ops-eve",
              now_ms=NOW + 3) == (after, None)
    assert tx(conn, read).injector_concurrency is None
    assert tx(conn, controls_store.set_injector_concurrency, None, actor="ops-eve",
              now_ms=NOW + 4) == (None, None)
    for bad in (0, -1, 100_001, 2.5):
        with pytest.raises(ValueError, match="injector concurrency must be an integer"):
            tx(conn, controls_store.set_injector_concurrency, bad, actor="a", now_ms=NOW)
    assert [(r[1], r[2], r[3]) for r in audit(conn)] == [
        ("control_set", "injector_concurrency", {"from": None, "to": 200}),
        ("control_set", "injector_concurrency", {"from": 200, "to": 50}),
        ("control_set", "injector_concurrency", {"from": 50, "to": None})]


def test_the_freeze_and_the_runtime_controls_do_not_see_each_other(conn):
    """The freeze is no pause, and a pause no freeze: each reads only its own rows."""
    tx(conn, controls_store.freeze_on, reason="x", actor="a", now_ms=NOW)
    assert tx(conn, controls_store.read_runtime_controls) == controls_store.RuntimeControls()
    tx(conn, controls_store.freeze_off, actor="a", now_ms=NOW)
    tx(conn, controls_store.pause, "injection", reason="", actor="a", now_ms=NOW)
    tx(conn, controls_store.set_injector_concurrency, 3, actor="a", now_ms=NOW)
    assert tx(conn, controls_store.read_freeze) is None


def test_legacy_min_versions_are_set_per_cohort_cleared_and_audited(conn):
    """One rule for everyone and one per cohort live in one row; setting what is set already
    writes nothing; clearing the last rule removes the row; each change is audited with
    from and to, and the other controls are left alone."""
    set_ = controls_store.set_min_version
    assert tx(conn, controls_store.read_min_versions) == []
    before, after = tx(conn, set_, "", "7.4", actor="ops-dana", now_ms=NOW)
    assert before is None and after == controls_store.MinVersion("", "7.4", "ops-dana", NOW)
    tx(conn, set_, "pilot", "8.0", actor="ops-eve", now_ms=NOW + 1)
    assert tx(conn, set_, "pilot", "8.0", actor="ops-eve", now_ms=NOW + 2) == (
        controls_store.MinVersion("pilot", "8.0", "ops-eve", NOW + 1),) * 2
    assert [(r.cohort, r.version) for r in tx(conn, controls_store.read_min_versions)] == [
        ("", "7.4"), ("pilot", "8.0")]
    tx(conn, set_, "", "7.6", actor="ops-dana", now_ms=NOW + 3)
    tx(conn, set_, "", None, actor="ops-dana", now_ms=NOW + 4)
    assert tx(conn, set_, "", None, actor="ops-dana", now_ms=NOW + 5) == (None, None)
    assert [(r.cohort, r.version) for r in tx(conn, controls_store.read_min_versions)] == [
        ("pilot", "8.0")]
    tx(conn, set_, "pilot", None, actor="ops-eve", now_ms=NOW + 6)
    assert conn.execute("SELECT count(*) FROM operator_controls").fetchone() == (0,)
    assert [(a[1], a[2], a[3]["from"], a[3]["to"]) for a in audit(conn)] == [
        ("legacy_min_version_set", "legacy_min_versions", None, "7.4"),
        ("legacy_min_version_set", "cohort:pilot", None, "8.0"),
        ("legacy_min_version_set", "legacy_min_versions", "7.4", "7.6"),
        ("legacy_min_version_set", "legacy_min_versions", "7.6", None),
        ("legacy_min_version_set", "cohort:pilot", "8.0", None)]
