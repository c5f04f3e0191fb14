"""A simulation and its database backends on one CPU.

A simulation is one thread that waits on its PostgreSQL backend for every statement, in turn:
the two never run at once. On a virtual machine, waking a process on the other CPU is slow;
here a ``SELECT 1`` round trip took 60 µs between CPUs and 15 µs on one, and a simulated day
of 2,000 users took 20.2-20.3 s with the thread and its two backends pinned to the
CPU the thread was on when it pinned them, against 22.5-24.0 s unpinned (alternated).

Pinning is done only where it is safe to: Linux, a server on this machine, and a backend
that is provably this connection's. Over a Unix socket, the socket's peer (the postmaster
that accepted it, as the kernel reports it in our PID namespace: 0 when it is not visible
there) must be the backend's parent, and the backend must name itself as this user's, on
this database, for a local client. Over the loopback address, the backend must name itself
for this connection's own client address and port. Anything else leaves every affinity as
it was and says why. The affinities are put back afterwards.

Only the calling thread is pinned (``sched_setaffinity`` of pid 0 is the calling thread):
the simulation runs in one thread, and a thread started meanwhile would inherit the pin.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def current_cpu() -> int | None:
    """The CPU this thread last ran on (``/proc/thread-self/stat`` field 39), or None."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[36])  # field 39 counted from 1; fields[0] is the 3rd
    except (IndexError, ValueError):
        return None


def local_backend(conn: psycopg.Connection) -> int | None:
    """The pid of *conn*'s backend if it runs on this machine and is provably this
    connection's (see the module docstring); else None."""
    info = conn.info
    host = info.host or ""
    if not (host.startswith("/") or host in _LOOPBACK):
        return None
    pid = info.backend_pid
    try:
        fd = os.dup(conn.fileno())
    except OSError:
        return None
    try:
        with socket.socket(fileno=fd) as sock:
            if sock.family == socket.AF_UNIX:
                client = "[local]"
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                peer = struct.unpack("3i", creds)[0]
                if peer <= 0 or peer != _parent(pid):
                    return None
            else:
                addr, port = sock.getsockname()[:2]
                client = f"{addr}({port})"
    except OSError:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return None
    return pid if shows_as_backend(cmdline, info.user, info.dbname, client) else None


def _parent(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def shows_as_backend(cmdline: str, user: str, dbname: str, client: str) -> bool:
    """Whether a process's command line is a PostgreSQL backend of *user* on *dbname* for
    *client* (``[local]``, or an address and port such as ``127.0.0.1(5432)``). A backend
    names itself ``postgres: [cluster name:] <user> <database> <client> <state>``."""
    words = cmdline.split()
    if words[1:2] and words[1].endswith(":"):
        del words[1]
    return words[:4] == ["postgres:", user, dbname, client]


@contextlib.contextmanager
def pinned(conns: Sequence[psycopg.Connection], enabled: bool = True,
           say: Callable[[str], None] | None = None) -> Iterator[tuple[int | None, str]]:
    """Pin the calling thread and the backends of *conns* to the CPU the thread runs on,
    for the block. Yields ``(cpu, why)``: the CPU, or None and the reason nothing was
    pinned; *say* is told that reason when pinning was asked for and not done."""
    cpu, why, before = _pin(conns) if enabled else (None, "not asked", [])
    if enabled and cpu is None and say is not None:
        say(f"not pinned to a CPU: {why}")
    try:
        yield cpu, why
    finally:
        _restore(before)


def _pin(conns: Sequence[psycopg.Connection]
         ) -> tuple[int | None, str, list[tuple[int, set[int]]]]:
    """(cpu, why not, the affinities to put back)."""
    if not hasattr(os, "sched_setaffinity"):
        return None, "no CPU affinity on this system", []
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        return None, "one CPU only", []
    pids = [local_backend(c) for c in conns]
    if any(p is None for p in pids):
        return None, ("the database server is not a local one whose backends this process "
                      "can tell apart"), []
    cpu = current_cpu()
    if cpu is None or cpu not in mine:
        return None, "the current CPU is unknown", []
    before: list[tuple[int, set[int]]] = []
    try:
        for pid in (0, *pids):
            before.append((pid, os.sched_getaffinity(pid)))
            os.sched_setaffinity(pid, {cpu})
    except OSError as e:
        _restore(before)
        return None, f"cannot set CPU affinity ({e.strerror})", []
    except BaseException:
        _restore(before)
        raise
    return cpu, "", before


def _restore(before: list[tuple[int, set[int]]]) -> None:
    for pid, cpus in before:
        with contextlib.suppress(OSError):  # a backend that has gone needs nothing back
            os.sched_setaffinity(pid, cpus)
