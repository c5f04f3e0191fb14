"""What bridgectl status gathers, against rows inserted into a real PostgreSQL store."""

from __future__ import annotations

import json
import uuid

from bridge.ops import status
from bridgectl import main as cli
from bridgectl.database import redact_dsn
from cloud.db import run_transaction
from tests.bridge.test_phases import NOW, add_finding, add_run, add_worker, make_account

SECRET = "hunter2-do-not-print"


def populate(conn) -> None:
    for i, phase in enumerate(["legacy", "legacy", "legacy", "dual", "cloud", "cloud-only"]):
        make_account(conn, f"user-{i}", phase)
    add_worker(conn, "w1", lag_cloud=120, lag_legacy=340)
    add_worker(conn, "w2", lag_cloud=80, lag_legacy=None, state="degraded", age_ms=29_000)
    add_worker(conn, "w3", lag_cloud=99_999, lag_legacy=99_999, age_ms=300_000)  # gone
    add_worker(conn, "w4", lag_cloud=50_000, state="stopped")  # stopped: not live
    conn.execute("UPDATE bridge_workers SET detail = %s::jsonb, feeds = 4 "
                 "WHERE worker_id = 'w1'", (json.dumps({
                     "token": SECRET,
                     "lag_to_cloud": {"p99_steady_ms": 90, "samples": 200, "met_faults": 10},
                     "lag_to_legacy": {"p99_steady_ms": 300, "samples": 50,
                                       "met_faults": 0}}),))
    for wid, cloud in (("w2", {"p99_steady_ms": 70, "samples": 100, "met_faults": 30}),
                       ("w3", {"p99_steady_ms": 9_000, "samples": 5, "met_faults": 5})):
        conn.execute("UPDATE bridge_workers SET detail = %s::jsonb WHERE worker_id = %s",
                     (json.dumps({"lag_to_cloud": cloud}), wid))
    cid = uuid.uuid4()
    for seq, (state, created) in enumerate([("pending", NOW - 5_000), ("pending", NOW - 2_000),
                                            ("done", NOW - 60_000)], start=1):
        conn.execute("INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, state, "
                     "created_ms) VALUES (%s, %s, %s, %s, %s)",
                     (cid, seq, uuid.uuid4(), state, created))
    add_finding(conn, "gap")
    add_finding(conn, "gap")
    add_finding(conn, "notification_failed")
    add_finding(conn, "presence", state="repaired")
    add_run(conn, "gaps", age_ms=600_000)  # run 1: clean
    add_run(conn, "gaps", state="running", age_ms=1_000, clean=None)  # run 2: running
    add_run(conn, "notifications", clean=False, age_ms=30_000)  # run 3
    conn.execute("INSERT INTO leases (name, holder, fence, expires_ms) VALUES "
                 "('feed:sn0', 'w1', 3, %s), ('feed:sn1', 'w3', 1, %s), ('feed:sn2', 'w1', 2, 0)",
                 (NOW + 10_000, NOW - 5_000))
    for state in ("pending", "acked", "acked", "failed"):
        conn.execute("INSERT INTO notifications (account_id, notification_id, conversation_id, "
                     "message_id, seq, state, next_attempt_ms, created_ms) "
                     "VALUES (%s, %s, %s, %s, 1, %s, 0, 0)",
                     (uuid.uuid4(), uuid.uuid4(), cid, uuid.uuid4(), state))


def test_status_of_an_empty_store(conn):
    """An empty store: zero counts, no lag, no workers, and the text still renders."""
    got = run_transaction(conn, "status_gather", status.gather, NOW)
    assert got["accounts"] == {"total": 0, "per_phase": {"legacy": 0, "dual": 0, "cloud": 0,
                                                         "cloud-only": 0}}
    assert got["mirror_lag_ms"] == {"to_cloud": None, "to_legacy": None}
    assert got["workers"] == [] and got["leases"] == [] and got["reconcile"] == {}
    assert got["outbox_to_legacy"] == {"pending": 0, "oldest_age_ms": None}
    assert got["open_findings"] == {} and got["findings"] == {}
    assert got["last_clean_reconcile"] is None and got["freeze"] is None
    assert "no runs yet" in status.render(got) and "freeze:        off" in status.render(got)
    assert got["controls"] == {"paused": {"injection": None, "reconcilers": None},
                               "injector_concurrency": None}
    assert ("controls:      injection running; reconcilers running; injector concurrency as "
            "configured") in status.render(got)


