"""Free ports for the harness and the TCP tests: what they return is bindable now."""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack

import pytest

from drills import ports


def bind_all(base: int, n: int) -> None:
    with ExitStack() as stack:
        for port in range(base, base + n):
            stack.enter_context(socket.socket()).bind(("127.0.0.1", port))


def test_free_port_is_bindable():
    """The kernel's pick is a port that can be bound on 127.0.0.1."""
    bind_all(ports.free_port(), 1)


def test_free_port_block_is_seeded_and_bindable():
    """The same seed tries the same bases; the block found binds whole."""
    base = ports.free_port_block(5, random.Random(7))
    assert 20000 <= base < 60000 - 5
    bind_all(base, 5)


def test_free_port_range_scans_from_a_fixed_start():
    """The scan starts at 47200 in steps of 97, and the block found binds whole."""
    base = ports.free_port_range(4)
    assert base >= 47200 and (base - 47200) % 97 == 0
    bind_all(base, 4)


def test_a_block_that_is_never_free_is_a_clear_error():
    """A taken port in every candidate block: NoFreePorts naming the size asked for."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ports.NoFreePorts, match="no 2 consecutive free ports"):
            ports._first_free_block(2, [port, port - 1])
