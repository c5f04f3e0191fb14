"""Ports free on 127.0.0.1 right now, for the harness and the tests that start servers on
real TCP: one port the kernel picks, or a block of consecutive ports (a legacy network
listens on ``base .. base + supernodes``, its login server just after).

A port free now can still be taken before the caller binds it; callers bind soon after,
and the choices below keep that window small and the collisions rare. Blocks lie below the
kernel's ephemeral range, where no client connection is given a local port: a seeded demo
picks its block at random; the tests scan from a place of each process's own (CI runs two
rounds of the tests at once: both scanning from one start, two tests once found the same
block and the slower one could not listen).
"""

from __future__ import annotations

import os
import random
import socket
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


def free_port_block(n: int, rng: random.Random) -> int:
    """A base port with *n* consecutive free ports after it, tried at random bases from
    *rng* (the demo's seeded choices) below the ephemeral range."""
    high = max(ephemeral_start(), RANGE_START + n + 1)
    bases = (rng.randrange(RANGE_START, high - n) for _ in range(200))
    return _first_free_block(n, bases)


def range_bases(n: int, salt: int) -> list[int]:
    """Every base from RANGE_START in steps of RANGE_STEP whose block of *n* ends below the
    ephemeral range, starting at a place chosen by *salt* (RANGE_SPREAD bases per unit)
    and wrapping around."""
    end = max(ephemeral_start(), RANGE_START + RANGE_STEP + n)
    bases = list(range(RANGE_START, end - n, RANGE_STEP))
    first = salt * RANGE_SPREAD % len(bases)
    return bases[first:] + bases[:first]


def free_port_range(n: int) -> int:
    """A base port with *n* consecutive ports free below the ephemeral range, scanned from
    a start of this process's own (its pid)."""
    return _first_free_block(n, range_bases(n, os.getpid()))


def _first_free_block(n: int, bases: Iterable[int]) -> int:
    """The first of *bases* whose *n* ports bind as a server's listener would: with
    SO_REUSEADDR, as Twisted's listenTCP binds, so a port whose last connections are in
    TIME_WAIT counts as free (the server can bind it) and one with a listener does not."""
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
