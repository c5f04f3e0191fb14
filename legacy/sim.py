"""A whole legacy network with its traffic and faults, on either runtime.

``LegacyDeployment`` builds the login server, the supernodes, the population and the fault
schedule over any ``Network``. ``simulate`` runs it on a ``SimClock`` and an in-memory network
(seconds of simulated time in far less wall time, one seed -> one trace hash); ``run_tcp``
runs the same code over loopback TCP with a real reactor.

A run with a duration has three phases::

    0 ........ traffic and faults ........ heal_at ...... drain (no faults) ...... end
    logins spread over the first seconds   crashed SNs restarted, sends retried, summary
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Iterator
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from legacy import auth, wire
from legacy.client import Device, TrafficStats
from legacy.faults import PRESETS, FaultPlan, HopFaults
from legacy.login import LoginServer
from legacy.network import MemoryNetwork, Network, TCPNetwork
from legacy.ring import HashRing
from legacy.simclock import SimClock
from legacy.supernode import Secrets, Supernode, SupernodeConfig
from legacy.trace import Trace
from legacy.traffic import TrafficGenerator, WorkloadConfig, build_population
from legacy.versions import normalize, parse_spread
from servicekit.sleep import sleep

log = Logger()


@attrs.frozen
class RunConfig:
    """One run of the legacy network. Validated here so every front end gets the same errors."""

    supernodes: int = 8
    users: int = 200
    rate: float = 20.0
    faults: str = "none"
    seed: int = 1
    host: str = "127.0.0.1"
    base_port: int = 47100
    login_port: int = 0  # 0: base_port + supernodes
    duration: float | None = 60.0
    password_iterations: int = 100
    feed_capacity: int = 10_000
    presence_ttl: float = 120.0
    refresh_interval: float = 40.0
    sweep_interval: float = 10.0
    fault_window: float | None = None  # None: until heal_at (600 s without a duration)
    #: the devices' client versions, e.g. "7.1:0.2,8.0:0.8" (legacy.versions); "": none
    client_versions: str = ""
    #: a minimum client version for everyone from the start ("": none), e.g. "8.0"
    min_version: str = ""

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.supernodes <= 5000:
            raise ValueError("--supernodes must be between 1 and 5000")
        if not 2 <= self.users <= 1_000_000:
            raise ValueError("--users must be between 2 and 1000000")
        if not 0 <= self.rate <= 100_000:
            raise ValueError("--rate must be between 0 and 100000 messages per second")
        if self.faults not in PRESETS:
            raise ValueError(f"--faults must be one of {', '.join(PRESETS)}")
        if self.duration is not None and not 0 < self.duration <= 30 * 86400:
            raise ValueError("--duration must be positive (and at most 30 days)")
        last = self.base_port + self.supernodes
        if not 1 <= self.base_port or last > 65535:
            raise ValueError("--port leaves no room for the supernodes below 65536")
        if self.seed < 0:
            raise ValueError("--seed must not be negative")
        if self.fault_window is not None and not 0 < self.fault_window <= 30 * 86400:
            raise ValueError("--fault-window must be positive")
        if self.client_versions:
            try:
                parse_spread(self.client_versions)
            except ValueError as e:
                raise ValueError(f"--client-versions: {e}") from None
        if self.min_version:
            try:
                normalize(self.min_version)
            except ValueError as e:
                raise ValueError(f"--min-version: {e}") from None

    @property
    def plan(self) -> FaultPlan:
        return PRESETS[self.faults]

    @property
    def heal_at(self) -> float | None:
        """When faults and traffic stop, leaving time for retries and holds to settle."""
        if self.duration is None:
            return None
        return self.duration - min(30.0, max(self.duration * 0.3, 0.0))


class LegacyDeployment(service.MultiService):
    """The login server, the supernodes, the population and the faults of one run."""

    def __init__(self, config: RunConfig, network: Network, *, peer_secret: bytes,
                 login_secret: bytes, run_id: int | None = None) -> None:
        """*run_id* is mixed into every supernode epoch (``incarnation_epoch``): a TCP run
        passes a fresh one, so a network started again with the same seed never reuses an
        epoch; None takes one from the seed, so a simulation stays one seed, one trace."""
        super().__init__()
        self.config = config
        self.network = network
        self.clock: IReactorTime = network.clock
        self.trace = Trace(self.clock)
        root = random.Random(config.seed)
        # Separate streams so that, e.g., adding a fault does not reshuffle the population.
        self.rng_population = random.Random(root.getrandbits(64))
        self.rng_traffic = random.Random(root.getrandbits(64))
        self.rng_faults = random.Random(root.getrandbits(64))
        self.rng_nodes = random.Random(root.getrandbits(64))
        self.rng_devices = random.Random(root.getrandbits(64))
        self.run_id = root.getrandbits(64) if run_id is None else run_id
        self.secrets = Secrets(peer_secret=peer_secret, login_secret=login_secret)
        self.hop_faults = HopFaults(config.plan, self.rng_faults)
        self.stats = TrafficStats()
        ids = [f"sn{i:04d}" for i in range(config.supernodes)]
        self.directory = {sn: wire.SupernodeAddress(sn_id=sn, host=config.host,
                                                    port=config.base_port + i)
                          for i, sn in enumerate(ids)}
        self.ring = HashRing(ids)
        self.supernodes: dict[str, Supernode] = {}
        for sn in ids:
            node = Supernode(
                SupernodeConfig(sn_id=sn, host=config.host, port=self.directory[sn].port,
                                feed_capacity=config.feed_capacity,
                                presence_ttl=config.presence_ttl,
                                refresh_interval=config.refresh_interval,
                                sweep_interval=config.sweep_interval),
                network=network, ring=self.ring, directory=self.directory,
                secrets=self.secrets, hop_faults=self.hop_faults, trace=self.trace,
                rng=random.Random(self.rng_nodes.getrandbits(64)), run_id=self.run_id)
            self.supernodes[sn] = node
            node.setServiceParent(self)
        login_port = config.login_port or config.base_port + config.supernodes
        self.login = LoginServer(network=network, host=config.host, port=login_port,
                                 secrets=self.secrets, directory=self.directory,
                                 rng=random.Random(self.rng_nodes.getrandbits(64)))
        self.login.setServiceParent(self)
        if config.min_version:
            self.login.set_min_version("", config.min_version)
        self.workload = WorkloadConfig(users=config.users, rate=config.rate)
        users, self.chats = build_population(self.workload, self.rng_population)
        salt_rng = random.Random(self.rng_population.getrandbits(64))
        self.devices: dict[str, list[Device]] = {}
        # a stream of its own: a run without versions keeps the traces it always had
        spread = parse_spread(config.client_versions) if config.client_versions else None
        rng_versions = random.Random(f"client-versions:{config.seed}")
        for u in users:
            self.login.add_account(u.handle, auth.hash_password(
                u.password, salt=salt_rng.randbytes(16), iterations=config.password_iterations))
            n = 1 + (self.rng_population.random() < self.workload.second_device_share)
            self.devices[u.handle] = [
                Device(u, f"d{k}", network=network, login_host=config.host,
                       login_port=login_port, rng=random.Random(self.rng_devices.getrandbits(64)),
                       stats=self.stats, trace=self.trace,
                       version=None if spread is None else spread.pick(rng_versions))
                for k in range(n)]
        self.traffic = TrafficGenerator(self.workload, self.chats, self.devices, self.clock,
                                        self.rng_traffic)
        self.crashes = 0
        self.crash_log: list[tuple[float, str]] = []  # (seconds since begin, sn id)
        self._fault_calls: list[Any] = []
        self._down: dict[str, None] = {}
        self.started_at = 0.0

    # -- phases --------------------------------------------------------------------------------

    def begin(self) -> None:
        """After the services listen: logins, traffic, and (until heal) faults."""
        self.started_at = self.clock.seconds()
        self.traffic.start_sessions()
        self.traffic.start_sending()
        self._schedule_faults()

    def heal(self) -> None:
        """Stop traffic and every fault; restart what is down so the network can settle."""
        self.trace.record("heal")
        self.traffic.stop_sending()
        self.traffic.stop_churn()
        self.hop_faults.heal()
        for call in self._fault_calls:
            if call.active():
                call.cancel()
        self._fault_calls.clear()
        for sn in list(self._down):
            self._restart(sn)

    # -- faults ---------------------------------------------------------------------------------

    def _schedule_faults(self) -> None:
        plan = self.config.plan
        if not plan.any:
            return
        window = self.config.fault_window or self.config.heal_at or 600.0
        rng = self.rng_faults
        at = self._fault_calls.append

        def every(interval: float, fn: Any) -> None:
            t = rng.expovariate(1.0 / interval)
            while t < window:
                at(self.clock.callLater(t, fn))
                t += rng.expovariate(1.0 / interval)

        if plan.crash_interval:
            every(plan.crash_interval, self._crash_one)
        if plan.link_drop_interval:
            every(plan.link_drop_interval, self.drop_link)
        if plan.partition_at >= 0:
            at(self.clock.callLater(window * plan.partition_at, self._partition))
        if plan.correlated_crash_at >= 0:
            at(self.clock.callLater(window * plan.correlated_crash_at, self._correlated_crash))
        if plan.relogin_storm_at >= 0:
            at(self.clock.callLater(window * plan.relogin_storm_at, self._storm))

    def down_supernodes(self) -> list[str]:
        """The supernodes crashed and not restarted yet."""
        return list(self._down)

    def running_supernodes(self) -> list[str]:
        return [sn for sn in self.supernodes if sn not in self._down]

    def crash(self, sn: str, restart_after: float) -> None:
        """Crash supernode *sn* (its memory is lost) and restart it *restart_after* s later."""
        self._down[sn] = None
        self.crashes += 1
        self.crash_log.append((self.clock.seconds() - self.started_at, sn))
        self.supernodes[sn].crash()
        self._fault_calls.append(self.clock.callLater(restart_after, self._restart, sn))

    def _restart(self, sn: str) -> None:
        if sn in self._down:
            del self._down[sn]
            self.supernodes[sn].restart()

    def _crash_one(self) -> None:
        running = self.running_supernodes()
        if len(running) > 1:
            self.crash(running[self.rng_faults.randrange(len(running))],
                        self.config.plan.restart_after)

    def _correlated_crash(self) -> None:
        running = self.running_supernodes()
        n = int(len(running) * self.config.plan.correlated_fraction)
        self.trace.record("correlated_crash", n)
        for sn in self.rng_faults.sample(running, n):
            self.crash(sn, self.config.plan.restart_after * 2)

    def drop_link(self) -> bool:
        """Abort one connection of a running supernode, chosen at random; False if none."""
        running = self.running_supernodes()
        if not running:
            return False
        node = self.supernodes[running[self.rng_faults.randrange(len(running))]]
        conns = list(node._conns)
        if not conns:
            return False
        victim = conns[self.rng_faults.randrange(len(conns))]
        self.trace.record("link_drop", node.sn_id, victim.role, victim.handle)
        victim.transport.abortConnection()
        return True

    def _partition(self) -> None:
        ids = list(self.supernodes)
        side = frozenset(self.rng_faults.sample(ids, len(ids) // 2))
        self.trace.record("partition", len(side))
        self.hop_faults.partition(side, frozenset(ids) - side)
        self._fault_calls.append(self.clock.callLater(self.config.plan.partition_seconds,
                                                      self._unpartition))

    def _unpartition(self) -> None:
        self.trace.record("unpartition")
        self.hop_faults.unpartition()

    def _storm(self) -> None:
        self.trace.record("relogin_storm")
        self.traffic.relogin_storm()

    # -- faults on command (``legacy run --control-dir``: the chaos suite) -------------------

    def command(self, cmd: dict[str, Any]) -> str:
        """Run one fault command; returns what it did (for the log).

        ``{"crash": F, "restart_after": S, "storm": bool}``: crash a fraction F of the
        running supernodes at once, restart them after S seconds, and optionally make every
        online device log in again; ``{"cut_peers": F, "seconds": S, "prefix": P}``:
        partition a fraction F of the supernodes from the privileged peers named P* for S
        seconds.
        """
        if "crash" in cmd:
            running = self.running_supernodes()
            n = max(1, round(len(running) * float(cmd["crash"])))
            victims = self.rng_faults.sample(running, min(n, len(running)))
            for sn in victims:
                self.crash(sn, float(cmd.get("restart_after", 5.0)))
            if cmd.get("storm"):
                self._fault_calls.append(self.clock.callLater(
                    float(cmd.get("restart_after", 5.0)) + 0.5, self._storm))
            return f"crashed {', '.join(sorted(victims))}" + (
                "; re-login storm after the restart" if cmd.get("storm") else "")
        if "cut_peers" in cmd:
            ids = sorted(self.supernodes)
            n = max(1, round(len(ids) * float(cmd["cut_peers"])))
            side = self.rng_faults.sample(ids, n)
            for sn in side:
                self.supernodes[sn].cut_peers(str(cmd.get("prefix", "")),
                                              float(cmd.get("seconds", 20.0)))
            return f"cut peers {cmd.get('prefix', '')!r}* off {', '.join(sorted(side))} " \
                   f"for {cmd.get('seconds', 20.0)} s"
        raise ValueError(f"unknown command {cmd!r}")

    # -- summary --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The figures of the run, from the clients' own records and the supernodes' holds."""
        stats = self.stats
        expected = {(g, r) for g, rs in stats.sent.items() for r in rs}
        delivered = stats.delivered & expected
        held = set()
        for node in self.supernodes.values():
            held |= node.held_pairs()
        held_offline = len((held & expected) - delivered)
        return {
            "supernodes": self.config.supernodes,
            "users": self.config.users,
            "faults": self.config.faults,
            "seed": self.config.seed,
            "sent": len(stats.sent),
            "acked": len(stats.acked & set(stats.sent)),
            "expected_deliveries": len(expected),
            "delivered": len(delivered),
            "held_offline": held_offline,
            "lost_to_faults": len(expected) - len(delivered) - held_offline,
            "gave_up": stats.gave_up,
            "login_upgrade_required": stats.login_upgrade_required,
            "presence_changes": sum(n.presence_changes for n in self.supernodes.values()),
            "presence_notices": stats.presence_notices,
            "sn_crashes": self.crashes,
            "hop_frames_lost": self.hop_faults.lost,
            "hop_frames_duplicated": self.hop_faults.duplicated,
            "events": self.trace.events,
            "trace_hash": self.trace.hexdigest(),
        }

    def record(self) -> dict[str, Any]:
        """The clients' own record of what the network acknowledged, for an outside check.

        ``acked``: ``[guid, chat id, home supernode, seconds since begin]`` per acknowledged
        message; ``crashes``: ``[seconds since begin, supernode]``; ``epochs``: supernode ->
        the epoch of each of its incarnations. A checker uses them to tell the network's own
        losses (a home supernode that crashed after acknowledging, losing its memory) from
        losses anyone else caused.
        """
        stats, t0 = self.stats, self.started_at
        acked = sorted(g for g in stats.acked if g in stats.sent)
        return {
            "acked": [[g, stats.chat_of[g], self.ring.home_of(stats.chat_of[g]),
                       round(stats.acked_at.get(g, t0) - t0, 3)] for g in acked],
            "crashes": [[round(t, 3), sn] for t, sn in self.crash_log],
            "epochs": {sn: list(node.epochs) for sn, node in sorted(self.supernodes.items())},
        }


