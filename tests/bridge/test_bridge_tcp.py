"""The bridge as a real process over loopback TCP: legacy run + bridge run + PostgreSQL."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

from cloud.store import accounts as accounts_store
from cloud.store import messages as messages_store
from drills.ports import free_port_range
from tests.processes import wait_for_line
from tests.sockets import listening

BRIDGECTL = [sys.executable, "-m", "bridgectl.main"]
SUPERNODES = 3


def wait_for(predicate, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def test_bridge_mirrors_both_ways_over_tcp_and_stops_cleanly(conn, db_dsn, tmp_path):
    """Legacy traffic lands in the store; a cloud post is injected (woken by NOTIFY) and
    acknowledged by the home supernode; SIGTERM drains and exits 0."""
    env = {"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    base = free_port_range(SUPERNODES + 1)
    legacy = subprocess.Popen(
        [*BRIDGECTL, "legacy", "run", "--supernodes", str(SUPERNODES), "--users", "20",
         "--rate", "10", "--port", str(base), "--seed", "3", "--duration", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    bridge = None
    try:
        wait_for_line(legacy, "legacy network up")
        bridge = subprocess.Popen(
            [*BRIDGECTL, "bridge", "run", "--dsn", db_dsn, "--metrics-port", "0",
             "--legacy", f"127.0.0.1:{base + SUPERNODES}", "--worker-id", "tcp-test"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        up = wait_for_line(bridge, r"metrics on http://127\.0\.0\.1:(\d+)")
        # every server binds loopback unless told otherwise
        assert listening(legacy.pid) == [("127.0.0.1", base + i)
                                         for i in range(SUPERNODES + 1)]  # + login server
        assert listening(bridge.pid) == [("127.0.0.1", int(up.group(1)))]
        # what the worker allocated to start lives as long as it: frozen out of the
        # collector's full collections (their walks were the lag's p99)
        with urllib.request.urlopen(f"http://127.0.0.1:{up.group(1)}/metrics") as r:
            frozen = re.search(r"^bridge_gc_frozen_objects (\S+)$", r.read().decode(), re.M)
        assert frozen is not None and float(frozen.group(1)) > 10_000
        count = "SELECT count(*) FROM messages WHERE origin = 'legacy'"
        wait_for(lambda: conn.execute(count).fetchone()[0] >= 10)
        # a linked account moves to dual and posts on the cloud side of a mirrored chat
        cid, sender = conn.execute(
            "SELECT m.conversation_id, m.sender_account_id FROM messages m "
            "ORDER BY m.seq LIMIT 1").fetchone()
        with conn.transaction():
            accounts_store.set_phase(conn, sender, "dual")
        with conn.transaction():
            message, _ = messages_store.post_message(conn, cid, sender, "tcp-1", "from the cloud",
                                                     int(time.time() * 1000))
        wait_for(lambda: conn.execute("SELECT state FROM outbox_to_legacy").fetchall()
                 == [("done",)], timeout=20)
        assert conn.execute("SELECT legacy_guid FROM messages WHERE message_id = %s",
                            (message.message_id,)).fetchone() == (f"cloud:{message.message_id}",)
        # the injected message came back on the feed and was not mirrored again
        time.sleep(1.0)
        assert conn.execute("SELECT count(*) FROM messages WHERE body = 'from the cloud'"
                            ).fetchone()[0] == 1
        bridge.send_signal(signal.SIGTERM)
        out, err = bridge.communicate(timeout=30)
        assert bridge.returncode == 0, err
        assert re.search(r"mirrored_to_legacy\s+1\b", out), out
        row = conn.execute("SELECT state, feeds FROM bridge_workers "
                           "WHERE worker_id = 'tcp-test'").fetchone()
        assert row[0] == "stopped"
    finally:
        for proc in (bridge, legacy):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
