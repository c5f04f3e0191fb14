"""The one summary every benchmark figure gets: median, min and max of its runs."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator


def summarize(values: list[float], digits: int = 1) -> dict:
    """Median, min and max of *values* rounded to *digits*, and how many runs there were."""
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "runs": len(values)}


def proc_stat(pid: int | str) -> tuple[str, list[str]] | None:
    """A process's name and the fields of its ``/proc/<pid>/stat`` after the name (the state
    first, then the parent's pid, ...); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    close = data.rindex(")")
    return data[data.index("(") + 1:close], data[close + 2:].split()


def processes() -> Iterator[tuple[int, str, list[str]]]:
    """Every process of the machine, as (pid, name, ``proc_stat`` fields)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(name)
            if stat is not None:
                yield int(name), stat[0], stat[1]


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, all cores (``/proc/stat``): the
    difference of two readings says how much of the machine was busy in between, whoever
    used it."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal (guest time is inside user and nice)
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of all cores busy between two ``machine_busy_ticks`` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0
