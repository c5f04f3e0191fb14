"""servicekit.sdnotify: systemd's notifications reach a real unix datagram socket (a path
or an abstract one), the watchdog pings on the injected clock only while healthy, and
without $NOTIFY_SOCKET nothing is sent and nothing fails."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from servicekit.sdnotify import (
    Notifier,
    SystemdLink,
    Watchdog,
    socket_address,
    watchdog_interval_s,
)


class Receiver:
    """systemd's end: a bound unix datagram socket that collects what arrives."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: a unix socket's path has at most 107 bytes."""
    path = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir) -> Iterator[tuple[Receiver, str]]:
    path = os.path.join(short_dir, "notify")
    r = Receiver(path)
    yield r, path
    r.close()


def test_a_notification_is_one_datagram_of_assignments(receiver):
    """READY=1 and a STATUS line arrive together at the socket NOTIFY_SOCKET names."""
    r, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.notify("READY=1", "STATUS=serving")
    assert r.messages() == ["READY=1\nSTATUS=serving"]


def test_an_abstract_socket_is_named_with_an_at_sign():
    """NOTIFY_SOCKET=@name is the abstract socket \\0name (no file anywhere)."""
    name = f"bridge-test-{secrets.token_hex(6)}"
    r = Receiver(b"\0" + name.encode())
    try:
        assert socket_address("@" + name) == b"\0" + name.encode()
        assert Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")
        assert r.messages() == ["WATCHDOG=1"]
    finally:
        r.close()


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_without_a_usable_notify_socket_nothing_is_sent_and_nothing_fails(value):
    """Not under systemd (or an address kind it does not speak): notify is a no-op, the
    link neither sends nor starts a watchdog."""
    environ = {} if value is None else {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"}
    notifier = Notifier.from_environment(environ)
    assert not notifier.enabled and notifier.notify("READY=1") is False
    link = SystemdLink.from_environment(Clock(), environ, os.getpid())
    link.ready("serving")
    link.stopping()
    assert link.watchdog is None


def test_a_socket_nobody_listens_on_is_logged_once_and_never_raises(short_dir):
    """systemd gone (the path exists no more): notify returns False, the service goes on,
    and the log says so once, not at every ping."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        notifier = Notifier(os.path.join(short_dir, "gone"))
        assert notifier.notify("WATCHDOG=1") is False
        assert notifier.notify("WATCHDOG=1") is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(e) for e in events if e.get("log_namespace") == "servicekit.sdnotify"]
    assert len(said) == 1 and "cannot notify systemd" in said[0]


def test_a_full_socket_queue_drops_the_datagram_instead_of_blocking(receiver):
    """A receiver that reads nothing fills its queue; sends then fail at once (the reactor
    thread never waits on systemd) and the earlier ones are all there."""
    r, path = receiver
    notifier = Notifier(path)
    started = time.monotonic()
    sent = [notifier.notify("WATCHDOG=1") for _ in range(5000)]
    assert time.monotonic() - started < 10
    assert False in sent and sent[0] is True
    assert len(r.messages()) == sent.count(True)


@pytest.mark.parametrize("environ, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),  # this process: 4242
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_the_watchdog_interval_is_half_of_watchdog_usec(environ, expected):
    """Ping at half the timeout, and only in the process the watchdog is meant for."""
    assert watchdog_interval_s(environ, 4242) == expected


def test_the_watchdog_pings_on_the_clock_only_while_healthy(receiver):
    """A ping at once and every interval; a sick check withholds them (systemd restarts
    the service once WatchdogSec passes), a healthy one resumes them; a failing check
    counts as sick."""
    r, path = receiver
    clock, state = Clock(), {"why": None}

    def check() -> str | None:
        if state["why"] == "raise":
            raise RuntimeError("check broke")
        return state["why"]

    dog = Watchdog(clock, Notifier(path), 15.0, check)
    dog.startService()
    clock.advance(15)
    clock.advance(15)
    assert r.messages() == ["WATCHDOG=1"] * 3 and dog.pings == 3
    state["why"] = "no heartbeat has finished for 40 s"
    clock.advance(15)
    clock.advance(15)
    assert r.messages() == [] and dog.withheld == 2 and dog.sick == state["why"]
    state["why"] = "raise"
    clock.advance(15)
    assert r.messages() == [] and dog.sick == "the health check failed"
    state["why"] = None
    clock.advance(15)
    assert r.messages() == ["WATCHDOG=1"] and dog.sick is None
    dog.stopService()
    clock.advance(60)
    assert r.messages() == [] and clock.getDelayedCalls() == []


def test_the_link_says_ready_then_pings_then_stopping(receiver):
    """ready(): READY=1 with the status, the watchdog from then on; stopping(): the pings
    stop and STOPPING=1 follows, once (a second stopping() sends nothing)."""
    r, path = receiver
    clock = Clock()
    link = SystemdLink.from_environment(
        clock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, os.getpid())
    clock.advance(5)
    assert r.messages() == []  # nothing before ready
    link.ready("worker w1:\nserving")
    assert r.messages() == ["READY=1\nSTATUS=worker w1: serving", "WATCHDOG=1"]
    clock.advance(1.0)
    assert r.messages() == ["WATCHDOG=1"]
    link.stopping("draining")
    clock.advance(10)
    assert r.messages() == ["STOPPING=1\nSTATUS=draining"]
    link.stopping()
    assert r.messages() == []


def test_without_watchdog_usec_the_link_only_says_ready_and_stopping(receiver):
    """Type=notify without WatchdogSec=: READY and STOPPING, no pings."""
    r, path = receiver
    clock = Clock()
    link = SystemdLink.from_environment(clock, {"NOTIFY_SOCKET": path}, os.getpid())
    link.ready("up")
    clock.advance(100)
    link.stopping()
    assert r.messages() == ["READY=1\nSTATUS=up", "STOPPING=1\nSTATUS=stopping"]
