"""``cloud run --processes N`` as real processes: one port served by every worker, a killed
worker restarted, notifications pushed once by the one dispatcher, SIGTERM stops them all."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid

import pytest

from cloud.workload import provision
from tests.bridge.test_bridge_tcp import wait_for
from tests.bridgectl.test_cloud_run import BRIDGECTL, run_clients

#: Seconds SIGTERM to the parent may take to stop it and its workers (theirs is 20 s).
STOP_BOUND_S = 30


def _request(conn: http.client.HTTPConnection, method: str, path: str,
             body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def _which_worker(port: int) -> tuple[int, int]:
    """(worker index, pid) that a fresh connection's /v1/healthz reached."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        status, body = _request(conn, "GET", "/v1/healthz")
        assert status == 200
        return body["worker"], body["pid"]
    finally:
        conn.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_processes(dsn: str, home, *extra: str) -> tuple[subprocess.Popen, str, list[str]]:
    """``cloud run --port 0`` with *extra*; its URL, and its stderr lines (its workers
    write there too), read all along so that the pipe never fills."""
    proc = subprocess.Popen(
        [*BRIDGECTL, "cloud", "run", "--dsn", dsn, "--port", "0", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={"BRIDGE_HOME": str(home), "PATH": "/usr/bin:/bin"})
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
    threading.Thread(target=read, daemon=True).start()

    def started() -> str | None:
        for line in list(lines):
            match = re.search(r"cloud API on (http://127\.0\.0\.1:\d+)/v1", line)
            if match:
                return match.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"cloud run exited: {''.join(lines)}")
        return None
    try:
        return proc, wait_for(started, timeout=60, every=0.05), lines
    except AssertionError:
        proc.kill()
        raise


@pytest.mark.processes
def test_two_processes_share_one_port_and_a_killed_worker_is_restarted(conn, db_dsn, tmp_path):
    """Posts are served by both workers on one port; after SIGKILL of one worker the port
    still answers, the worker comes back with a new pid; SIGTERM stops every process."""
    population = provision(conn, users=2, conversations=1, seed=3, prefix="procs")
    (handle, _), _ = population.accounts
    cid = population.conversations[0][0]
    proc, url, log = start_processes(db_dsn, tmp_path, "--processes", "2")
    port = int(url.rsplit(":", 1)[1])
    try:
        served: dict[int, int] = {}  # worker index -> posts it answered
        pids: dict[int, int] = {}
        for n in range(200):  # fresh connections until both workers have served a post
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                _, health = _request(c, "GET", "/v1/healthz")
                status, login = _request(c, "POST", "/v1/login",
                                         {"handle": handle, "password": population.password})
                assert status == 200
                status, posted = _request(
                    c, "POST", f"/v1/conversations/{cid}/messages",
                    {"client_message_id": f"procs-{n}", "body": "hello"}, login["token"])
                assert status == 201, posted
            finally:
                c.close()
            served[health["worker"]] = served.get(health["worker"], 0) + 1
            pids[health["worker"]] = health["pid"]
            if len(served) == 2:
                break
        assert set(served) == {0, 1}, served
        stored = conn.execute("SELECT count(*) FROM messages WHERE conversation_id = %s",
                              (cid,)).fetchone()[0]
        assert stored == sum(served.values())
        assert sum("with the notification dispatcher" in line for line in log) == 1

        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: not _alive(pids[1]), timeout=10, every=0.05)
        # the shared socket is still served, by worker 0, while worker 1 restarts
        assert {_which_worker(port)[0] for _ in range(10)} <= {0, 1}
        restarted = wait_for(lambda: next((pid for w, pid in (_which_worker(port)
                                                             for _ in range(10))
                                           if w == 1 and pid != pids[1]), None), timeout=30)
        assert restarted != pids[1] and _alive(restarted)
        assert any("cloud worker 1" in line and "restarting it in" in line for line in log)
        workers = [pids[0], restarted]
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_BOUND_S)
    assert code == 0 and time.monotonic() - started < STOP_BOUND_S
    wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=5, every=0.05)


