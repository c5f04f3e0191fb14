"""How a ``bridgectl`` process runs: the reactor, the service tree, signals and logging.

This is the one module that imports the global reactor. A command builds its work as
``async def work(reactor, stop_signal)``; ``run_until_stopped`` runs it under ``task.react``
and fires *stop_signal* on Ctrl-C, SIGTERM or the end of ``--duration``::

    command --> run_until_stopped(work) --> task.react --> work(reactor, stop_signal)
                                                               |
        ServiceTree: start children in order (the database first) ...
        ... await stop_signal ... stop them in reverse, one after another (the database last)

A failure of the run (a port in use, an unreachable peer) becomes ``RuntimeFailure``, which
``bridgectl.main`` turns into one line and exit code 1, like every other command's error.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

from bridgectl.errors import RuntimeFailure, UsageError
from servicekit.sdnotify import SystemdLink

log = Logger()

#: Work run by ``run_until_stopped``: ``work(reactor, stop_signal)``.
Work = Callable[[Any, defer.Deferred], Awaitable[Any]]


class ServiceTree(MultiService):
    """Children start in the order they were added (``await start()``: a failed start undoes
    itself) and stop in reverse, one after another: each waits for the one added after it,
    so in-flight work drains before what it depends on (the database, added first) goes
    away."""

    async def start(self) -> None:
        """Start each child in order; if one fails (a port in use), stop those already
        started, in reverse, and only then raise its error: a process must neither exit
        while its database pool is still closing nor hang on it once the reactor stops."""
        Service.startService(self)
        started: list[Service] = []
        for child in self:
            try:
                child.startService()
            except BaseException:
                self.running = 0
                await _stop_in_reverse(started)
                raise
            started.append(child)

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        Service.stopService(self)
        return _stop_in_reverse([child for child in self if child.running])


def _stop_in_reverse(services: list[Service]) -> defer.Deferred:
    """Stop *services* last to first, each after the previous one's stop has fired; a
    failure to stop one is logged and the rest still stop."""

    async def stop_all() -> None:
        for svc in reversed(services):
            try:
                await defer.maybeDeferred(svc.stopService)
            except Exception:
                log.failure("stopping {svc} failed", svc=svc.name or type(svc).__name__)

    return defer.Deferred.fromCoroutine(stop_all())


class TCPListener(Service):
    """A listening TCP port as a service: it listens when started (a port in use raises
    ``CannotListenError`` from ``startService``) and stops listening when stopped."""

    def __init__(self, reactor: Any, port: int, factory: IProtocolFactory, *,
                 interface: str = "127.0.0.1") -> None:
        self._endpoint = TCP4ServerEndpoint(reactor, port, interface=interface)
        self._factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        listened: list[Any] = []
        # A TCP endpoint listens at once: the Deferred has fired when listen() returns.
        self._endpoint.listen(self._factory).addBoth(listened.append)
        if not listened or not IListeningPort.providedBy(listened[0]):
            if listened:
                listened[0].raiseException()
            raise RuntimeError("the TCP endpoint did not listen at once")
        self.port = listened[0]
        super().startService()

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)

    def address(self) -> tuple[str, int]:
        """(host, port) it listens on; only while running."""
        assert self.port is not None, "not listening"
        where = self.port.getHost()
        return where.host, where.port


class AdoptedListener(TCPListener):
    """A listening socket inherited as descriptor *fd* (``cloud run --processes``: the
    parent bound it, every worker accepts on it), as a service like ``TCPListener``."""

    def __init__(self, reactor: Any, fd: int, factory: IProtocolFactory) -> None:
        Service.__init__(self)
        self._reactor, self._fd, self._factory = reactor, fd, factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        self.port = self._reactor.adoptStreamPort(self._fd, socket.AF_INET, self._factory)
        os.close(self._fd)  # the port holds its own duplicate
        Service.startService(self)


def run_until_stopped(work: Work, duration: float | None = None, *,
                      drain_on_shutdown: bool = True) -> Any:
    """Run ``work(reactor, stop_signal)`` under ``task.react`` and return its result.

    Ctrl-C, SIGTERM or *duration* seconds fire *stop_signal*; with *drain_on_shutdown* the
    reactor's shutdown then waits for the work to finish (``legacy run`` with a duration of
    its own does not). A failure of the run raises ``RuntimeFailure`` (one line)."""
    from twisted.internet import reactor

    outcome: dict[str, Any] = {}
    stop_signal: defer.Deferred = defer.Deferred()

    def stop() -> None:
        if not stop_signal.called:
            stop_signal.callback(None)

    async def run(_reactor: Any) -> None:
        stop_with_parent(reactor)
        finished = defer.Deferred.fromCoroutine(work(reactor, stop_signal))
        if drain_on_shutdown:
            reactor.addSystemEventTrigger("before", "shutdown", lambda: (stop(), finished)[1])
        if duration is not None:
            reactor.callLater(duration, stop)
        try:
            outcome["result"] = await finished
        except error.CannotListenError as e:
            outcome["error"] = (f"cannot listen on {e.interface or '127.0.0.1'}:{e.port}: "
                                f"{e.socketError}")
        except (RuntimeFailure, UsageError) as e:
            outcome["error"] = str(e)
        except Exception as e:  # a failure of the run, not of the arguments
            outcome["error"] = f"{type(e).__name__}: {e}"

    try:
        task.react(lambda r: defer.Deferred.fromCoroutine(run(r)))
    except SystemExit:
        pass
    if "error" in outcome:
        raise RuntimeFailure(outcome["error"])
    return outcome.get("result")


def systemd_link(reactor: Any) -> SystemdLink:
    """This process's notifications to systemd (``READY=1``, the watchdog, ``STOPPING=1``)
    from ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``; outside a ``Type=notify`` unit it sends
    nothing."""
    return SystemdLink.from_environment(reactor, os.environ, os.getpid())


def stop_with_parent(reactor: Any) -> None:
    """With ``$BRIDGE_STOP_WITH_PARENT=<pid>`` (set by ``bridgectl demo`` for its children,
    which run in their own sessions), stop cleanly once that process is gone, so a demo
    killed with SIGKILL leaves nothing running."""
    parent = os.environ.get("BRIDGE_STOP_WITH_PARENT", "")
    if not parent.isdigit():
        return

    def check() -> None:
        if os.getppid() != int(parent):
            watch.stop()
            # stdout and stderr were pipes to the demo: nobody reads them now, and a write
            # would fail (EPIPE) halfway through the clean stop
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            backstop = threading.Timer(30.0, os._exit, (1,))  # if the clean stop hangs
            backstop.daemon = True
            backstop.start()
            reactor.stop()
    watch = task.LoopingCall(check)
    watch.clock = reactor
    watch.start(1.0, now=False)


def on_signal(reactor: Any, signum: int, fn: Callable[[], Any]) -> None:
    """Call *fn* in the reactor thread when *signum* arrives."""
    signal.signal(signum, lambda _signum, _frame: reactor.callFromThread(fn))


#: ``--log-format``: ``text`` lines, or ``json``: one JSON object per line.
LOG_FORMATS = ("text", "json")
#: whether logging began in JSON (``say`` then logs rather than prints)
_json_logging = False
_say = Logger(namespace="bridgectl")


def log_to_stderr(log_format: str = "text") -> None:
    """Log to stderr: ours at info (e.g. why a connection was closed), Twisted's at warn."""
    log_to_stream(sys.stderr, log_format=log_format)


