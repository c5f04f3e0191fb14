"""Child processes of a drill: each a real ``bridgectl`` command, its output in a log file,
its last lines kept and watched, its end a Deferred."""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol


class DemoError(Exception):
    """The demo could not run (a process did not start, the database refused...)."""


class Child(protocol.ProcessProtocol):
    """One ``bridgectl`` process: output to a log file, the last lines kept, line watchers,
    and ``ended`` firing with the exit code (negative: the signal that ended it)."""

    def __init__(self, name: str, log_path: Path, *, capture_stdout: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.capture = capture_stdout
        self.stdout = bytearray()
        self.tail: deque[str] = deque(maxlen=30)
        self._partial = b""
        self._watchers: list[tuple[re.Pattern[str], defer.Deferred]] = []
        self.on_line: Callable[[str], None] | None = None
        self.ended: defer.Deferred = defer.Deferred()
        self.exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self.exit_code is None

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.capture:
            self.stdout += data
        else:
            self._lines(data)
        self._log.write(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._log.write(data)
        self._lines(data)

    def _lines(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.tail.append(line)
            if self.on_line is not None:
                self.on_line(line)
            for pattern, d in list(self._watchers):
                match = pattern.search(line)
                if match:
                    self._watchers.remove((pattern, d))
                    d.callback(match)

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        code = reason.value.exitCode
        self.exit_code = code if code is not None else -(reason.value.signal or 0)
        self._log.close()
        for _pattern, d in self._watchers:
            d.errback(DemoError(f"{self.name} exited ({self.exit_code}) before it was ready; "
                                f"see {self.log_path}:\n  " + "\n  ".join(list(self.tail)[-8:])))
        self._watchers.clear()
        self.ended.callback(self.exit_code)

    def wait_for(self, pattern: str, clock: Any, timeout: float) -> defer.Deferred:
        """Fires with the match of the first output line matching *pattern*."""
        d: defer.Deferred = defer.Deferred()
        if not self.running:
            d.errback(DemoError(f"{self.name} is not running; see {self.log_path}"))
            return d
        compiled = re.compile(pattern)
        for line in self.tail:  # printed before anyone asked
            match = compiled.search(line)
            if match:
                d.callback(match)
                return d
        self._watchers.append((compiled, d))

        def timed_out(f: Any) -> Any:
            f.trap(defer.TimeoutError, defer.CancelledError)
            self._watchers[:] = [w for w in self._watchers if w[1] is not d]
            raise DemoError(f"{self.name} did not get ready within {timeout:g} s; see "
                            f"{self.log_path}")
        return d.addTimeout(timeout, clock).addErrback(timed_out)

    def signal(self, sig: int) -> None:
        if self.running and self.transport is not None:
            try:
                self.transport.signalProcess(sig)
            except Exception:  # ProcessExitedAlready: it ended between the check and now
                pass

    def mark(self) -> int:
        """The log's current length (see ``log_since``)."""
        if self._log.closed:
            return self.log_path.stat().st_size
        self._log.flush()
        return self._log.tell()

    def log_since(self, offset: int) -> str:
        if not self._log.closed:
            self._log.flush()
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def stdout_json(self) -> Any:
        try:
            return json.loads(bytes(self.stdout).decode() or "null")
        except ValueError:
            return None
