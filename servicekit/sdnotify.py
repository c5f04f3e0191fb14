"""systemd's service notifications (sd_notify(3)) over ``$NOTIFY_SOCKET``, without libsystemd.

A unit with ``Type=notify`` counts its service as started only once it says ``READY=1``;
with ``WatchdogSec=`` systemd kills and restarts it (``Restart=on-failure``) when no
``WATCHDOG=1`` arrives within that time. Each notification is one datagram of
newline-separated ``KEY=value`` lines sent to the unix socket that ``$NOTIFY_SOCKET`` names:
a path, or an abstract socket when it starts with ``@``::

    serving   --> ready(status)  --> READY=1, STATUS=...
                  Watchdog, every WATCHDOG_USEC / 2 on the injected clock:
                      check() is None --> WATCHDOG=1
                      check() says why --> nothing (logged): systemd restarts the service
                                           once WatchdogSec passes without a ping
    stopping  --> stopping()     --> the watchdog stops (a drain may take a while),
                                     STOPPING=1, STATUS=... (once)

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) nothing is sent and nothing
fails; without ``$WATCHDOG_USEC`` (no ``WatchdogSec=``), or with a ``$WATCHDOG_PID`` that is
another process's, there is no watchdog. A send never blocks (a full socket queue drops the
datagram) and a failed one is logged, once: notifications never stop the service they
describe.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

#: What a watchdog asks before each ping: None when healthy, else what is wrong.
HealthCheck = Callable[[], str | None]


def socket_address(value: str | None) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value: a path as it is, ``@name`` as
    the abstract socket ``\\0name``; None when unset or of a kind this does not speak (e.g.
    ``vsock:``)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises; None without a watchdog, or when ``$WATCHDOG_PID`` names another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2_000_000


class Notifier:
    """Sends notifications to one ``$NOTIFY_SOCKET`` address (or, without one, nowhere)."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._failed_once = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        value = environ.get("NOTIFY_SOCKET")
        address = socket_address(value)
        if value and address is None:
            log.warn("NOTIFY_SOCKET={value!r} is neither a path nor an abstract socket; "
                     "systemd will not be notified", value=value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` *assignments* as one datagram; True when it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)  # never wait on systemd from the reactor thread
                s.sendto(payload, self.address)
        except OSError as e:
            if not self._failed_once:
                self._failed_once = True
                log.warn("cannot notify systemd at {address!r}: {error} (further failures "
                         "are not logged)", address=self.address, error=e)
            return False
        return True


class Watchdog(Service):
    """Pings systemd's watchdog every *interval_s* on *clock*, while *check* finds the
    process healthy; a sick process is left to the watchdog's timeout."""

    def __init__(self, clock: IReactorTime, notifier: Notifier, interval_s: float,
                 check: HealthCheck) -> None:
        if not interval_s > 0:
            raise ValueError("the watchdog interval must be positive")
        self._clock, self._notifier = clock, notifier
        self.interval_s, self._check = interval_s, check
        self._loop: task.LoopingCall | None = None
        #: why the last ping was withheld (None: the last check passed)
        self.sick: str | None = None
        #: pings sent, and checks that withheld one (for tests and debugging)
        self.pings = 0
        self.withheld = 0

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._loop = task.LoopingCall(self._beat)
        self._loop.clock = self._clock
        self._loop.start(self.interval_s, now=True)

    def stopService(self) -> Any:  # noqa: N802 - Twisted's name
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _beat(self) -> None:
        try:
            why = self._check()
        except Exception:
            log.failure("the watchdog's health check failed; withholding the ping")
            why = "the health check failed"
        if why is None:
            if self.sick is not None:
                log.info("healthy again: the systemd watchdog is pinged again")
            self.sick = None
            if self._notifier.notify("WATCHDOG=1"):
                self.pings += 1
            return
        if self.sick is None:
            log.warn("not healthy ({why}): the systemd watchdog is not pinged; systemd "
                     "restarts the service if this lasts", why=why)
        self.sick = why
        self.withheld += 1


class SystemdLink:
    """What a long-running process tells systemd: ready (with the watchdog from then on),
    and stopping. Does nothing outside systemd."""

    def __init__(self, clock: IReactorTime, notifier: Notifier,
                 watchdog_interval: float | None) -> None:
        self._clock, self.notifier = clock, notifier
        self._interval = watchdog_interval
        self.watchdog: Watchdog | None = None
        self._stopping = False

    @classmethod
    def from_environment(cls, clock: IReactorTime, environ: Mapping[str, str],
                         pid: int) -> SystemdLink:
        """The link ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` describe
        for process *pid*."""
        return cls(clock, Notifier.from_environment(environ),
                   watchdog_interval_s(environ, pid))

    def ready(self, status: str, check: HealthCheck = lambda: None) -> None:
        """The process serves: say ``READY=1`` and start the watchdog, which pings while
        *check* finds it healthy."""
        self.notifier.notify("READY=1", f"STATUS={_one_line(status)}")
        if self.notifier.enabled and self._interval is not None and self.watchdog is None:
            self.watchdog = Watchdog(self._clock, self.notifier, self._interval, check)
            self.watchdog.startService()

    def stopping(self, status: str = "stopping") -> None:
        """The process stops: stop the watchdog and say ``STOPPING=1``, once (a second call,
        e.g. from a run that also ended by itself, does nothing)."""
        if self._stopping:
            return
        self._stopping = True
        if self.watchdog is not None and self.watchdog.running:
            self.watchdog.stopService()
        self.notifier.notify("STOPPING=1", f"STATUS={_one_line(status)}")


def _one_line(text: str) -> str:
    """A value fits on its line: a newline would start another assignment."""
    return " ".join(text.split())
