"""Waiting on a real process's stderr for the line that says it is serving, and failing
with what it said instead when it exits first (a port taken, a bad flag): a wait that only
timed out hid the process's own error."""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time


def wait_for_line(proc: subprocess.Popen, pattern: str,
                  timeout: float = 30.0) -> re.Match[str]:
    """The first line of *proc*'s stderr (a text pipe) that matches *pattern*, waiting at
    most *timeout* seconds in all; an AssertionError with the lines read before, and the
    exit code, if the pipe ends first (the process is gone), or if the time runs out.

    A thread reads the lines, so a silent process can not hold the wait past its bound;
    it stops at the matching line, and the caller may read the pipe on from there."""
    regex = re.compile(pattern)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in iter(proc.stderr.readline, ""):
            lines.put(line)
            if regex.search(line):
                return
        lines.put("")  # the end of the pipe

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r} from process {proc.pid} in "
                                 f"{timeout:g} s; it said:\n{''.join(seen)}") from None
        if not line:
            try:
                code: int | None = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # stderr closed, the process still running
                code = None
            raise AssertionError(f"process {proc.pid} ended its stderr (exit code {code}) "
                                 f"before a line matching {pattern!r}:\n{''.join(seen)}")
        match = regex.search(line)
        if match:
            return match
        seen.append(line)
