"""Legacy network benchmarks (not a test): prints one JSON line.

1. The in-memory simulation: events (traced) and frames per wall second, and simulated
   seconds per wall second, at a medium size (median of 3 runs), and at 1,000 supernodes /
   100,000 users in phases (``bench_phases``): the setup (building the population, then
   the first ``SETTLE_S`` simulated seconds, in which every device logs in and every
   supernode links to the others) apart from the steady state after it (``STEADY_S``
   simulated seconds of traffic, churn and one presence refresh round of every user).
2. Frames per second one supernode decodes and dispatches over loopback TCP, next to the
   ceiling measured in the same run: a bare Twisted ``Int32StringReceiver`` that only counts.
   The server runs in a subprocess (its own core); this process blasts pre-encoded frames.

Usage: python bench/bench_legacy.py [--quick] [--big-only]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

from prometheus_client import REGISTRY

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_stats import summarize  # noqa: E402  (this script's directory is on sys.path)

from legacy import auth, wire  # noqa: E402
from legacy.network import MemoryNetwork  # noqa: E402
from legacy.sim import LegacyDeployment, RunConfig, few_collections, simulate  # noqa: E402
from legacy.simclock import SimClock  # noqa: E402

PEER_SECRET = b"bench-peer-secret-0123456789"
N_FRAMES = 200_000
#: Simulated seconds of setup: logins are spread over the first 5 s, retries follow.
SETTLE_S = 10.0
#: Simulated seconds of steady state: one refresh interval (40 s), so one refresh round of
#: every online user's presence falls inside it.
STEADY_S = 40.0
BIG = RunConfig(supernodes=1000, users=100_000, rate=500, duration=SETTLE_S + STEADY_S, seed=1)


def _frames_total() -> float:
    return REGISTRY.get_sample_value("legacy_frames_received_total") or 0.0


def bench_sim(config: RunConfig) -> dict:
    before = _frames_total()
    out = simulate(config)
    frames = _frames_total() - before
    wall = out["wall_seconds"]
    return {"events_per_s": out["events"] / wall, "frames_per_s": frames / wall,
            "sim_seconds_per_wall_second": config.duration / wall, "wall_seconds": wall,
            "events": out["events"], "frames": frames, "sent": out["sent"]}


def bench_phases(config: RunConfig, settle: float = SETTLE_S,
                 steady: float = STEADY_S) -> dict:
    """The setup and the steady state of one run, timed apart.

    ``setup``: building the deployment (accounts, devices) and the first *settle* simulated
    seconds (every login, every supernode link); ``steady``: the *steady* simulated seconds
    after it, with traffic and churn going on (no heal: faults and traffic never stop).
    """
    t0 = time.perf_counter()
    clock = SimClock()
    dep = LegacyDeployment(config, MemoryNetwork(clock), peer_secret=b"sim-peer",
                           login_secret=b"sim-login")
    built = time.perf_counter()
    out: dict = {"build_seconds": round(built - t0, 1)}
    with few_collections():
        dep.startService()
        clock.run_until(0.0)
        dep.begin()
        for phase, until in (("setup", settle), ("steady", settle + steady)):
            frames, events, sent = _frames_total(), dep.trace.events, len(dep.stats.sent)
            start = time.perf_counter()
            clock.run_until(until)
            wall = time.perf_counter() - start
            sim = until - (0.0 if phase == "setup" else settle)
            out[phase] = {
                "simulated_seconds": sim, "wall_seconds": round(wall, 1),
                "sim_seconds_per_wall_second": round(sim / wall, 3),
                "frames_per_s": round((_frames_total() - frames) / wall),
                "events_per_s": round((dep.trace.events - events) / wall),
                "messages_sent": len(dep.stats.sent) - sent}
        dep.stopService()
    out["setup"]["wall_seconds_with_build"] = round(out["setup"]["wall_seconds"]
                                                    + out["build_seconds"], 1)
    return out


def big_result(runs: list[dict]) -> dict:
    """The 1,000-supernode case: steady-state and setup figures, medians over *runs*."""
    return {
        "supernodes": BIG.supernodes, "users": BIG.users, "rate": BIG.rate, "runs": len(runs),
        "steady_simulated_seconds": STEADY_S, "setup_simulated_seconds": SETTLE_S,
        "sim_seconds_per_wall_second": summarize(
            [r["steady"]["sim_seconds_per_wall_second"] for r in runs], 3),
        "steady_frames_per_s": summarize([r["steady"]["frames_per_s"] for r in runs], 0),
        "steady_events_per_s": summarize([r["steady"]["events_per_s"] for r in runs], 0),
        "setup_wall_seconds": summarize(
            [r["setup"]["wall_seconds_with_build"] for r in runs], 1),
        "setup_sim_seconds_per_wall_second": summarize(
            [r["setup"]["sim_seconds_per_wall_second"] for r in runs], 3),
        "phases": runs,
    }


# -- TCP decode benchmark -------------------------------------------------------------------------

def serve(kind: str, port: int) -> None:
    """Subprocess: a supernode (kind=sn) or a bare counting receiver (kind=bare) on *port*."""
    import random

    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import Int32StringReceiver

    from legacy.faults import PRESETS, HopFaults
    from legacy.network import TCPNetwork
    from legacy.ring import HashRing
    from legacy.supernode import Secrets, Supernode, SupernodeConfig
    from legacy.trace import Trace

    if kind == "bare":
        class Bare(Int32StringReceiver):
            MAX_LENGTH = wire.MAX_FRAME_BYTES
            n = 0

            def stringReceived(self, data: bytes) -> None:  # noqa: N802
                self.n += 1
                if data == b"END":
                    self.sendString(str(self.n).encode())

        reactor.listenTCP(port, Factory.forProtocol(Bare), interface="127.0.0.1")
    else:
        addr = wire.SupernodeAddress(sn_id="sn0", host="127.0.0.1", port=port)
        sn = Supernode(SupernodeConfig(sn_id="sn0", port=port), network=TCPNetwork(reactor),
                       ring=HashRing(["sn0"]), directory={"sn0": addr},
                       secrets=Secrets(peer_secret=PEER_SECRET, login_secret=b"l" * 16),
                       hop_faults=HopFaults(PRESETS["none"], random.Random(0)),
                       trace=Trace(reactor), rng=random.Random(0))
        sn.startService()
    print("ready", flush=True)
    reactor.run()


def _read_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf
    (n,) = struct.unpack(">I", exactly(4))
    return exactly(n)


def _prefixed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def blast(kind: str, port: int) -> float:
    """Frames per second the server on *port* handled (time to its answer to the last)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if kind == "sn":
        challenge = wire.decode(_read_frame(sock))
        sock.sendall(_prefixed(wire.encode(wire.PeerAuth(
            role="peer", name="bench",
            proof=auth.peer_proof(PEER_SECRET, challenge.nonce, "peer", "bench")))))
        assert isinstance(wire.decode(_read_frame(sock)), wire.Welcome)
        sock.sendall(_prefixed(wire.encode(wire.FeedSubscribe(epoch=0, offset=0, window=0))))
        assert isinstance(wire.decode(_read_frame(sock)), wire.FeedStatus)
        one = _prefixed(wire.encode(wire.FeedCredit(count=0)))
        end = _prefixed(wire.encode(wire.ChatsRequest(req_id=1, after="", limit=1)))
    else:
        one = _prefixed(wire.encode(wire.FeedCredit(count=0)))
        end = _prefixed(b"END")
    payload = one * N_FRAMES + end
    t0 = time.perf_counter()
    sock.sendall(payload)
    _read_frame(sock)
    elapsed = time.perf_counter() - t0
    sock.close()
    return (N_FRAMES + 1) / elapsed


