"""bridgectl cloud run and cloud clients as real processes over loopback TCP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.processes import wait_for_line
from tests.sockets import listening

BRIDGECTL = [sys.executable, "-m", "bridgectl.main"]


def start_cloud(dsn: str, home, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*BRIDGECTL, "cloud", "run", "--dsn", dsn, "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"BRIDGE_HOME": str(home), "PATH": "/usr/bin:/bin"})
    try:
        return proc, wait_for_line(proc, r"cloud API on (http://127\.0\.0\.1:\d+)/v1").group(1)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise


def run_clients(db_dsn: str, url: str, home) -> dict:
    """``cloud clients`` against *url*: 12 devices in 6 conversations posting for 3 s, then
    3 s to settle; its JSON summary (exit 0 asserted)."""
    out = subprocess.run(
        [*BRIDGECTL, "cloud", "clients", "--dsn", db_dsn, "--api", url, "--users", "12",
         "--conversations", "6", "--rate", "15", "--duration", "3", "--settle", "3",
         "--seed", "5", "--json"],
        capture_output=True, text=True, timeout=60, env={"BRIDGE_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_clients_posts_all_land_and_every_notification_is_acknowledged(conn, db_dsn, tmp_path):
    """Devices post over HTTP; every acknowledged post is stored once; all pushes are acked."""
    proc, url = start_cloud(db_dsn, tmp_path, "--push-latency", "0.01")
    try:
        assert listening(proc.pid) == [("127.0.0.1", int(url.rsplit(":", 1)[1]))]  # default bind
        summary = run_clients(db_dsn, url, tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert summary["logins"] == 12 and summary["posted"] > 10 and summary["post_errors"] == 0
    stored = conn.execute("SELECT count(*), count(DISTINCT client_message_id) FROM messages "
                          "WHERE origin = 'cloud'").fetchone()
    assert stored == (summary["posted"], summary["posted"])
    states = dict(conn.execute("SELECT state, count(*) FROM notifications GROUP BY 1").fetchall())
    assert states == {"acked": summary["notifications_acked"]} and summary["errors"] == {}


def test_cloud_run_refuses_a_database_without_the_schema(db_server, tmp_path):
    """Against an un-migrated database cloud run exits 1 saying to run db upgrade."""
    import uuid

    import psycopg

    from tests.dbfixture import _with_dbname
    name = f"bridge_noschema_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        out = subprocess.run([*BRIDGECTL, "cloud", "run", "--dsn", _with_dbname(db_server, name),
                              "--port", "0", "--duration", "1"], capture_output=True, text=True,
                             timeout=60, env={"BRIDGE_HOME": str(tmp_path)})
    finally:
        with psycopg.connect(db_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert out.returncode == 1
    assert "bridgectl db upgrade" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv,needle", [
    (["cloud", "run", "--push-loss", "1.5"], "not a fraction"),
    (["cloud", "run", "--duration", "-1"], "--duration must be positive"),
    (["cloud", "run", "--token-ttl", "4"], "4 is not within 5..86400 seconds"),
    (["cloud", "run", "--token-ttl", "86401"], "not within 5..86400 seconds"),
    (["cloud", "run", "--token-ttl", "1h"], "'1h' is not an integer"),
    (["cloud", "clients", "--duration", "5", "--users", "1"], "--users must be between"),
    (["cloud", "clients", "--duration", "5", "--api", "ftp://x"], "--api must be"),
])
def test_cloud_commands_reject_bad_values_clearly(argv, needle, tmp_path):
    """Out-of-range values exit 2 with one clear line and no traceback."""
    out = subprocess.run([*BRIDGECTL, *argv], capture_output=True, text=True, timeout=60,
                         env={"BRIDGE_HOME": str(tmp_path), "BRIDGE_DSN": "dbname=none"})
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_cloud_run_on_a_port_in_use_exits_1_promptly(db_dsn, tmp_path):
    """A port in use is one line and exit 1, after the database pool has closed (the
    process does not hang on the pool's thread)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([*BRIDGECTL, "cloud", "run", "--dsn", db_dsn, "--port", str(port)],
                             capture_output=True, text=True, timeout=60,
                             env={"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert f"bridgectl: error: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def post_login(url: str, login: str) -> tuple[int, dict[str, str]]:
    """POST a wrong password for *login* to *url*/v1/login: (status, headers)."""
    request = urllib.request.Request(
        f"{url}/v1/login", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"handle": login, "password": "wrong"}).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_two_cloud_runs_on_one_store_share_the_login_budget(conn, db_dsn, tmp_path):
    """The failed-login budget is the deployment's: five failures through each of two
    `cloud run` processes spend it, and the next try at either is 429 with Retry-After."""
    first, first_url = start_cloud(db_dsn, tmp_path)
    second, second_url = start_cloud(db_dsn, tmp_path)
    try:
        statuses = [post_login(url, "mallory")[0]
                    for _ in range(5) for url in (first_url, second_url)]
        assert statuses == [401] * 10
        for url in (first_url, second_url):
            status, headers = post_login(url, "mallory")
            assert status == 429 and int(headers["Retry-After"]) >= 1
        assert conn.execute("SELECT count(*) FROM login_buckets WHERE key = 'name:mallory'"
                            ).fetchone()[0] == 1
    finally:
        for proc in (first, second):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def _read_head(sock_file) -> tuple[bytes, dict[bytes, bytes]]:
    """(status line, headers) of the next response on a connection's file."""
    status = sock_file.readline()
    headers = {}
    while (line := sock_file.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def test_responses_go_out_whole_and_in_order_on_one_connection(db_dsn, tmp_path):
    """The API's connection (cloud/http_channel.py) sends each answer at once: pipelined
    requests on one keep-alive connection get complete answers in order, a HEAD its head
    only, a large file all its bytes."""
    proc, url = start_cloud(db_dsn, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            host = f"Host: 127.0.0.1:{port}\r\n".encode()
            s.sendall(b"GET /v1/healthz HTTP/1.1\r\n" + host + b"\r\n"
                      + b"HEAD /metrics HTTP/1.1\r\n" + host + b"\r\n"
                      + b"GET /v1/nowhere HTTP/1.1\r\n" + host + b"\r\n"
                      + b"GET /app.js HTTP/1.1\r\n" + host + b"\r\n")
            f = s.makefile("rb")
            answers = []
            for method in ("GET", "HEAD", "GET", "GET"):
                status, headers = _read_head(f)
                length = int(headers.get(b"content-length", b"0"))
                body = f.read(length) if method == "GET" else b""
                answers.append((status.split()[1], headers, body))
        (ok, _, health), (head, head_headers, _), (missing, _, error), (js, _, app) = answers
        assert (ok, json.loads(health)) == (b"200", {"ok": True})
        assert head == b"200" and int(head_headers[b"content-length"]) > 0
        assert missing == b"404" and json.loads(error)["error"]["code"] == "not_found"
        source = Path(__file__).parents[2] / "cloud" / "webclient" / "app.js"
        assert js == b"200" and app == source.read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
