"""bridgectl reconcile as a real process: legacy run + bridge run + reconcile gaps over TCP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from drills.ports import free_port_range
from tests.bridge.test_bridge_tcp import wait_for
from tests.processes import wait_for_line

BRIDGECTL = [sys.executable, "-m", "bridgectl.main"]


def test_reconcile_gaps_repairs_what_the_bridge_missed(conn, db_dsn, tmp_path):
    """Messages deleted from the cloud (and traffic after the bridge stopped) come back;
    the JSON report says so; a second run finds the stacks in sync (exit 0, clean)."""
    env = {"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    base = free_port_range(4)
    legacy = subprocess.Popen(
        [*BRIDGECTL, "legacy", "run", "--supernodes", "3", "--users", "20", "--rate", "10",
         "--port", str(base), "--seed", "4", "--duration", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_line(legacy, "legacy network up")
        bridge = subprocess.Popen(
            [*BRIDGECTL, "bridge", "run", "--dsn", db_dsn, "--metrics-port", "0",
             "--legacy", f"127.0.0.1:{base + 3}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        wait_for_line(bridge, r"metrics on")
        wait_for(lambda: conn.execute("SELECT count(*) FROM messages").fetchone()[0] >= 20)
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=30) == 0
        lost = [r[0] for r in conn.execute(
            "SELECT legacy_guid FROM messages ORDER BY seq LIMIT 4")]
        conn.execute("DELETE FROM notifications WHERE message_id IN (SELECT message_id "
                     "FROM messages WHERE legacy_guid = ANY(%s))", (lost,))
        conn.execute("DELETE FROM messages WHERE legacy_guid = ANY(%s)", (lost,))
        time.sleep(1.5)
        legacy_arg = ["--legacy", f"127.0.0.1:{base + 3}", "--dsn", db_dsn]
        out = subprocess.run([*BRIDGECTL, "reconcile", "gaps", *legacy_arg, "--margin", "1",
                              "--json"], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["confirmed"] >= 4 and report["repaired"] == report["confirmed"]
        back = conn.execute("SELECT count(*) FROM messages WHERE legacy_guid = ANY(%s)",
                            (lost,)).fetchone()[0]
        assert back == 4
        again = subprocess.run([*BRIDGECTL, "reconcile", "gaps", *legacy_arg, "--margin",
                                "30", "--json"], capture_output=True, text=True, timeout=120,
                               env=env)
        assert again.returncode == 0 and json.loads(again.stdout)["clean"], again.stdout
        assert json.loads(again.stdout)["detail"]["mode"] == "dirty_set"
        sweep = subprocess.run([*BRIDGECTL, "reconcile", "gaps", *legacy_arg, "--margin",
                                "30", "--full-sweep", "--json"], capture_output=True,
                               text=True, timeout=120, env=env)
        swept = json.loads(sweep.stdout)
        assert sweep.returncode == 0 and swept["clean"], sweep.stdout
        assert swept["detail"]["mode"] == "full_sweep" and swept["detail"]["skipped_clean"] == 0
        assert swept["detail"]["digest_requests"] == swept["compared"] > 0
        # a targeted, paced run of one conversation (named by its legacy chat id)
        chat = conn.execute("SELECT legacy_chat_id FROM conversations "
                            "WHERE legacy_chat_id IS NOT NULL LIMIT 1").fetchone()[0]
        one = subprocess.run([*BRIDGECTL, "reconcile", "gaps", *legacy_arg, "--margin", "30",
                              "--conversation", chat, "--max-rate", "20", "--json"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert one.returncode == 0, one.stderr
        targeted = json.loads(one.stdout)
        assert targeted["scope"].startswith("conversation:") and targeted["compared"] == 1
        assert targeted["detail"]["max_rate"] == 20 and targeted["clean"]
        assert conn.execute("SELECT scope FROM reconcile_runs ORDER BY run_id DESC LIMIT 1"
                            ).fetchone()[0] == targeted["scope"]
    finally:
        legacy.send_signal(signal.SIGTERM)
        legacy.wait(timeout=30)


@pytest.mark.parametrize("argv,code,needle", [
    (["reconcile", "gaps"], 2, "--legacy HOST:PORT is needed"),
    (["reconcile", "gaps", "--legacy", "nohost"], 2, "is not HOST:PORT"),
    (["reconcile", "notifications", "--since", "soon"], 2, "not a duration"),
    (["reconcile", "notifications", "--max-seconds", "0"], 2, "--max-seconds must be"),
    (["reconcile", "notifications", "--max-seconds", "-5"], 2, "--max-seconds must be"),
    (["reconcile", "notifications", "--max-seconds", "inf"], 2, "not a finite number"),
    (["reconcile", "presence", "--legacy", "127.0.0.1:1", "--since", "1h"], 2,
     "presence has no time window"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--notifications-since", "1h"], 2,
     "--notifications-since applies to notifications and all"),
    (["reconcile", "notifications", "--since", "1h", "--notifications-since", "2h"], 2,
     "not both"),
    (["reconcile", "presence", "--legacy", "127.0.0.1:1", "--full-sweep"], 2,
     "--full-sweep applies to gaps and all"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--conversation", "c", "--full-sweep"],
     2, "a targeted run compares its whole scope"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--retention-margin", "30d"], 2,
     "--retention-margin must not be negative and must be shorter than --legacy-retention"),
    (["reconcile", "all", "--legacy", "127.0.0.1:1", "--legacy-retention", "0"], 2,
     "must be positive"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--max-rate", "0"], 2,
     "--max-rate must be a positive number"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--max-rate", "-3"], 2,
     "--max-rate must be a positive number"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--max-rate", "nan"], 2,
     "not a finite number"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--max-rate", "fast"], 2,
     "is not a number"),
    (["reconcile", "notifications", "--max-rate", "5"], 2,
     "--max-rate applies to gaps, presence and all"),
    (["reconcile", "all", "--legacy", "127.0.0.1:1", "--account", "alice"], 2,
     "apply to reconcile gaps only"),
    (["reconcile", "presence", "--legacy", "127.0.0.1:1", "--conversation", "c1"], 2,
     "apply to reconcile gaps only"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--account", "a", "--conversation",
      "c"], 2, "give --account or --conversation, not both"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--account", "a", "--account", "b"],
     2, "give --account once"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--account", "a", "--textfile",
      "/tmp/x.prom"], 2, "a targeted run writes no metrics"),
    (["reconcile", "gaps", "--legacy", "127.0.0.1:1", "--actor", "ops"], 2,
     "--actor applies to a targeted run"),
])
def test_reconcile_rejects_bad_arguments_clearly(argv, code, needle, tmp_path):
    """Bad flags exit 2 with one clear line, no traceback, nothing run."""
    out = subprocess.run([*BRIDGECTL, *argv], capture_output=True, text=True, timeout=60,
                         env={"BRIDGE_HOME": str(tmp_path), "BRIDGE_DSN": "dbname=none"})
    assert out.returncode == code and needle in out.stderr and "Traceback" not in out.stderr


def test_reconcile_writes_textfile_metrics_and_an_empty_store_is_an_error(conn, db_dsn,
                                                                          tmp_path):
    """--textfile writes the run's metrics; comparing nothing exits 1, never 'in sync'."""
    prom = tmp_path / "reconcile.prom"
    out = subprocess.run([*BRIDGECTL, "reconcile", "notifications", "--dsn", db_dsn,
                          "--textfile", str(prom), "--json"], capture_output=True, text=True,
                         timeout=60, env={"BRIDGE_HOME": str(tmp_path)})
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["compared"] == 0
    text = prom.read_text()
    assert 'bridge_reconcile_exit_code{kind="notifications"} 1.0' in text
    assert "bridge_reconcile_compared" in text


