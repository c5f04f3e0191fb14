"""``--log-format json`` on the long-running commands: every stderr line is one JSON object
(Twisted's jsonFileLogObserver), the operator's announcements and a failure's error line
included; the default stays text. Real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from drills.ports import free_port_range

BRIDGECTL = [sys.executable, "-m", "bridgectl.main"]


def json_lines(stderr: str) -> list[dict]:
    """Every line of *stderr*, each parsed as JSON (fails the test on a line that is not)."""
    lines = stderr.splitlines()
    assert lines, "nothing was logged"
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{stderr}") from None
    return events


def legacy_run(home, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BRIDGECTL, "legacy", "run", "--supernodes", "2", "--users", "3", "--rate", "2",
         "--duration", "2", "--json", *extra], capture_output=True, text=True, timeout=90,
        env={"BRIDGE_HOME": str(home), "PATH": "/usr/bin:/bin"})


def test_legacy_run_logs_one_json_object_per_line(tmp_path):
    base = free_port_range(3)
    done = legacy_run(tmp_path, "--port", str(base), "--metrics-port", "0",
                      "--log-format", "json")
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    texts = [e["text"] for e in events]
    assert any(t.startswith(f"legacy network up: login server 127.0.0.1:{base + 2}")
               for t in texts), texts
    assert any(t.startswith("legacy network metrics on http://127.0.0.1:") for t in texts)
    assert all(e["log_namespace"] and e["log_level"]["name"] for e in events)
    assert json.loads(done.stdout)["supernodes"] == 2  # the summary stays on stdout


def test_the_default_stays_text(tmp_path):
    base = free_port_range(3)
    done = legacy_run(tmp_path, "--port", str(base))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0].startswith("legacy network up: login server")


def test_a_failed_run_says_why_in_json_too(tmp_path):
    """A port in use: exit 1, and the error line is a JSON event at level error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = legacy_run(tmp_path, "--supernodes", "1", "--port", str(free_port_range(1)),
                          "--login-port", str(port), "--log-format", "json")
    assert done.returncode == 1
    last = json_lines(done.stderr)[-1]
    assert last["log_level"]["name"] == "error" and "Traceback" not in done.stderr
    assert last["text"].startswith("bridgectl: error: ") and str(port) in last["text"]


def test_standard_library_warnings_become_json_events(tmp_path):
    """psycopg_pool warns through ``logging``: with JSON logs those lines are JSON too."""
    code = ("import logging; from bridgectl import runtime; runtime.log_to_stderr('json'); "
            "logging.getLogger('psycopg.pool').warning('error connecting in %r', 'pool-1'); "
            "logging.getLogger('psycopg.pool').info('not shown')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    [event] = json_lines(done.stderr)
    assert event["log_namespace"] == "psycopg.pool" and event["log_level"]["name"] == "warn"
    assert event["text"] == "error connecting in 'pool-1'"


def test_cloud_run_logs_json(db_dsn, tmp_path):
    done = subprocess.run(
        [*BRIDGECTL, "cloud", "run", "--dsn", db_dsn, "--port", "0", "--duration", "1",
         "--log-format", "json"], capture_output=True, text=True, timeout=90,
        env={"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert any(e["text"].startswith("cloud API on http://127.0.0.1:")
               for e in json_lines(done.stderr))
