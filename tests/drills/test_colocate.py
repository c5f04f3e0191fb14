"""A simulation and its database backends pinned to one CPU (``drills.colocate``), only
where the backends are provably this machine's and ours, and put back afterwards."""

from __future__ import annotations

import os

import psycopg
import pytest

from drills import colocate


def test_the_process_and_its_backends_share_one_cpu_and_get_their_affinities_back(db_dsn):
    with psycopg.connect(db_dsn) as a, psycopg.connect(db_dsn) as b:
        pids = [a.info.backend_pid, b.info.backend_pid]
        before = {pid: os.sched_getaffinity(pid) for pid in (0, *pids)}
        pinnable = all(colocate.local_backend(c) == c.info.backend_pid for c in (a, b))
        host = a.info.host or ""
        if host.startswith("/") or host in colocate._LOOPBACK:
            # the test servers (embedded, or the machine's own) are this machine's: their
            # backends are found, over a Unix socket and over the loopback address alike
            assert pinnable
        said: list[str] = []
        with colocate.pinned([a, b], say=said.append) as (cpu, why):
            during = {pid: os.sched_getaffinity(pid) for pid in (0, *pids)}
        # told why only when nothing was pinned
        assert said == ([] if cpu is not None else [f"not pinned to a CPU: {why}"])
        if len(before[0]) < 2:
            assert (cpu, why) == (None, "one CPU only")
        elif pinnable:
            assert cpu in before[0] and why == ""
            assert during == {pid: {cpu} for pid in (0, *pids)}
        else:  # a server elsewhere, or not ours to pin: nothing touched, and it says why
            assert cpu is None and why
            assert during == before
        assert {pid: os.sched_getaffinity(pid) for pid in (0, *pids)} == before
        # the connections still work, from anywhere
        assert a.execute("SELECT 1").fetchone() == (1,)


def test_nothing_is_pinned_when_not_asked(db_dsn):
    with psycopg.connect(db_dsn) as a:
        before = os.sched_getaffinity(0), os.sched_getaffinity(a.info.backend_pid)
        said: list[str] = []
        with colocate.pinned([a], enabled=False, say=said.append) as (cpu, why):
            assert (cpu, why) == (None, "not asked") and said == []
            assert (os.sched_getaffinity(0), os.sched_getaffinity(a.info.backend_pid)
                    ) == before


@pytest.mark.parametrize("cmdline,ours", [
    ("postgres: postgres bridge_sim [local] idle", True),
    ("postgres: 15/main: postgres bridge_sim [local] idle in transaction", True),
    ("postgres: postgres bridge_sim 127.0.0.1(5001) idle", False),  # another client
    ("postgres: postgres bridge_sim ::1(5000) idle", False),  # another client (IPv6)
    ("postgres: postgres bridge_other [local] idle", False),  # another database
    ("postgres: alice bridge_sim [local] idle", False),  # another user
    ("postgres: checkpointer", False),
    ("python -m bridgectl simulate", False),  # a pid reused, or another namespace's
    ("", False),
])
def test_only_a_process_that_shows_as_this_connections_backend_is_taken_for_it(cmdline,
                                                                                  ours):
    assert colocate.shows_as_backend(cmdline, "postgres", "bridge_sim", "[local]") is ours
    for client in ("127.0.0.1(5000)", "::1(5001)"):
        assert colocate.shows_as_backend(cmdline.replace("[local]", client), "postgres",
                                         "bridge_sim", client) is ours
