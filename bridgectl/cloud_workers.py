"""``cloud run --processes N``: N API worker processes sharing one listening socket.

    parent (bridgectl cloud run --processes N)          systemd (Type=notify)
      binds HOST:PORT once, never accepts                   ^ READY=1 once every worker is,
      |                                                     | WATCHDOG=1 while none is long
      +-- spawnProcess(childFDs={3: socket}) x N            | down, STOPPING=1 on SIGTERM
      |      worker i: cloud run --processes 1 with $BRIDGE_CLOUD_WORKER
      |        reactor.adoptStreamPort(3): accepts on the shared socket
      |        its own pool, post batcher, notification channel
      |        worker 0 only: the notification dispatcher
      |        NOTIFY_SOCKET = the parent's notify-i.sock: READY=1, then WATCHDOG=1
      |
      +-- a worker that exits (or stops pinging) is restarted after a capped backoff
      +-- SIGTERM/SIGINT: SIGTERM to every worker; SIGKILL to those still running after
          STOP_TIMEOUT_S

Why one socket adopted by every worker rather than SO_REUSEPORT: the parent binds once, so
a port in use fails once before any worker starts and ``--port 0`` means one port; and the
kernel's accept queue belongs to the socket, not to a worker, so connections queued when a
worker dies are accepted by the others instead of being reset (with SO_REUSEPORT each
worker's socket has its own queue, dropped with it).

The parent only supervises: it touches neither the database nor HTTP.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from servicekit.retry import RetryPolicy

log = Logger()

#: The environment variable that makes ``cloud run`` a worker (JSON, see ``WorkerRole``).
WORKER_ENV = "BRIDGE_CLOUD_WORKER"
#: The listening socket's descriptor number in every worker.
LISTEN_FD = 3
#: Most worker processes: one per core is the useful range; far more is a typo.
MAX_PROCESSES = 64
#: A worker's watchdog (half of it between pings): a worker whose pings stop this long
#: (e.g. its dispatcher stuck in one pass) is killed and restarted.
WORKER_WATCHDOG_S = 90.0
#: Seconds the workers get to stop after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 20.0
#: Restarts back off from 1 s to at most 30 s; a worker that ran this long starts afresh.
RESTART_POLICY = RetryPolicy(initial_s=1.0, factor=2.0, cap_s=30.0, jitter=0.2)
STABLE_AFTER_S = 60.0
#: A worker down (not ready) this long withholds the parent's own watchdog ping.
DOWN_TOO_LONG_S = 120.0


@attrs.frozen
class WorkerRole:
    """What a worker process is told by its parent (``$BRIDGE_CLOUD_WORKER``)."""

    index: int
    processes: int
    #: the directory of the workers' channel relay sockets
    runtime_dir: str

    @property
    def runs_dispatcher(self) -> bool:
        """One dispatcher per deployment: worker 0's (see docs/operations.md)."""
        return self.index == 0

    def channel_socket(self, index: int) -> str:
        return os.path.join(self.runtime_dir, f"channel-{index}.sock")

    def to_env(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_environment(cls, environ: dict[str, str] | Any) -> WorkerRole | None:
        text = environ.get(WORKER_ENV)
        if not text:
            return None
        return cls(**json.loads(text))


def processes_count(text: str) -> int:
    """``--processes``: an integer from 1 to ``MAX_PROCESSES``."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= v <= MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"{text} is not within 1..{MAX_PROCESSES}")
    return v


def bind_shared_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """The listening socket every worker adopts; ``CannotListenError`` if taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise error.CannotListenError(host, port, e) from None
    sock.setblocking(False)  # the workers' reactors accept without blocking
    return sock


class _Worker(protocol.ProcessProtocol):
    """One worker process's lifecycle as the parent sees it."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor, self.index = supervisor, index
        self.pid: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.last_ping = 0.0
        #: when it was sent SIGABRT for want of pings (SIGKILL after the stop timeout)
        self.aborted_at: float | None = None
        self.ended: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.pid = self.transport.pid

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self.ended.callback(reason.value)
        self.supervisor._ended(self, reason.value)


class _NotifyFromWorker(protocol.DatagramProtocol):
    """The parent's end of worker *index*'s ``$NOTIFY_SOCKET``."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor, self.index = supervisor, index

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        self.supervisor._notified(self.index, data.decode("utf-8", "replace").split("\n"))


class WorkerSupervisor(Service):
    """Starts *processes* workers running *command* with the shared socket as fd 3, keeps
    them running, stops them on ``stopService``. ``all_ready`` fires once every worker has
    said READY=1 for the first time."""

    def __init__(self, reactor: Any, command: Sequence[str], environ: dict[str, str],
                 listen_socket: socket.socket, processes: int, rng: random.Random, *,
                 restart_policy: RetryPolicy = RESTART_POLICY,
                 stop_timeout_s: float = STOP_TIMEOUT_S,
                 watchdog_s: float = WORKER_WATCHDOG_S) -> None:
        self._reactor = reactor
        self._command = list(command)
        self._environ = dict(environ)
        self._socket = listen_socket
        self.processes = processes
        self._rng = rng
        self._policy = restart_policy
        self._stop_timeout_s = stop_timeout_s
        self._watchdog_s = watchdog_s
        self.runtime_dir = tempfile.mkdtemp(prefix="bridge-cloud-")
        self.metrics_dir = os.path.join(self.runtime_dir, "metrics")
        os.mkdir(self.metrics_dir)
        self.workers: dict[int, _Worker] = {}
        self._restarts: dict[int, int] = {}
        self._pending_restarts: dict[int, Any] = {}
        self._down_since: dict[int, float] = {}
        self._notify_ports: list[Any] = []
        self._watch: Any = None
        self._stopping = False
        #: restarts so far (for tests and the log)
        self.restarts = 0
        self.all_ready: defer.Deferred = defer.Deferred()

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        for i in range(self.processes):
            path = os.path.join(self.runtime_dir, f"notify-{i}.sock")
            self._notify_ports.append(
                self._reactor.listenUNIXDatagram(path, _NotifyFromWorker(self, i)))
            self._spawn(i)
        from twisted.internet import task

        self._watch = task.LoopingCall(self._check_pings)
        self._watch.clock = self._reactor
        self._watch.start(self._watchdog_s / 4, now=False)

    def _spawn(self, index: int) -> None:
        self._pending_restarts.pop(index, None)
        worker = _Worker(self, index)
        role = WorkerRole(index, self.processes, self.runtime_dir)
        env = {**self._environ, WORKER_ENV: role.to_env(),
               "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
               "BRIDGE_STOP_WITH_PARENT": str(os.getpid()),
               "NOTIFY_SOCKET": os.path.join(self.runtime_dir, f"notify-{index}.sock"),
               "WATCHDOG_USEC": str(int(self._watchdog_s * 1_000_000))}
        env.pop("WATCHDOG_PID", None)
        worker.started_at = worker.last_ping = self._reactor.seconds()
        self._down_since.setdefault(index, worker.started_at)
        self.workers[index] = worker
        self._reactor.spawnProcess(worker, self._command[0], self._command, env=env,
                                   childFDs={0: "w", 1: 1, 2: 2,
                                             LISTEN_FD: self._socket.fileno()})
        log.info("cloud worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _notified(self, index: int, assignments: list[str]) -> None:
        worker = self.workers.get(index)
        if worker is None:
            return
        now = self._reactor.seconds()
        if "READY=1" in assignments or "WATCHDOG=1" in assignments:
            worker.last_ping = now
        if "READY=1" in assignments and not worker.ready:
            worker.ready = True
            self._down_since.pop(index, None)
            if (not self.all_ready.called
                    and all(w.ready for w in self.workers.values())
                    and len(self.workers) == self.processes):
                self.all_ready.callback(None)

    def _check_pings(self) -> None:
        """Kill a worker whose watchdog pings stopped (it is then restarted)."""
        now = self._reactor.seconds()
        for worker in list(self.workers.values()):
            if worker.aborted_at is not None:
                if now - worker.aborted_at > self._stop_timeout_s:  # SIGABRT did not do it
                    self._signal(worker, "KILL")
            elif worker.ready and now - worker.last_ping > self._watchdog_s:
                log.warn("cloud worker {index} (pid {pid}) sent no watchdog ping for "
                         "{s:.0f} s; killing it", index=worker.index, pid=worker.pid,
                         s=now - worker.last_ping)
                worker.aborted_at = now
                self._signal(worker, "ABRT")

    def _ended(self, worker: _Worker, reason: BaseException) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping or not self.running:
            return
        now = self._reactor.seconds()
        self._down_since.setdefault(worker.index, now)
        if now - worker.started_at >= STABLE_AFTER_S:
            self._restarts[worker.index] = 0
        attempt = self._restarts.get(worker.index, 0) + 1
        self._restarts[worker.index] = attempt
        delay = self._policy.delay(attempt, self._rng)
        self.restarts += 1
        log.warn("cloud worker {index} (pid {pid}) exited ({why}); restarting it in "
                 "{delay:.1f} s (restart {attempt} in a row)", index=worker.index,
                 pid=worker.pid, why=_exit_text(reason), delay=delay, attempt=attempt)
        self._pending_restarts[worker.index] = self._reactor.callLater(
            delay, self._spawn, worker.index)

    def down_too_long(self) -> str | None:
        """Why the parent's own watchdog should not be pinged, or None: a worker down (not
        ready) for over ``DOWN_TOO_LONG_S``, its restarts failing."""
        now = self._reactor.seconds()
        for index, since in sorted(self._down_since.items()):
            if now - since > DOWN_TOO_LONG_S:
                return f"cloud worker {index} has not been ready for {now - since:.0f} s"
        return None

    def worker_pids(self) -> dict[int, int]:
        return {i: w.pid for i, w in self.workers.items() if w.pid is not None}

    def _signal(self, worker: _Worker, name: str) -> None:
        try:
            worker.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        """SIGTERM every worker; SIGKILL those still running after the stop timeout."""
        super().stopService()
        self._stopping = True
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        for call in self._pending_restarts.values():
            if call.active():
                call.cancel()
        self._pending_restarts.clear()
        workers = list(self.workers.values())
        for worker in workers:
            self._signal(worker, "TERM")

        def kill_stragglers() -> None:
            for worker in workers:
                if not worker.ended.called:
                    log.warn("cloud worker {index} (pid {pid}) still running {s:.0f} s after "
                             "SIGTERM; killing it", index=worker.index, pid=worker.pid,
                             s=self._stop_timeout_s)
                    self._signal(worker, "KILL")

        killer = self._reactor.callLater(self._stop_timeout_s, kill_stragglers)

        async def wait_all() -> None:
            for worker in workers:
                await worker.ended
            if killer.active():
                killer.cancel()
            for port in self._notify_ports:
                await defer.maybeDeferred(port.stopListening)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

        return defer.Deferred.fromCoroutine(wait_all())


def _exit_text(reason: BaseException) -> str:
    if isinstance(reason, error.ProcessTerminated):
        if reason.signal is not None:
            return f"killed by {signal.Signals(reason.signal).name}"
        return f"exit code {reason.exitCode}"
    return "exit code 0"


def worker_command(args: Any) -> list[str]:
    """A worker's command line: the parent's ``cloud run`` settings, ``--processes 1``.
    The DSN is passed as ``$BRIDGE_DSN`` (see ``WorkerSupervisor``), not on the command line
    where ``ps`` shows it; the port is the shared socket's."""
    return [sys.executable, "-m", "bridgectl.main", "cloud", "run",
            "--push-loss", repr(args.push_loss), "--push-errors", repr(args.push_errors),
            "--push-latency", repr(args.push_latency),
            "--resend-after", repr(args.resend_after),
            "--max-attempts", str(args.max_attempts), "--seed", str(args.seed),
            "--token-ttl", str(args.token_ttl), "--log-format", args.log_format,
            "--processes", "1"]
