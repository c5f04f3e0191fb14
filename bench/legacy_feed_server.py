"""Benchmark helper (a separate process): a legacy network over TCP with a feed to mirror.

    python bench/legacy_feed_server.py BASE_PORT SUPERNODES backlog MESSAGES
    python bench/legacy_feed_server.py BASE_PORT SUPERNODES live RATE

``backlog`` appends MESSAGES legacy messages to the home supernodes' feeds before the bridge
starts (what a bridge meets after an outage: pure drain speed); ``live`` appends one message
to every chat first (so the bridge has created the chats and accounts before the load), then
RATE messages per second from SIGUSR1 to SIGUSR2 (what lag looks like under load:
the benchmark sends it once the bridge has stored the warm-up, so a start-up catch-up is not
counted as lag under load).

Messages are appended through each home supernode's own ``accept``, with no simulated
clients; routing them on to their recipients and the sim's event trace are switched off (in
``live`` mode, each chat's range digests too), because in a real deployment the legacy
network does that work on its own machines, not on the cores the bridge and PostgreSQL share
here. The feed frames the bridge reads are the same. Its garbage collector is off (see ``main``).

Prints ``ready N`` on stdout (N: messages in the feeds) when the feeds are full (backlog) or
warmed up and ready to flow (live); runs until killed. Uses the peer secret of $BRIDGE_HOME.
"""

from __future__ import annotations

import gc
import os
import random
import secrets
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import attrs  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from bridge import state  # noqa: E402
from legacy.network import TCPNetwork  # noqa: E402
from legacy.sim import LegacyDeployment, RunConfig  # noqa: E402
from legacy.supernode.state import ChatState  # noqa: E402


class _NoDigests:
    """A chat's range digests, not kept: adding and dropping messages does nothing, and
    anything else (a digest asked for) raises."""

    def add(self, msg: Any) -> None:
        return None

    def remove(self, msg: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"legacy_feed_server keeps no chat digests (asked for {name!r})")


def main() -> None:
    base, sns, mode, amount = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    home = state.state_home()
    config = RunConfig(supernodes=sns, users=2000, rate=0, duration=None, base_port=base,
                       feed_capacity=1_000_000)
    dep = LegacyDeployment(config, TCPNetwork(reactor), peer_secret=state.secret(home, "peer"),
                           login_secret=state.secret(home, "login"),
                           run_id=secrets.randbits(64))  # fresh epochs for every run
    # The feeds and chat histories keep every message (hundreds of thousands of objects in a
    # lag run), so each full collection walks them all: pauses of 50-380 ms, growing with
    # the run, every few seconds, with every frame held back meanwhile. That pause belongs to
    # this simulated network's Python process, not to a supernode or the bridge; the process
    # lives for one run, so its collector is off.
    gc.disable()
    rng = random.Random(5)
    counter = [0]
    # Routing to the recipients' index owners, holding for offline ones, the event trace:
    # the legacy network's own work, done on its own machines in a real deployment (see
    # above). The feeds, what the bridge reads, are unchanged.
    for node in dep.supernodes.values():
        # (a renamed routing step must fail here: patching a name that no longer existed
        # once left routing on, and the lag run measured this process's overload instead of
        # the bridge, p99 2-9 s)
        if not callable(getattr(node.routing, "_route", None)):
            raise SystemExit("legacy_feed_server: Routing._route is gone; update the bench")
        node.routing._route = lambda msg, recipients: None
    dep.trace.record = lambda kind, *fields: None
    if mode == "live":
        # Each chat's range digests, kept with its history for the reconcilers'
        # DigestRequests, are the legacy network's work too: a third of this process's time
        # while it generates a lag run's load. A chat keeps none then; a DigestRequest would
        # fail loudly (no reconciler runs here). The backlog mode keeps them: its appends
        # come before the clock starts, and the cloud -> legacy runs measure what accepting
        # the bridge's injections costs a supernode, digests included.
        if "digests" not in attrs.fields_dict(ChatState):
            raise SystemExit("legacy_feed_server: ChatState.digests is gone; update the bench")
        ChatState.__attrs_post_init__ = lambda self: setattr(self, "digests", _NoDigests())

    def now() -> int:
        return int(reactor.seconds() * 1000)

    def put(chat: Any, sender: str, body: str, ts_ms: int) -> None:
        """One legacy message into *chat*, through its home supernode."""
        counter[0] += 1
        node = dep.supernodes[dep.ring.home_of(chat.chat_id)]
        node.accept(chat.chat_id, tuple(chat.members), f"bench-{counter[0]}", sender, body,
                    "legacy", ts_ms=ts_ms)

    def append(n: int) -> None:
        now_ms = now()
        for _ in range(n):
            chat = rng.choice(dep.chats)
            put(chat, rng.choice(chat.members), "x" * 80, now_ms)

    def started(_: object) -> None:
        if mode == "backlog":
            append(int(amount))
            # let the appends' feed frames settle before the clock starts
            reactor.callLater(2.0, lambda: print("ready", int(amount), flush=True))
        else:
            produced = [0]
            begun = [0.0]

            def tick() -> None:
                # what is due by now, from the start: a tick that ran late (the reactor was
                # busy) catches up instead of the load silently falling below RATE
                due = int(amount * (reactor.seconds() - begun[0])) - produced[0]
                produced[0] += due
                append(due)

            loop = task.LoopingCall(tick)

            def begin() -> None:
                begun[0] = reactor.seconds()
                loop.start(0.01)

            def end() -> None:
                if loop.running:
                    loop.stop()

            # SIGUSR1 starts the load, SIGUSR2 ends it (a signal handler only schedules)
            signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(begin))
            signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(end))
            # One message in every chat first: the bridge creates the chats and their
            # members' accounts before the load starts, so the lag is the steady state's.
            for chat in dep.chats:
                put(chat, chat.members[0], "warm-up", now())
            print("ready", counter[0], flush=True)

    exit_code = [0]

    def cannot_start(f: Any) -> None:
        # e.g. its ports are taken (another benchmark running): the benchmark must not go on
        # to measure whatever answers there
        why = f.value.subFailure if isinstance(f.value, defer.FirstError) else f
        print(f"legacy_feed_server: cannot start: {why.getErrorMessage()}", file=sys.stderr,
              flush=True)
        exit_code[0] = 1
        reactor.stop()

    def start() -> None:
        d = defer.gatherResults([defer.maybeDeferred(s.startService) for s in dep],
                                consumeErrors=True)
        d.addCallback(lambda _: setattr(dep, "running", 1))
        d.addCallback(started)
        d.addErrback(cannot_start)  # a failure to listen, or of the appends themselves

    reactor.callWhenRunning(start)
    reactor.run()
    sys.exit(exit_code[0])


if __name__ == "__main__":
    main()
