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


def test_renew_leases_extends_only_the_leases_this_holder_still_has(conn):
    """One statement renews a worker's leases: those it holds under the token it took them
    with and that have not run out; a lease taken over (new fence), held by another, or
    expired is not renewed and is named missing from the answer."""
    now = 10_000
    fences = {name: tx(conn, coordination_store.acquire_lease, name, "w1", now, 1_000)
              for name in ("feed:a", "feed:b", "feed:c", "feed:d")}
    tx(conn, coordination_store.acquire_lease, "feed:other", "w2", now, 1_000)
    # feed:b expires and w2 takes it (fence + 1); feed:c expires untaken
    conn.execute("UPDATE leases SET expires_ms = %s WHERE name IN ('feed:b', 'feed:c')",
                 (now + 100,))
    tx(conn, coordination_store.acquire_lease, "feed:b", "w2", now + 200, 1_000)
    mine = {**fences, "feed:other": 1}
    renewed = tx(conn, coordination_store.renew_leases, mine, "w1", now + 300, 5_000)
    assert renewed == {"feed:a", "feed:d"}
    expiries = dict(conn.execute("SELECT name, expires_ms FROM leases").fetchall())
    assert expiries == {"feed:a": now + 5_300, "feed:d": now + 5_300, "feed:b": now + 1_200,
                        "feed:c": now + 100, "feed:other": now + 1_000}
    assert tx(conn, coordination_store.renew_leases, {}, "w1", now, 5_000) == set()
    # an old token of a lease still held is not renewed either
    assert tx(conn, coordination_store.renew_leases, {"feed:a": fences["feed:a"] - 1}, "w1",
              now + 400, 5_000) == set()
