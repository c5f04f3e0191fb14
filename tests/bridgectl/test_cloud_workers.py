"""The supervisor of ``cloud run --processes N`` (bridgectl/cloud_workers.py) on a test clock,
with a reactor that records the processes it is asked to start and signal."""

from __future__ import annotations

import os
import random
import shutil
import socket

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from bridgectl.cloud_workers import LISTEN_FD, WORKER_ENV, WorkerRole, WorkerSupervisor


class FakeProcess:
    """A spawned worker: its pid, and the signals it was sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.ended = False

    def signalProcess(self, name: str) -> None:  # noqa: N802 - Twisted's name
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(name)


class ProcessReactor(Clock):
    """A Clock that records spawnProcess calls and hands out fake datagram ports."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []  # (protocol, process, env, childFDs)
        self._pid = 1000

    def spawnProcess(self, protocol, executable, args, env, childFDs):  # noqa: N802, N803
        self._pid += 1
        process = FakeProcess(self._pid)
        protocol.makeConnection(process)
        self.spawned.append((protocol, process, env, childFDs))
        return process

    def listenUNIXDatagram(self, path, protocol):  # noqa: N802 - Twisted's name
        class Port:
            def stopListening(self) -> None:
                pass
        return Port()

    def end(self, index: int, *, signal: int | None = 9) -> None:
        """The live worker *index* exits (killed by *signal*, or exit code 0)."""
        protocol, process, _, _ = self.live(index)
        process.ended = True
        reason = error.ProcessTerminated(signal=signal) if signal else error.ProcessDone(0)
        protocol.processEnded(Failure(reason))

    def live(self, index: int) -> tuple:
        return [s for s in self.spawned
                if s[0].index == index and not s[1].ended][-1]


@pytest.fixture
def scene():
    reactor = ProcessReactor()
    sock = socket.socket()
    supervisor = WorkerSupervisor(reactor, ["python", "-m", "bridgectl.main"], {"A": "1"},
                                  sock, 2, random.Random(1), stop_timeout_s=20.0,
                                  watchdog_s=8.0)
    supervisor.startService()
    yield reactor, supervisor
    if supervisor.running:
        for _, process, _, _ in reactor.spawned:
            process.ended = True
        supervisor.stopService()
    shutil.rmtree(supervisor.runtime_dir, ignore_errors=True)
    sock.close()


def test_workers_get_the_socket_their_role_and_their_own_notify_socket(scene):
    """Each worker: the shared socket as fd 3, its index, the relay directory, and a notify
    socket of its own that the parent reads (not systemd's)."""
    reactor, supervisor = scene
    roles = []
    for _, _, env, fds in reactor.spawned:
        assert fds[LISTEN_FD] == supervisor._socket.fileno() and fds[1] == 1 and fds[2] == 2
        role = WorkerRole.from_environment(env)
        roles.append(role.index)
        assert role.processes == 2 and role.runtime_dir == supervisor.runtime_dir
        assert env["NOTIFY_SOCKET"] == os.path.join(supervisor.runtime_dir,
                                                    f"notify-{role.index}.sock")
        assert env["PROMETHEUS_MULTIPROC_DIR"] == supervisor.metrics_dir
        assert env["A"] == "1" and WORKER_ENV in env
    assert roles == [0, 1]
    assert WorkerRole(0, 2, "/x").runs_dispatcher and not WorkerRole(1, 2, "/x").runs_dispatcher


def test_ready_once_every_worker_says_so(scene):
    """all_ready fires after both workers' READY=1, not after one."""
    reactor, supervisor = scene
    supervisor._notified(1, ["READY=1", "STATUS=x"])
    assert not supervisor.all_ready.called
    assert supervisor.down_too_long() is None
    reactor.advance(121)
    assert "cloud worker 0" in supervisor.down_too_long()
    supervisor._notified(0, ["READY=1"])
    assert supervisor.all_ready.called and supervisor.down_too_long() is None


def test_a_dead_worker_is_restarted_with_a_growing_capped_delay(scene):
    """Restarts wait 0.8-1 s, then 1.6-2 s, ... at most 30 s; the other worker is left
    alone; a worker that ran 60 s starts the backoff afresh."""
    reactor, supervisor = scene
    delays = []
    for _ in range(7):
        reactor.end(1)
        before = len(reactor.spawned)
        waited = 0.0
        while len(reactor.spawned) == before:
            reactor.advance(0.05)
            waited += 0.05
            assert waited < 31
        delays.append(waited)
    assert 0.8 <= delays[0] <= 1.05 and 1.6 <= delays[1] <= 2.05
    assert delays[:5] == sorted(delays[:5])
    assert all(24 <= d <= 30.05 for d in delays[5:])  # the cap, less up to 20% jitter
    assert supervisor.restarts == 7 and len(reactor.spawned) == 9
    assert reactor.live(0)[1].pid == reactor.spawned[0][1].pid  # worker 0 untouched
    reactor.advance(61)  # the new worker 1 runs long enough
    reactor.end(1)
    reactor.advance(1.05)
    assert len(reactor.spawned) == 10


def test_a_worker_that_stops_pinging_is_killed_and_restarted(scene):
    """A ready worker silent for longer than its watchdog gets SIGABRT once, SIGKILL if it
    is still there after the stop timeout, and once it has exited, a restart."""
    reactor, supervisor = scene
    for i in (0, 1):
        supervisor._notified(i, ["READY=1"])
    for _ in range(6):
        reactor.advance(2)
        supervisor._notified(0, ["WATCHDOG=1"])
    assert reactor.live(1)[1].signals == ["ABRT"] and reactor.live(0)[1].signals == []
    for _ in range(12):  # it does not exit: SIGKILL once the stop timeout has passed
        reactor.advance(2)
        supervisor._notified(0, ["WATCHDOG=1"])
    assert reactor.live(1)[1].signals[:2] == ["ABRT", "KILL"]
    reactor.end(1, signal=9)
    reactor.advance(1.05)
    assert len(reactor.spawned) == 3


def test_stop_terms_every_worker_and_kills_one_that_hangs(scene):
    """stopService: SIGTERM to all, SIGKILL to one still running after the stop timeout,
    fires once all have ended; nothing is restarted meanwhile."""
    reactor, supervisor = scene
    stopped = supervisor.stopService()
    assert [p.signals for _, p, _, _ in reactor.spawned] == [["TERM"], ["TERM"]]
    reactor.end(0, signal=None)
    reactor.advance(19)
    assert not stopped.called and reactor.live(1)[1].signals == ["TERM"]
    reactor.advance(1.5)
    assert reactor.live(1)[1].signals == ["TERM", "KILL"]
    reactor.end(1)
    reactor.advance(60)
    assert stopped.called and len(reactor.spawned) == 2
    assert not os.path.exists(supervisor.runtime_dir)
