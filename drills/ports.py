"""Ports free on 127.0.0.1 right now, for the harness and the tests that start servers on
real TCP: one port the kernel picks, or a block of consecutive ports (a legacy network
listens on ``base .. base + supernodes``, its login server just after).

A port free now can still be taken before the caller binds it; callers bind soon after,
and the choices below keep that window small and the collisions rare (a seeded demo picks
its block at random, the tests scan from a fixed start in steps that spread parallel runs).
"""

from __future__ import annotations

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


def free_port_block(n: int, rng: random.Random) -> int:
    """A base port with *n* consecutive free ports after it, tried at random bases from
    *rng* (the demo's seeded choices)."""
    bases = (rng.randrange(20000, 60000 - n) for _ in range(200))
    return _first_free_block(n, bases)


def free_port_range(n: int) -> int:
    """A base port with *n* consecutive ports free, the first found from 47200 on."""
    return _first_free_block(n, range(47200, 60000, 97))


def _first_free_block(n: int, bases: Iterable[int]) -> int:
    for base in bases:
        with ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise NoFreePorts(f"found no {n} consecutive free ports on 127.0.0.1")
