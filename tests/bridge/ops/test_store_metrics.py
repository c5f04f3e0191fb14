"""The migration metrics a worker reads from the store: accounts per phase, open findings,
the freeze, live workers and phase changes counted from the audit log, on real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from prometheus_client import REGISTRY

from bridge.ops import store_metrics
from cloud import admin
from cloud.store import cohorts as cohorts_store
from cloud.store import controls
from cloud.store import findings as findings_store
from tests.bridge.test_phases import NOW, healthy, make_account
from tests.bridge.test_worker import make_worker
from tests.dbfixture import tx
from tests.legacy.netfixture import LegacyNet

sample = REGISTRY.get_sample_value


def refresh(conn, limit: int = store_metrics.PHASE_CHANGE_BATCH) -> store_metrics.StoreReading:
    reading = tx(conn, store_metrics.read_store, NOW, store_metrics.PHASE_CHANGES.low_id(),
                 limit)
    store_metrics.publish(reading)
    return reading


def move(conn, account_id, a: str, b: str) -> None:
    tx(conn, admin.apply_phase_change, account_id, a, b, actor="ops", now_ms=NOW)


def changes(a: str, b: str) -> float | None:
    return sample("bridge_phase_changes_total", {"from": a, "to": b})


@pytest.fixture(autouse=True)
def fresh_count():
    store_metrics.PHASE_CHANGES.reset()
    yield
    store_metrics.PHASE_CHANGES.reset()


def test_gauges_follow_phases_findings_freeze_and_workers(conn):
    """Each gauge moves when the store changes, and every phase and kind shows 0 too."""
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    refresh(conn)
    assert sample("bridge_accounts_by_phase", {"phase": "legacy"}) == 2
    assert sample("bridge_accounts_by_phase", {"phase": "cloud-only"}) == 0
    assert sample("bridge_findings_open", {"kind": "inject_failed"}) == 0
    assert sample("bridge_migration_frozen") == 0
    assert sample("bridge_workers_live") == 0
    assert changes("legacy", "dual") == 0 and changes("dual", "legacy") == 0

    move(conn, alice, "legacy", "dual")
    f1 = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW, account_id=bob)
    tx(conn, findings_store.record_finding, "inject_failed", {}, NOW, account_id=bob)
    tx(conn, findings_store.record_finding, "feed_gap", {}, NOW)
    tx(conn, controls.freeze_on, reason="incident", actor="ops", now_ms=NOW - 5000)
    healthy(conn)  # a live worker
    refresh(conn)
    assert sample("bridge_accounts_by_phase", {"phase": "legacy"}) == 1
    assert sample("bridge_accounts_by_phase", {"phase": "dual"}) == 1
    assert sample("bridge_findings_open", {"kind": "inject_failed"}) == 2
    assert sample("bridge_findings_open", {"kind": "feed_gap"}) == 1
    assert sample("bridge_migration_frozen") == 1
    assert sample("bridge_migration_freeze_set_timestamp_seconds") == (NOW - 5000) / 1000
    assert sample("bridge_workers_live") == 1
    assert changes("legacy", "dual") == 1

    tx(conn, findings_store.dismiss_finding, f1, actor="ops", why="known", now_ms=NOW)
    tx(conn, controls.freeze_off, actor="ops", now_ms=NOW)
    move(conn, alice, "dual", "legacy")
    move(conn, bob, "legacy", "dual")
    refresh(conn)
    refresh(conn)  # read again: nothing counted twice
    assert sample("bridge_findings_open", {"kind": "inject_failed"}) == 1
    assert sample("bridge_migration_frozen") == 0
    assert sample("bridge_migration_freeze_set_timestamp_seconds") == 0
    assert changes("legacy", "dual") == 2 and changes("dual", "legacy") == 1


def test_a_move_committed_after_a_later_one_is_counted_once(conn, db_dsn):
    """Audit ids are handed out before commit: a move whose transaction commits after a
    later id is already counted still counts, and only once."""
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    refresh(conn)
    with psycopg.connect(db_dsn) as slow:  # takes its audit id first, commits last
        admin.apply_phase_change(slow, alice, "legacy", "dual", actor="ops", now_ms=NOW)
        move(conn, bob, "legacy", "cloud")
        refresh(conn)
        assert changes("legacy", "dual") == 0 and changes("legacy", "cloud") == 1
        slow.commit()
    refresh(conn)
    refresh(conn)
    assert changes("legacy", "dual") == 1 and changes("legacy", "cloud") == 1


def test_a_long_history_is_caught_up_before_the_counter_shows(conn):
    """Each read is bounded; until the worker has read the whole log the series are absent
    (a rate() would otherwise see history as a burst), then they show the whole count."""
    window = store_metrics.LATE_WINDOW
    conn.execute("INSERT INTO audit_log (actor, action, subject, detail) "
                 "SELECT 'ops', 'phase_change', 'x', '{\"from\": \"legacy\", \"to\": \"dual\"}' "
                 "FROM generate_series(1, %s)", (window + 500,))
    with pytest.raises(ValueError, match="LATE_WINDOW"):
        refresh(conn, limit=window)
    first = refresh(conn, limit=window + 1)
    assert len(first.phase_changes) == window + 1 and not first.phase_changes_complete
    assert changes("legacy", "dual") is None
    refresh(conn, limit=window + 1)
    assert changes("legacy", "dual") == window + 500


def last_action(cohort: str, action: str) -> float | None:
    return sample("bridge_cohort_last_action_timestamp_seconds",
                  {"cohort": cohort, "action": action})


def advance(conn, cohort, account_id, to: str, at_ms: int) -> None:
    n = tx(conn, cohorts_store.begin_advance, cohort.cohort_id, to, {account_id: "legacy"}, {},
           forced=False, actor="ops", now_ms=at_ms)
    tx(conn, cohorts_store.finish_advance, cohort, n, moved=1, held_at_apply={}, held_total=0,
       failed=0, unchanged=0, actor="ops", now_ms=at_ms)


def test_cohort_actions_are_timestamped_until_a_day_after_the_cohort_ended(conn):
    """Each cohort's newest created/advanced/.../cancelled audit row is a gauge at that
    moment (what the dashboard annotates); an ended cohort's series go a day after its end."""
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    pilot = tx(conn, cohorts_store.create_cohort, "pilot", {"handles": ["alice"]}, [alice],
               actor="ops", now_ms=NOW - 60_000)
    wave = tx(conn, cohorts_store.create_cohort, "wave-1", {"handles": ["bob"]}, [bob],
              actor="ops", now_ms=NOW - 50_000)
    move(conn, alice, "legacy", "dual")  # a phase_change row: not a cohort action
    refresh(conn)
    assert last_action("pilot", "created") == (NOW - 60_000) / 1000
    assert last_action("pilot", "advanced") is None
    advance(conn, pilot, alice, "dual", NOW - 30_000)
    advance(conn, pilot, alice, "cloud", NOW - 20_000)
    tx(conn, cohorts_store.end_cohort, pilot, "completed", actor="ops", now_ms=NOW - 10_000)
    refresh(conn)
    assert last_action("pilot", "advanced") == (NOW - 20_000) / 1000  # the newest advance
    assert last_action("pilot", "completed") == (NOW - 10_000) / 1000
    assert last_action("pilot", "reversed") is None
    assert last_action("wave-1", "created") == (NOW - 50_000) / 1000

    day_later = NOW - 10_000 + store_metrics.COHORT_ENDED_SHOWN_MS
    store_metrics.publish(tx(conn, store_metrics.read_store, day_later,
                             store_metrics.PHASE_CHANGES.low_id()))
    assert last_action("pilot", "completed") is not None  # still within the day
    store_metrics.publish(tx(conn, store_metrics.read_store, day_later + 1,
                             store_metrics.PHASE_CHANGES.low_id()))
    assert last_action("pilot", "completed") is None and last_action("pilot", "created") is None
    assert last_action("wave-1", "created") == (NOW - 50_000) / 1000  # active: kept
    tx(conn, cohorts_store.end_cohort, wave, "cancelled", actor="ops", now_ms=NOW)
    refresh(conn)
    assert last_action("wave-1", "cancelled") == NOW / 1000


def test_the_worker_publishes_them_on_its_heartbeat(conn):
    """A running worker's heartbeat picks up a phase change and a finding made elsewhere."""
    net = LegacyNet(3, seed=4).start()
    worker = make_worker(net, conn)
    worker.startService()
    net.run(2.0)
    assert sample("bridge_workers_live") == 1
    assert changes("legacy", "cloud") == 0
    alice = make_account(conn, "carol")
    move(conn, alice, "legacy", "cloud")
    tx(conn, findings_store.record_finding, "mirror_refused", {}, NOW, account_id=alice)
    net.run(1.5)  # heartbeat_s = 1
    assert changes("legacy", "cloud") == 1
    assert sample("bridge_findings_open", {"kind": "mirror_refused"}) == 1
    assert sample("bridge_accounts_by_phase", {"phase": "cloud"}) == 1
    net.wait(worker.stopService())
