"""Free ports for the harness and the TCP tests: what they return is bindable now."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from drills import ports

ROOT = Path(__file__).resolve().parents[2]


def bind_all(base: int, n: int) -> None:
    """Bind *n* ports from *base* as a server's listeners do (SO_REUSEADDR, as Twisted)."""
    with ExitStack() as stack:
        for port in range(base, base + n):
            s = stack.enter_context(socket.socket())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_free_port_is_bindable():
    """The kernel's pick is a port that can be bound on 127.0.0.1."""
    bind_all(ports.free_port(), 1)


def test_free_port_block_is_drawn_from_its_random_source_and_binds():
    """The same seed tries the same bases, below the ephemeral range; the block found binds
    whole."""
    base = ports.free_port_block(5, random.Random(7))
    assert ports.RANGE_START <= base and base + 5 <= ports.ephemeral_start()
    assert ports.free_port_block(5, random.Random(7)) == base
    bind_all(base, 5)


def test_free_port_range_lies_below_the_ephemeral_range_and_binds():
    """The block found starts on the scan's grid, ends below the first port the kernel may
    give a client connection, and binds whole."""
    base = ports.free_port_range(4)
    assert (base - ports.RANGE_START) % ports.RANGE_STEP == 0
    assert ports.RANGE_START <= base and base + 4 <= ports.ephemeral_start()
    bind_all(base, 4)


def test_a_base_claimed_by_another_process_is_not_taken_until_it_ends():
    """A process that took a block holds its claim while it lives: another one (here, this
    test) skips that base; once the holder is gone the base can be claimed again."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from drills import ports; "
         "print(ports.free_port_range(2), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        base = int(holder.stdout.readline())
        assert not ports.claim(base)
        assert base not in ports._CLAIMED
    finally:
        holder.kill()
        holder.wait()
    assert ports.claim(base) and ports.claim(base)  # this process's now, and again
    os.close(ports._CLAIMED.pop(base))  # (let it go: the scan's order is this test's own)


def test_a_random_block_claims_the_grid_blocks_it_covers():
    """A demo's block (random, any size) claims every scan block its ports fall in, so a
    test's block scanned meanwhile can not be the same ports."""
    step, start = ports.RANGE_STEP, ports.RANGE_START
    assert list(ports._grid(start + 5, 3)) == [start]
    assert list(ports._grid(start + step - 2, 3)) == [start, start + step]
    assert list(ports._grid(start + step, 2 * step + 1)) == [start + step * k for k in (1, 2, 3)]
    base = ports.free_port_block(7, random.Random(11))
    assert all(g in ports._CLAIMED for g in ports._grid(base, 7))
    ports.release_block(base, 7)
    assert not any(g in ports._CLAIMED for g in ports._grid(base, 7))


def test_a_random_block_whose_scan_block_is_held_elsewhere_claims_none():
    """A block over two scan blocks, the second held by another process: not taken, and
    the first is not left claimed by this one (a demo's tries would otherwise keep them)."""
    first = next(b for b in range(ports.RANGE_START + 40 * ports.RANGE_STEP,
                                  ports.ephemeral_start(), ports.RANGE_STEP)
                 if b not in ports._CLAIMED and b + ports.RANGE_STEP not in ports._CLAIMED)
    second = first + ports.RANGE_STEP
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from drills import ports; "
         f"print(ports.claim({second}), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert not ports._claim_grid(second - 2, 4)
        assert first not in ports._CLAIMED and second not in ports._CLAIMED
    finally:
        holder.kill()
        holder.wait()


def test_each_process_scans_from_a_start_of_its_own():
    """Two neighbouring salts (pids) start RANGE_SPREAD bases apart and scan the same bases
    in all: two test rounds at once seldom want the same block (the claims are what keep
    them off one)."""
    one, two = ports.range_bases(4, 10), ports.range_bases(4, 11)
    assert two.index(one[0]) == len(one) - ports.RANGE_SPREAD
    assert sorted(one) == sorted(two) and len(set(one)) == len(one)
    assert max(one) + 4 <= ports.ephemeral_start()


def test_the_ephemeral_start_is_read_from_the_kernel_or_defaults(tmp_path):
    """The setting's first number; Linux's default when the file is missing or unreadable."""
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t60999\n")
    assert ports.ephemeral_start(str(setting)) == 40000
    setting.write_text("")
    assert ports.ephemeral_start(str(setting)) == 32768
    assert ports.ephemeral_start(str(tmp_path / "missing")) == 32768


def test_a_port_with_a_listener_is_taken_and_one_in_time_wait_is_free():
    """A block binds as a server's listener would (SO_REUSEADDR): a listening port is not
    free; a port whose closed connection lingers in TIME_WAIT is."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ports.NoFreePorts):
            ports._first_free_block(1, [port])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's end closes first: its port lingers in TIME_WAIT
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):  # lingering: a plain bind fails
        plain.bind(("127.0.0.1", port))
    assert ports._first_free_block(1, [port]) == port


def test_no_room_below_the_ephemeral_range_is_a_clear_error(monkeypatch):
    """A kernel whose ephemeral range starts too low for a block: NoFreePorts saying so,
    not a block inside that range."""
    monkeypatch.setattr(ports, "ephemeral_start", lambda: ports.RANGE_START + 2)
    with pytest.raises(ports.NoFreePorts, match="ephemeral range starts at 20002"):
        ports.range_bases(4, 1)
    with pytest.raises(ports.NoFreePorts, match="no room below it for 4 ports"):
        ports.free_port_block(4, random.Random(1))


def test_a_block_that_is_never_free_is_a_clear_error():
    """A taken port in every candidate block: NoFreePorts naming the size asked for."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ports.NoFreePorts, match="no 2 consecutive free ports"):
            ports._first_free_block(2, [port, port - 1])