@pytest.mark.processes
def test_notifications_are_pushed_once_with_two_processes(conn, db_dsn, tmp_path):
    """Devices long-poll and acknowledge through either worker; worker 0's dispatcher
    pushes each notification exactly once (no resend, no second dispatcher) and all are
    acknowledged."""
    proc, url, log = start_processes(db_dsn, tmp_path, "--processes", "2",
                                     "--push-latency", "0.01")
    try:
        summary = run_clients(db_dsn, url, tmp_path)
        conn_ = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
        conn_.request("GET", "/metrics")
        metrics = conn_.getresponse().read().decode()
        conn_.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_BOUND_S) == 0
    assert summary["posted"] > 10 and summary["post_errors"] == 0 and summary["errors"] == {}
    states = dict(conn.execute("SELECT state, count(*) FROM notifications GROUP BY 1").fetchall())
    assert states == {"acked": summary["notifications_acked"]}
    assert conn.execute("SELECT count(*) FROM notifications WHERE attempts <> 1"
                        ).fetchone()[0] == 0
    # /metrics aggregates the workers: pushes counted once each, posts of both workers
    pushed = float(re.search(r"^cloud_notifications_pushed_total ([\d.e+]+)$", metrics,
                             re.M).group(1))
    assert pushed == summary["notifications_acked"]
    assert sum("with the notification dispatcher" in line for line in log) == 1


@pytest.mark.parametrize("value,needle", [
    ("0", "0 is not within 1..64"),
    ("-1", "-1 is not within 1..64"),
    ("65", "65 is not within 1..64"),
    ("1000000", "1000000 is not within 1..64"),
    ("two", "'two' is not an integer"),
    ("1.5", "'1.5' is not an integer"),
])
def test_cloud_run_rejects_bad_process_counts(value, needle, tmp_path):
    """A bad --processes exits 2 with one clear line and no traceback."""
    out = subprocess.run([*BRIDGECTL, "cloud", "run", "--processes", value],
                         capture_output=True, text=True, timeout=60,
                         env={"BRIDGE_HOME": str(tmp_path), "BRIDGE_DSN": "dbname=none"})
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_concurrent_claims_take_disjoint_notifications(conn, db_dsn):
    """Two dispatchers claiming at once (two transactions) never take the same row: the
    store's claim skips locked rows and reschedules what it takes. (The deployment still
    runs one dispatcher, worker 0's; this is why a second one would be safe.)"""
    import psycopg

    from cloud.store import notifications as notifications_store

    account, conversation = uuid.uuid4(), uuid.uuid4()
    with conn.transaction():
        for seq in range(1, 41):
            conn.execute(
                "INSERT INTO notifications (account_id, notification_id, conversation_id, "
                "message_id, seq, state, attempts, next_attempt_ms, created_ms) "
                "VALUES (%s, %s, %s, %s, %s, 'pending', 0, 0, 0)",
                (account, uuid.uuid4(), conversation, uuid.uuid4(), seq))
    with psycopg.connect(db_dsn) as a, psycopg.connect(db_dsn) as b:
        first, _ = notifications_store.claim_due_notifications(a, 1000, 25, 10_000, 5)
        second, _ = notifications_store.claim_due_notifications(b, 1000, 25, 10_000, 5)
        a.commit()
        b.commit()
    ids = [n.notification_id for n in first + second]
    assert len(first) == 25 and len(second) == 15 and len(set(ids)) == 40
    # and once taken, nothing is due again before the resend time
    assert notifications_store.claim_due_notifications(conn, 1000, 100, 10_000, 5) == ([], [])


@pytest.mark.processes
def test_workers_stop_when_their_parent_is_killed(db_dsn, tmp_path):
    """A parent killed with SIGKILL (no chance to stop them) leaves no worker running."""
    proc, url, _ = start_processes(db_dsn, tmp_path, "--processes", "2")
    port = int(url.rsplit(":", 1)[1])
    pids: dict[int, int] = {}
    for _ in range(200):
        index, pid = _which_worker(port)
        pids[index] = pid
        if len(pids) == 2:
            break
    assert set(pids) == {0, 1}
    proc.kill()
    proc.wait(timeout=10)
    wait_for(lambda: not any(_alive(pid) for pid in pids.values()), timeout=40, every=0.2)


def test_processes_on_a_port_in_use_exit_1_before_any_worker_starts(db_dsn, tmp_path):
    """The parent binds once: a port in use is one line and exit 1, no worker started."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([*BRIDGECTL, "cloud", "run", "--dsn", db_dsn, "--port", str(port),
                              "--processes", "2"], capture_output=True, text=True, timeout=60,
                             env={"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert f"bridgectl: error: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr and "cloud worker" not in out.stderr