#: Net new container objects between two collections of the youngest generation, in a big
#: simulation (``few_collections``). 1,000,000 against 100,000: the 40 simulated s of steady
#: state of 1,000 supernodes and 100,000 users took 47.3 wall s against 51.3, the two builds
#: side by side on one core each (the same trace); the collector's own time 1.9-3.0 s
#: against 6.7. 3.1 s of those 6.7 were one collection of the middle generation, which the
#: larger threshold puts off past the 40 s: a longer run pays it ten times as large a tenth
#: as often, so part of the gain is deferred.
YOUNG_COLLECTION = 1_000_000


@contextlib.contextmanager
def few_collections() -> Iterator[None]:
    """Run a big simulation with the cyclic garbage collector mostly out of the way.

    A simulation holds millions of long-lived objects (connections, links, presence) and
    allocates frames and timers without pause; with the default thresholds the collector
    walks the young generations every 700 allocations and the whole heap every time it
    grows by a quarter. What exists when the run starts is frozen (never walked again) and
    the thresholds are raised; cyclic garbage (closed connections) is still collected, less
    often. The collector decides nothing in a run, so the trace does not change.

    The youngest generation is collected every ``YOUNG_COLLECTION`` objects: in the steady
    state of 1,000 supernodes a collection of 100,000 took 130 ms, against 9 ms early in the
    setup (probably cache misses: young objects point into a heap of gigabytes), most of it
    for objects that were going to live on anyway.
    """
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION, 50, 50)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def simulate(config: RunConfig, *, peer_secret: bytes = b"sim-peer",
             login_secret: bytes = b"sim-login") -> dict[str, Any]:
    """Run *config* on the deterministic in-memory network; returns the summary."""
    if config.duration is None:
        raise ValueError("a simulation needs a duration")
    clock = SimClock()
    network = MemoryNetwork(clock)
    dep = LegacyDeployment(config, network, peer_secret=peer_secret, login_secret=login_secret)
    wall = time.perf_counter()
    with few_collections():
        dep.startService()
        clock.run_until(0.0)
        dep.begin()
        clock.run_until(config.heal_at)
        dep.heal()
        clock.run_until(config.duration)
        out = dep.summary()
        dep.stopService()
        clock.run_until(config.duration + 1.0)
    wall = time.perf_counter() - wall
    out["simulated_seconds"] = config.duration
    out["wall_seconds"] = round(wall, 3)
    out["events_per_s"] = round(out["events"] / wall, 1) if wall > 0 else None
    return out


