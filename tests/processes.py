"""Waiting on a real process's stderr for the line that says it is serving, and failing
with what it said instead when it exits first (a port taken, a bad flag): a wait that only
timed out hid the process's own error."""

from __future__ import annotations

import re
import subprocess
import time


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 30.0) -> re.Match:
    """The first line of *proc*'s stderr (a text pipe) that matches *pattern*; an
    AssertionError with the lines read and the rest of stderr if the process exits first,
    or with the lines read if *timeout* seconds pass between lines that do not match."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:  # end of the pipe: the process has gone
            rest = proc.stderr.read()
            raise AssertionError(f"process {proc.pid} exited (code {proc.wait()}) before "
                                 f"{pattern!r}:\n{''.join(seen)}{rest}")
        match = re.search(pattern, line)
        if match:
            return match
        seen.append(line)
    raise AssertionError(f"no line matching {pattern!r} in {timeout:.0f} s:\n{''.join(seen)}")
