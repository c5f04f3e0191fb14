"""Ports free on 127.0.0.1 right now, for the harness and the tests that start servers on
real TCP: one port the kernel picks, or a block of consecutive ports (a legacy network
listens on ``base .. base + supernodes``, its login server just after).

A port free now can still be taken before the caller binds it; callers bind soon after,
and the choices below keep that window small and the collisions rare. Blocks lie below the
kernel's ephemeral range, where no client connection is given a local port: the demo picks
its block at random, the tests scan from a place of each process's own, and both claim the
blocks they take with lock files, so that two processes never take the same ports (CI runs
two rounds of the tests at once: both scanning from one start, two tests once found the
same block and the slower one could not listen).
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Iterable
from contextlib import ExitStack


class NoFreePorts(RuntimeError):
    """No block of the requested size was free."""


def free_port() -> int:
    """A port free on 127.0.0.1 now, picked by the kernel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANGE_START = 20000
RANGE_STEP = 97
#: how many bases apart two neighbouring salts (pids) start: far enough that a process
#: stepping past its own recent blocks does not walk onto the other's
RANGE_SPREAD = 37


def ephemeral_start(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port the kernel may give a client connection (Linux's default, 32768,
    where the setting can not be read)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _room(n: int) -> int:
    """The first port above every block (the ephemeral range's start); NoFreePorts when
    that leaves no room for *n* ports from RANGE_START."""
    end = ephemeral_start()
    if end - n < RANGE_START:
        raise NoFreePorts(f"the kernel's ephemeral range starts at {end}: no room below it "
                          f"for {n} ports from {RANGE_START}")
    return end


#: the lock files of the bases this process has claimed, open (and so locked) while it lives
_CLAIMED: dict[int, int] = {}


def claim(base: int) -> bool:
    """Whether this process holds *base* (already, or now): an exclusive ``flock`` on a
    file named after it, held until the process ends or lets it go, so that no other
    process picking its blocks here (CI's other round) can take the same block meanwhile.
    A lock file that can not be opened (another user's) claims nothing and says yes."""
    if base in _CLAIMED:
        return True
    directory = os.path.join(tempfile.gettempdir(), "bridge-port-blocks")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, str(base)), os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # another process holds it
        os.close(fd)
        return False
    _CLAIMED[base] = fd
    return True


def _release(bases: Iterable[int]) -> None:
    """Let go of this process's claims on *bases* (those it holds)."""
    for base in bases:
        fd = _CLAIMED.pop(base, None)
        if fd is not None:
            os.close(fd)


def _grid(base: int, n: int) -> range:
    """The bases of the scan's blocks that ports *base* .. *base* + *n* - 1 fall in."""
    return range(base - (base - RANGE_START) % RANGE_STEP, base + n, RANGE_STEP)


def _claim_grid(base: int, n: int) -> bool:
    """Claim every scan block that ports *base* .. *base* + *n* - 1 fall in, or none of
    those this process did not hold before."""
    held = set(_CLAIMED)
    if all(map(claim, _grid(base, n))):
        return True
    _release(b for b in _grid(base, n) if b not in held)
    return False


def free_port_block(n: int, rng: random.Random) -> int:
    """A base port with *n* consecutive free ports after it, tried at random bases from
    *rng* below the ephemeral range, among those whose ports lie in scan blocks this
    process can claim (``claim``), so that a demo's block and a test's are never the same
    ports; ``release_block`` lets them go."""
    end = _room(n)
    bases = (rng.randrange(RANGE_START, end - n + 1) for _ in range(200))
    return _first_free_block(n, (b for b in bases if _claim_grid(b, n)))


def release_block(base: int, n: int) -> None:
    """Let go of the claims ``free_port_block`` took for *base*'s block of *n*, once its
    servers are gone (a process that runs many demos would otherwise hold them all)."""
    _release(_grid(base, n))


def range_bases(n: int, salt: int) -> list[int]:
    """Every base from RANGE_START in steps of RANGE_STEP whose block of *n* (at most
    RANGE_STEP) ends below the ephemeral range, starting at a place chosen by *salt*
    (RANGE_SPREAD bases per unit) and wrapping around."""
    if not 0 < n <= RANGE_STEP:
        raise ValueError(f"a block of {n} ports: from 1 to {RANGE_STEP}")
    end = _room(n)
    bases = list(range(RANGE_START, end - n + 1, RANGE_STEP))
    first = salt * RANGE_SPREAD % len(bases)
    return bases[first:] + bases[:first]


def free_port_range(n: int) -> int:
    """A base port with *n* consecutive ports free below the ephemeral range, scanned from
    a start of this process's own (its pid), among the bases no other process has
    claimed; the base found stays this process's (``claim``)."""
    return _first_free_block(n, (b for b in range_bases(n, os.getpid()) if claim(b)))


def _first_free_block(n: int, bases: Iterable[int]) -> int:
    """The first of *bases* whose *n* ports bind as a server's listener would: with
    SO_REUSEADDR, as Twisted's listenTCP binds, so a port whose last connections are in
    TIME_WAIT counts as free (the server can bind it: its sockets had SO_REUSEADDR too)
    and one with a listener does not."""
    for base in bases:
        with ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise NoFreePorts(f"found no {n} consecutive free ports on 127.0.0.1")