@defer.inlineCallbacks
def run_tcp(reactor: Any, config: RunConfig, *, peer_secret: bytes, login_secret: bytes,
            run_id: int, on_listening: Any = None, stop_signal: defer.Deferred | None = None,
            heal_signal: defer.Deferred | None = None, on_done: Any = None) -> Any:
    """Run *config* over loopback TCP with *reactor*; fires with the summary.

    *run_id* must be new for every run (the CLI draws one from ``secrets``): it makes the
    supernodes' epochs differ from those of any earlier run with the same seed.
    Without a duration the run lasts until *stop_signal* fires (Ctrl-C in the CLI).
    *heal_signal* firing heals early (traffic and faults stop, crashed supernodes restart)
    while the network keeps serving until the run ends. *on_done(dep)* is called before the
    services stop, e.g. to write the clients' record.
    """
    network = TCPNetwork(reactor)
    dep = LegacyDeployment(config, network, peer_secret=peer_secret, login_secret=login_secret,
                           run_id=run_id)
    wall = time.perf_counter()
    try:
        yield defer.gatherResults([defer.maybeDeferred(s.startService) for s in dep],
                                  consumeErrors=True)
    except defer.FirstError as e:
        # Stop what did start (ports that did open), then report the first real cause.
        yield defer.maybeDeferred(dep.stopService)
        e.subFailure.raiseException()
    dep.running = 1
    if on_listening is not None:
        on_listening(dep)
    dep.begin()
    healed = False

    def heal(_: Any = None) -> None:
        nonlocal healed
        if not healed:
            healed = True
            dep.heal()

    if heal_signal is not None:
        heal_signal.addCallback(heal)
    if config.duration is not None:
        yield sleep(reactor, config.heal_at)
        heal()
        yield sleep(reactor, config.duration - config.heal_at)
    else:
        yield stop_signal
        heal()
    out = dep.summary()
    if on_done is not None:
        on_done(dep)
    yield dep.stopService()
    out["wall_seconds"] = round(time.perf_counter() - wall, 3)
    return out
