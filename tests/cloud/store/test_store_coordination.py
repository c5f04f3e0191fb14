"""Coordination of bridge workers against a real PostgreSQL: heartbeats that arrive out of order."""

from __future__ import annotations

from cloud.store import coordination as coordination_store
from tests.dbfixture import tx


def test_an_older_report_of_the_same_worker_process_does_not_overwrite_a_newer_one(conn):
    """Reports of one process run on pool threads and may commit out of order: a 'degraded'
    stamped before a 'ready' must not win. A new process (another started_ms) always does."""
    def report(state: str, started: int, at: int) -> None:
        tx(conn, coordination_store.heartbeat_worker, "w1", state, at, started,
           lag_to_cloud_ms=None, lag_to_legacy_ms=None, mirrored_to_cloud=0,
           mirrored_to_legacy=0, feeds=1 if state == "ready" else 0, detail={})

    def row() -> tuple:
        return conn.execute("SELECT state, heartbeat_ms, started_ms FROM bridge_workers "
                            "WHERE worker_id = 'w1'").fetchone()

    report("ready", started=1_000, at=5_000)
    report("degraded", started=1_000, at=4_000)  # stamped earlier, committed later
    assert row() == ("ready", 5_000, 1_000)
    report("ready", started=1_000, at=5_000)  # the same moment again: written
    report("degraded", started=9_000, at=3_000)  # a restarted process, whatever its clock
    assert row() == ("degraded", 3_000, 9_000)
