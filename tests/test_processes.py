"""The tests' wait for a process's serving line: the match, or the process's own words."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.processes import wait_for_line


def script(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_the_matching_line_is_returned_after_lines_that_do_not_match():
    proc = script("import sys, time; print('starting', file=sys.stderr); "
                  "print('up on port 4711', file=sys.stderr, flush=True); time.sleep(30)")
    try:
        match = wait_for_line(proc, r"up on port (\d+)")
        assert match.group(1) == "4711"
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_exits_first_fails_the_wait_with_what_it_said():
    proc = script("import sys; print('starting', file=sys.stderr); "
                  "sys.exit('error: cannot listen on 127.0.0.1:1: in use')")
    with pytest.raises(AssertionError, match=r"(?s)exit code 1\).*starting.*cannot listen"):
        wait_for_line(proc, r"up on port")


def test_a_silent_process_fails_the_wait_when_its_time_runs_out():
    proc = script("import sys, time; print('starting', file=sys.stderr, flush=True); "
                  "time.sleep(60)")
    try:
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"(?s)in 1 s; it said:\nstarting"):
            wait_for_line(proc, r"up on port", timeout=1.0)
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()


def test_the_pipe_goes_on_after_the_matching_line():
    """The wait stops reading at its line: what follows is the caller's to read."""
    proc = script("import sys; print('up', file=sys.stderr); print('then this', "
                  "file=sys.stderr)")
    wait_for_line(proc, r"^up$")
    assert proc.stderr.read() == "then this\n"
    assert proc.wait(timeout=10) == 0
