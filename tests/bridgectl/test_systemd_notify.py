"""The long-running commands under a ``Type=notify`` unit with ``WatchdogSec=``: real
processes, a real unix datagram socket standing in for systemd's (``$NOTIFY_SOCKET``).

    legacy run, bridge run, cloud run   READY=1 once serving, WATCHDOG=1 every
                                        WATCHDOG_USEC / 2, STOPPING=1 on SIGTERM, exit 0
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from drills.ports import free_port_range
from tests.processes import wait_for_line

BRIDGECTL = [sys.executable, "-m", "bridgectl.main"]
#: 0.4 s: the commands ping every 0.2 s
WATCHDOG_USEC = "400000"


class FakeSystemd:
    """The service manager's end of $NOTIFY_SOCKET: collects every datagram as it comes, as
    systemd does (a reader that waited would let the socket's queue fill, ten datagrams on
    Linux, two seconds of pings, and the sender's STOPPING=1 would be dropped)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.received: list[str] = []
        self.error: Exception | None = None  # why the reader stopped early, if it did
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        while not self._closed.is_set():
            try:
                self.received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
            except (OSError, UnicodeDecodeError) as e:  # what wait_for then reports
                self.error = e
                return

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()

    def read(self) -> list[str]:
        time.sleep(0.05)
        return list(self.received)

    def wait_for(self, line: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(line in m.split("\n") for m in self.read()) >= count:
                return
            if self.error is not None:
                raise AssertionError(f"reading the notify socket failed: {self.error!r}")
        raise AssertionError(f"{line} x{count} never arrived: {self.received}")

    def env(self, home) -> dict[str, str]:
        return {"BRIDGE_HOME": str(home), "PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": self.path,
                "WATCHDOG_USEC": WATCHDOG_USEC}


@pytest.fixture
def systemd() -> Iterator:
    """A FakeSystemd per call, each on its own socket in a short directory (a unix socket's
    path has at most 107 bytes)."""
    directory = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    made: list[FakeSystemd] = []

    def make(name: str) -> FakeSystemd:
        made.append(FakeSystemd(os.path.join(directory, name)))
        return made[-1]

    yield make
    for s in made:
        s.close()
    shutil.rmtree(directory, ignore_errors=True)


def assert_notified_in_order(fake: FakeSystemd) -> None:
    """READY first (with a status), pings after it, STOPPING last, pings not after it."""
    lines = [m.split("\n")[0] for m in fake.received]
    assert lines[0] == "READY=1" and fake.received[0].split("\n")[1].startswith("STATUS=")
    assert lines[-1] == "STOPPING=1"
    assert set(lines[1:-1]) == {"WATCHDOG=1"}


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_legacy_and_bridge_run_say_ready_ping_the_watchdog_and_say_stopping(
        systemd, conn, db_dsn, tmp_path):
    """Each process says READY=1 once serving, then WATCHDOG=1 every 0.2 s (half of
    WATCHDOG_USEC), and STOPPING=1 when SIGTERM starts its drain."""
    legacy_sd, bridge_sd = systemd("legacy"), systemd("bridge")
    base = free_port_range(3)
    legacy = subprocess.Popen(
        [*BRIDGECTL, "legacy", "run", "--supernodes", "2", "--users", "6", "--rate", "2",
         "--port", str(base)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=legacy_sd.env(tmp_path))
    bridge = None
    try:
        wait_for_line(legacy, "legacy network up")
        legacy_sd.wait_for("READY=1")
        bridge = subprocess.Popen(
            [*BRIDGECTL, "bridge", "run", "--dsn", db_dsn, "--metrics-port", "0",
             "--legacy", f"127.0.0.1:{base + 2}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=bridge_sd.env(tmp_path))
        wait_for_line(bridge, r"metrics on")
        bridge_sd.wait_for("READY=1")
        assert "bridge worker" in bridge_sd.received[0]
        bridge_sd.wait_for("WATCHDOG=1", count=3)
        legacy_sd.wait_for("WATCHDOG=1", count=3)
        stop(bridge)
        bridge_sd.wait_for("STOPPING=1")
    finally:
        if bridge is not None and bridge.poll() is None:
            bridge.kill()
        stop(legacy)
    legacy_sd.wait_for("STOPPING=1")
    assert_notified_in_order(bridge_sd)
    assert_notified_in_order(legacy_sd)


def notified_cloud_run(fake: FakeSystemd, db_dsn: str, home, *flags: str) -> None:
    """``cloud run *flags*`` under *fake*: READY=1 once it listens, three pings, then
    SIGTERM and STOPPING=1, in that order."""
    proc = subprocess.Popen([*BRIDGECTL, "cloud", "run", "--dsn", db_dsn, "--port", "0",
                             *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=fake.env(home))
    try:
        wait_for_line(proc, "cloud API on")
        fake.wait_for("READY=1")
        fake.wait_for("WATCHDOG=1", count=3)
    finally:
        stop(proc)
    fake.wait_for("STOPPING=1")
    assert_notified_in_order(fake)


def test_cloud_run_says_ready_pings_and_says_stopping(systemd, db_dsn, tmp_path):
    """cloud run: READY=1 once it listens, pings while the dispatcher is not stuck,
    STOPPING=1 on SIGTERM."""
    fake = systemd("cloud")
    notified_cloud_run(fake, db_dsn, tmp_path)
    assert "cloud API on 127.0.0.1:" in fake.received[0]


def test_without_notify_socket_the_commands_run_as_before(db_dsn, tmp_path):
    """No $NOTIFY_SOCKET (Type=simple, or a shell): cloud run serves and stops as always."""
    proc = subprocess.Popen([*BRIDGECTL, "cloud", "run", "--dsn", db_dsn, "--port", "0",
                             "--duration", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
                                 "WATCHDOG_USEC": WATCHDOG_USEC})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "cloud API on" in err and "systemd" not in err


@pytest.mark.processes
def test_cloud_run_with_processes_notifies_for_all_its_workers(systemd, db_dsn, tmp_path):
    """cloud run --processes 2: the parent alone talks to systemd (the workers notify it),
    READY=1 once both workers serve, pings, STOPPING=1 on SIGTERM, which stops all."""
    fake = systemd("cloudn")
    notified_cloud_run(fake, db_dsn, tmp_path, "--processes", "2")
    assert "2 processes" in fake.received[0]
    assert sum("READY=1" in m.split("\n") for m in fake.received) == 1