def test_status_reports_every_section_from_the_rows(conn):
    """Phases, lag over live workers only, backlog, findings, runs, workers, leases and
    notifications match the inserted rows."""
    populate(conn)
    got = run_transaction(conn, "status_gather", status.gather, NOW)
    assert got["accounts"]["per_phase"] == {"legacy": 3, "dual": 1, "cloud": 1,
                                            "cloud-only": 1}
    assert got["accounts"]["total"] == 6
    assert got["mirror_lag_ms"] == {"to_cloud": 120, "to_legacy": 340}  # w1 and w2 only
    # how much of it is the faults': the steady p99 and the share that met one (live only)
    assert got["lag_outside_faults"] == {
        "to_cloud": {"p99_ms": 90, "samples": 300, "met_faults": 40,
                     "met_faults_share": 0.133},
        "to_legacy": {"p99_ms": 300, "samples": 50, "met_faults": 0,
                      "met_faults_share": 0.0}}
    assert got["live_workers"] == 2
    workers = {w["worker_id"]: w for w in got["workers"]}
    assert [w["worker_id"] for w in got["workers"]] == ["w1", "w4", "w2", "w3"]
    assert workers["w1"] == {
        "worker_id": "w1", "state": "ready", "live": True, "heartbeat_age_ms": 1_000,
        "started_ms": NOW - 600_000, "lag_to_cloud_ms": 120, "lag_to_legacy_ms": 340,
        "mirrored_to_cloud": 0, "mirrored_to_legacy": 0, "feeds": 4, "injection": None,
        "lag_outside_faults": {
            "to_cloud": {"p99_steady_ms": 90, "samples": 200, "met_faults": 10},
            "to_legacy": {"p99_steady_ms": 300, "samples": 50, "met_faults": 0}}}
    assert (workers["w2"]["live"], workers["w3"]["live"], workers["w4"]["live"]) == \
        (True, False, False)
    assert workers["w3"]["heartbeat_age_ms"] == 300_000
    assert got["outbox_to_legacy"] == {"pending": 2, "oldest_age_ms": 5_000}
    assert got["open_findings"] == {"gap": 2, "notification_failed": 1}
    none = {"open": 0, "repaired": 0, "failed": 0, "unrecoverable": 0, "dismissed": 0}
    assert got["findings"] == {"gap": {**none, "open": 2},
                               "notification_failed": {**none, "open": 1},
                               "presence": {**none, "repaired": 1}}
    assert got["unrecoverable_findings"] == {}
    assert got["reconcile"]["gaps"]["run_id"] == 2 and got["reconcile"]["gaps"]["state"] == \
        "running"
    assert got["reconcile"]["notifications"]["clean"] is False
    assert got["last_clean_reconcile"]["run_id"] == 1
    assert got["last_clean_reconcile"]["age_ms"] == 600_000
    assert got["leases"] == [
        {"name": "feed:sn0", "holder": "w1", "fence": 3, "expires_ms": NOW + 10_000,
         "expires_in_ms": 10_000, "expired": False},
        {"name": "feed:sn1", "holder": "w3", "fence": 1, "expires_ms": NOW - 5_000,
         "expires_in_ms": -5_000, "expired": True},
        {"name": "feed:sn2", "holder": "w1", "fence": 2, "expires_ms": 0,
         "expires_in_ms": -NOW, "expired": True}]
    assert got["notifications"] == {"pending": 1, "sent": 0, "acked": 2, "failed": 1}
    text = status.render(got)
    for needle in ("accounts:      6  (legacy 3  dual 1  cloud 1  cloud-only 1)",
                   "to cloud 120 ms, to legacy 340 ms", "2 pending to legacy, oldest 5000 ms",
                   "gap 2  notification_failed 1", "2 live of 4", "feed:sn1",
                   "expired 5000 ms ago", "fence 2, released", "gaps run 1, 10 min ago"):
        assert needle in text, needle
    assert SECRET not in text and SECRET not in json.dumps(got)


def test_status_command_prints_json_with_the_dsn_redacted(conn, db_dsn, capsys):
    """bridgectl status --json is one object naming the database, never a password."""
    populate(conn)
    assert cli.main(["status", "--json", "--dsn", db_dsn]) == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["database"] == "--dsn" and got["dsn"] == redact_dsn(db_dsn)
    assert got["accounts"]["total"] == 6 and got["live_workers"] == 0  # real time: all stale
    assert cli.main(["status", "--dsn", db_dsn]) == cli.EXIT_OK
    text = capsys.readouterr().out
    assert "database:      --dsn" in text and SECRET not in text
