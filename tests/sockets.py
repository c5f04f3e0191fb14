"""Sockets for the tests: which addresses a process listens on, read from /proc (Linux), for
the tests that check every server binds 127.0.0.1 unless told otherwise. (Ports free now,
for the tests that start servers on real TCP, are the harness's: ``drills.ports``.)"""

from __future__ import annotations

import os
import socket
import struct


def _inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            found.add(link[len("socket:["):-1])
    return found


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket *pid* listens on, IPv4 and IPv6."""
    inodes = _inodes(pid)
    out = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order
            words = struct.unpack("<" + "I" * (len(raw) // 4), raw)
            packed = struct.pack(">" + "I" * len(words), *words)
            out.append((socket.inet_ntop(family, packed), int(port_hex, 16)))
    return sorted(out)