def log_to_stream(stream: TextIO, *, stdlib_too: bool = False, log_format: str = "text"
                  ) -> None:
    """Log to *stream*: ours at info, Twisted's at warn (and, with *stdlib_too*, the
    standard library's warnings, e.g. psycopg_pool's reconnect messages).

    *log_format* ``json`` writes each event as one line of JSON (Twisted's
    ``jsonFileLogObserver``, without its record separator, plus ``text``: the formatted
    message), and sends the standard library's warnings through the same observer, so a log
    shipper can read every line."""
    global _json_logging
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    if stdlib_too or log_format == "json":
        if log_format == "json":
            handler: logging.Handler = _StdlibToTwisted()
        else:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s#%(levelname)s] "
                                                   "%(message)s"))
        logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    for ns in ("servicekit", "legacy", "cloud", "bridge", "reconcilers", "drills",
               "bridgectl"):
        levels.setLogLevelForNamespace(ns, LogLevel.info)
    if log_format == "json":
        base: ILogObserver = _with_text(jsonFileLogObserver(stream, recordSeparator=""))
    else:
        base = textFileLogObserver(stream)
    _json_logging = log_format == "json"
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(base, [levels])],
                                     redirectStandardIO=False)


def _with_text(observer: ILogObserver) -> ILogObserver:
    """*observer*, given each event with ``text``: its message formatted (a copy: other
    observers see the event as it was)."""
    def observe(event: dict) -> None:
        observer({**event, "text": formatEvent(event)})
    return observe


def say(message: str, *, error: bool = False) -> None:
    """A line for the operator on stderr (``listening on ...``): printed as it is with text
    logs, logged (namespace ``bridgectl``) with JSON logs, so every line stays JSON."""
    if _json_logging:
        (_say.error if error else _say.info)("{message}", message=message)
    else:
        print(message, file=sys.stderr, flush=True)


class _StdlibToTwisted(logging.Handler):
    """A ``logging`` handler that hands records to Twisted's logger (JSON logs)."""

    LEVELS = {logging.DEBUG: LogLevel.debug, logging.INFO: LogLevel.info,
              logging.WARNING: LogLevel.warn, logging.ERROR: LogLevel.error,
              logging.CRITICAL: LogLevel.critical}

    def emit(self, record: logging.LogRecord) -> None:
        Logger(namespace=record.name).emit(self.LEVELS.get(record.levelno, LogLevel.warn),
                                           "{message}", message=record.getMessage())