def test_reconcile_help_says_what_since_means_for_each_kind(tmp_path):
    """--help names the deadline's default and --since's one meaning per kind."""
    out = subprocess.run([*BRIDGECTL, "reconcile", "--help"], capture_output=True, text=True,
                         timeout=60, env={"BRIDGE_HOME": str(tmp_path)})
    text = " ".join(out.stdout.split())
    assert out.returncode == 0
    for needle in ("gaps and all: compare messages sent within it (default 30d)",
                   "notifications: look for notifications owed",
                   "presence: has no window", "never widens the notifications window",
                   "--notifications-since", "default 600", "3 partial"):
        assert needle in text, needle


def test_a_login_server_that_never_answers_can_not_hold_a_run_past_its_deadline(db_dsn,
                                                                                tmp_path):
    """Discovery against a port that accepts and never answers ends at --max-seconds
    (exit 1: the legacy network was unreachable at the start), not at any peer timeout."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([*BRIDGECTL, "reconcile", "presence", "--dsn", db_dsn,
                              "--legacy", f"127.0.0.1:{port}", "--max-seconds", "1"],
                             capture_output=True, text=True, timeout=60,
                             env={"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert out.returncode == 1 and "cannot reach the legacy network" in out.stderr
    assert "Traceback" not in out.stderr
    # the deadline plus the interpreter's start and exit; below the 5 s handshake bound,
    # which would otherwise be what ended the wait
    assert took < 4.5


def test_a_reconcile_connection_bounds_every_statement_and_lock_wait(db_dsn):
    """The run's connections (statement_timeout_s) cut a slow statement and a lock wait
    off on the server, so no database wait of a run is unbounded."""
    import psycopg

    from bridgectl.database import connect

    with connect(db_dsn, "test", statement_timeout_s=0.3) as conn, \
            psycopg.connect(db_dsn, autocommit=True) as holder:
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - t0 < 5
        holder.execute("SELECT pg_advisory_lock(4242)")
        t0 = time.monotonic()
        with pytest.raises((psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)):
            conn.execute("SELECT pg_advisory_lock(4242)")
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("flag,ref,needle", [
    ("--account", "nobody", "unknown account: 'nobody'"),
    ("--conversation", "no-such-chat", "unknown conversation: 'no-such-chat'"),
    ("--conversation", "00000000-0000-0000-0000-00000000abcd", "unknown conversation"),
])
def test_a_targeted_run_of_an_unknown_scope_is_refused_and_runs_nothing(conn, db_dsn,
                                                                        tmp_path, flag, ref,
                                                                        needle):
    """An unknown account or conversation: exit 2 with one clear line, before the legacy
    network is even asked (its address here answers nothing), and no run row written."""
    out = subprocess.run([*BRIDGECTL, "reconcile", "gaps", "--dsn", db_dsn, "--legacy",
                          "127.0.0.1:1", flag, ref], capture_output=True, text=True,
                         timeout=60, env={"BRIDGE_HOME": str(tmp_path)})
    assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "cannot reach" not in out.stderr
    assert conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] == 0