def bench_tcp(kind: str, port: int, runs: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        return [blast(kind, port) for _ in range(runs)]
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    quick = "--quick" in sys.argv
    if "--big-only" in sys.argv:
        print(json.dumps({"sim_1000sn_100k_users": big_result([bench_phases(BIG)])}))
        return
    runs = 3
    medium = RunConfig(supernodes=100, users=10_000, rate=200, duration=20, seed=1)
    medium_runs = [bench_sim(medium) for _ in range(1 if quick else runs)]
    result: dict = {
        "sim_medium": {"supernodes": 100, "users": 10_000, "simulated_seconds": 20,
                       "events_per_s": summarize([r["events_per_s"] for r in medium_runs]),
                       "frames_per_s": summarize([r["frames_per_s"] for r in medium_runs]),
                       "sim_seconds_per_wall_second":
                           summarize([r["sim_seconds_per_wall_second"]
                                      for r in medium_runs], 2)},
    }
    if not quick:
        result["sim_1000sn_100k_users"] = big_result([bench_phases(BIG)])
    sn = bench_tcp("sn", 47950, runs)
    bare = bench_tcp("bare", 47951, runs)
    sn_med, bare_med = statistics.median(sn), statistics.median(bare)
    result["tcp_decode"] = {
        "supernode_frames_per_s": {"median": round(sn_med), "min": round(min(sn)),
                                   "max": round(max(sn)), "runs": runs},
        "bare_twisted_frames_per_s": {"median": round(bare_med), "min": round(min(bare)),
                                      "max": round(max(bare)), "runs": runs},
        "ratio_to_bare": round(sn_med / bare_med, 3),
        "frames_per_run": N_FRAMES,
        "frame": "FeedCredit on an authenticated peer connection, 10 bytes with prefix",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
