"""A simulation and its database backends on one CPU.

A simulation is one thread that waits on its PostgreSQL backend for every statement, in turn:
the two never run at once. On a virtual machine, waking a process on the other CPU is slow;
here a ``SELECT 1`` round trip took 60 µs between CPUs and 15 µs on one, and a simulated day
of 2,000 users runs about a fifth faster with the process and its two backends pinned to the
CPU it started on.

Pinning is done only where it is safe to: Linux, a server on this machine (a Unix socket or
the loopback address), and a backend whose process this machine shows as that server's
backend for our user and database (so a pid from another PID namespace is never touched).
Anything else leaves every affinity as it was and says why. The affinities are put back
afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def current_cpu() -> int | None:
    """The CPU this process last ran on (``/proc/self/stat`` field 39), or None."""
    try:
        stat = Path("/proc/self/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[36])  # field 39 counted from 1; fields[0] is the 3rd
    except (IndexError, ValueError):
        return None


def local_backend(conn: psycopg.Connection) -> int | None:
    """The pid of *conn*'s backend if it runs on this machine and shows as ours; else None."""
    info = conn.info
    host = info.host or ""
    if host.startswith("/"):
        client = "[local]"
    elif host in _LOOPBACK:
        try:
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                addr, port = sock.getsockname()[:2]
        except OSError:
            return None
        client = f"{addr}({port})"
    else:
        return None
    pid = info.backend_pid
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return None
    return pid if shows_as_backend(cmdline, info.user, info.dbname, client) else None


def shows_as_backend(cmdline: str, user: str, dbname: str, client: str) -> bool:
    """Whether a process's command line is a PostgreSQL backend of *user* on *dbname* for
    *client* (``[local]``, or an address and port such as ``127.0.0.1(5432)``). A backend
    names itself ``postgres: [cluster name:] <user> <database> <client> <state>``."""
    words = cmdline.split()
    if words[1:2] and words[1].endswith(":"):
        del words[1]
    return words[:4] == ["postgres:", user, dbname, client]


@contextlib.contextmanager
def pinned(conns: Sequence[psycopg.Connection], enabled: bool = True
           ) -> Iterator[tuple[int | None, str]]:
    """Pin this process and the backends of *conns* to the CPU it runs on, for the block.

    Yields ``(cpu, why)``: the CPU, or None and the reason nothing was pinned."""
    if not enabled:
        yield None, "not asked"
        return
    if not hasattr(os, "sched_setaffinity"):
        yield None, "no CPU affinity on this system"
        return
    pids = [local_backend(c) for c in conns]
    if any(p is None for p in pids):
        yield None, "the database server is not a local one whose backends this process sees"
        return
    cpu = current_cpu()
    mine = os.sched_getaffinity(0)
    if cpu is None or cpu not in mine or len(mine) < 2:
        yield None, "one CPU only" if len(mine) < 2 else "the current CPU is unknown"
        return
    before: list[tuple[int, set[int]]] = []
    try:
        for pid in (0, *pids):
            before.append((pid, os.sched_getaffinity(pid)))
            os.sched_setaffinity(pid, {cpu})
    except OSError as e:
        _restore(before)
        yield None, f"cannot set CPU affinity ({e.strerror})"
        return
    try:
        yield cpu, ""
    finally:
        _restore(before)


def _restore(before: list[tuple[int, set[int]]]) -> None:
    for pid, cpus in before:
        with contextlib.suppress(OSError):  # a backend that has gone needs nothing back
            os.sched_setaffinity(pid, cpus)
