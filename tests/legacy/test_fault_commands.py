"""Faults on command (``legacy run --control-dir``, the chaos suite): a partition between
supernodes and named privileged peers, and a correlated crash."""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionLost

from bridgectl.cmd_legacy import run_control_commands
from legacy.network import MemoryNetwork
from legacy.sim import LegacyDeployment, RunConfig
from legacy.simclock import SimClock
from tests.legacy.netfixture import LegacyNet


def test_cut_peers_drops_and_refuses_only_the_named_peers_until_the_cut_ends():
    net = LegacyNet(2).start()
    sn = sorted(net.directory)[0]
    worker = net.peer(sn, name="demo-worker-1")
    net.supernodes[sn].cut_peers("demo-worker-", 20.0)
    net.run(0.1)
    assert worker.closed.called  # its link dropped at once
    with pytest.raises(ConnectionLost):  # dropped at authentication while the cut lasts
        net.peer(sn, name="demo-worker-2")
    other = net.peer(sn, name="reconciler")  # other peers are not partitioned
    assert not other.closed.called
    assert net.peer(sorted(net.directory)[1], name="demo-worker-1")  # nor other supernodes
    net.run(20.0)
    again = net.peer(sn, name="demo-worker-1")
    assert not again.closed.called


def _deployment(supernodes: int = 6) -> tuple[SimClock, LegacyDeployment]:
    clock = SimClock()
    dep = LegacyDeployment(RunConfig(supernodes=supernodes, users=12, rate=0, duration=60),
                           MemoryNetwork(clock), peer_secret=b"p" * 16, login_secret=b"l" * 16)
    dep.startService()
    clock.run_until(0.0)
    dep.begin()
    return clock, dep


def test_a_correlated_crash_takes_the_fraction_down_and_brings_it_back():
    clock, dep = _deployment()
    done = dep.command({"crash": 0.3, "restart_after": 5.0, "storm": True})
    down = [sn for sn, node in dep.supernodes.items() if node.mem is None]
    assert len(down) == 2 and done.startswith("crashed ") and "storm" in done
    assert sorted(sn for _t, sn in dep.crash_log) == sorted(down)
    clock.run_until(clock.seconds() + 6.0)
    assert all(node.mem is not None for node in dep.supernodes.values())
    dep.stopService()


def test_cut_peers_command_partitions_a_fraction_of_the_supernodes_from_the_prefix():
    clock, dep = _deployment()
    done = dep.command({"cut_peers": 0.5, "seconds": 20.0, "prefix": "demo-worker-"})
    cut = sorted(sn for sn, node in dep.supernodes.items()
                 if node.peer_is_cut("demo-worker-1"))
    assert len(cut) == 3 and done == f"cut peers 'demo-worker-'* off {', '.join(cut)} for 20.0 s"
    assert not any(node.peer_is_cut("reconciler") for node in dep.supernodes.values())
    clock.run_until(clock.seconds() + 20.0)
    assert not any(node.peer_is_cut("demo-worker-1") for node in dep.supernodes.values())
    dep.stopService()


def test_unknown_or_malformed_commands_are_refused_and_removed(tmp_path, capsys):
    _clock, dep = _deployment(2)
    (tmp_path / "1.json").write_text("{not json")
    (tmp_path / "2.json").write_text(json.dumps({"explode": True}))
    (tmp_path / "3.json").write_text(json.dumps({"crash": 0.5, "restart_after": 1}))
    run_control_commands(tmp_path, dep)
    err = capsys.readouterr().err
    assert err.count("control: refused") == 2 and "control: crashed sn000" in err
    assert list(tmp_path.iterdir()) == []
    dep.stopService()
