"""Reconcile benchmark (not a test): prints one JSON document.

The gaps reconciler (``reconcilers/gaps.py``) through ``reconcilers.runner.run_one``, the way
``bridgectl reconcile gaps`` runs it, over a history of N messages that both stacks hold,
with 100 differences: half missing in the cloud store, half missing at their home
supernodes. Per size (10^4, 10^5, 10^6 messages by default):

- ``seconds``: wall seconds of one reconcile pass (compare, second look, repair), the
  median of --repeat passes with min and max; each pass gets 100 fresh differences and is
  a full sweep (``--full-sweep``: every conversation's root), because the messages taken
  from the supernodes' memory go without a feed gap the dirty set would hear of;
- what it moved: digest requests, GUIDs listed (both sides), messages fetched from legacy
  and injected into legacy, and ``fraction_moved`` = (GUIDs listed + messages fetched +
  messages injected) / N: how much of the history travelled, against 1 for a full copy;
- memory: the process's resident memory once the scene is built, its peak, and how much a
  pass adds on top of the built scene (VmHWM reset through ``/proc/self/clear_refs``);
- after the passes, over stacks that agree: ``vouch_pass_*``, the dirty-set pass that
  compares again the conversations the last pass repaired; ``in_sync_pass_*``, the next
  dirty-set pass, with nothing changed since (what cron runs most of the time); and
  ``full_sweep_in_sync_*``, a full sweep of every root. Each with its digest requests and
  the stored rows the cloud side read for them (``digest_rows_read``).

The scene:

    SimClock + MemoryNetwork, 4 supernodes          PostgreSQL (embedded unless --dsn)
      each chat's history put straight into its       accounts, conversations and members
      home supernode's memory (ChatState), the        as the bridge creates them; messages
      structure accept() appends to                   by binary COPY into ``messages``
                          \\                            /   (digest columns generated,
                                                          slots kept by the triggers)
                           GapsReconciler + SupernodeLinks ("reconciler" peer)

Chats hold --per-chat messages (default 1,000) between two members, spread over the last
7 days. Preloading bypasses ``accept()`` (its feed append and routing are not what is
measured) and the bridge's write path (measured by bench_bridge.py); the reconciler sees
only what it would see in production: the peer API and the store. The network is the
deterministic in-memory one: simulated latency costs no wall time, and the supernodes'
work runs in this process, on the same core as the reconciler (on loopback TCP they would
have their own core). The scene is built once per size and reused by its passes.

Each size runs in its own subprocess, so its memory figures are its own.

Usage: python bench/bench_reconcile.py [--dsn DSN] [--sizes 10000 100000 1000000]
                                       [--repeat N] [--per-chat N] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_cloud import copy_messages, scratch_database  # noqa: E402
from bench_stats import summarize  # noqa: E402
from twisted.internet import defer  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from bridge import ids  # noqa: E402
from bridge.discovery import SupernodeLinks  # noqa: E402
from cloud import embedded  # noqa: E402
from cloud.db import InlineDatabase  # noqa: E402
from cloud.store import accounts as accounts_store  # noqa: E402
from cloud.store import conversations as conversations_store  # noqa: E402
from legacy import wire  # noqa: E402
from legacy.faults import PRESETS, HopFaults  # noqa: E402
from legacy.network import MemoryNetwork  # noqa: E402
from legacy.ring import HashRing  # noqa: E402
from legacy.simclock import SimClock  # noqa: E402
from legacy.supernode import ChatState, Secrets, Supernode, SupernodeConfig  # noqa: E402
from legacy.trace import Trace  # noqa: E402
from reconcilers import runner  # noqa: E402
from reconcilers.gaps import GapsConfig, GapsReconciler  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
DIFFERENCES = 100
SUPERNODES = 4
PER_CHAT = 1000
PEER_SECRET = b"bench-reconcile-peer-secret-0123"
#: Simulated time the network starts at (a plausible epoch, so 7 days of history fit).
START_S = 1_700_000_000.0
HISTORY_MS = 7 * 86400 * 1000
BASE_PORT = 47500


def memory_mb() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


#: the highest VmHWM seen before any reset_peak_rss(): the process's own peak
_PEAK_MB = [0.0]


def peak_rss_mb() -> float:
    return max(_PEAK_MB[0], memory_mb()["VmHWM"])


def reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False if refused."""
    _PEAK_MB[0] = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def wait(clock: SimClock, d: defer.Deferred, timeout: float) -> Any:
    """Run the simulated clock until *d* has a result; return it or raise its error."""
    results: list[Any] = []
    d.addBoth(results.append)
    deadline = clock.seconds() + timeout
    while not results:
        nxt = clock.next_call_time()
        if nxt is None or nxt > deadline:
            raise RuntimeError(f"no result after {timeout} simulated seconds")
        clock.run_until(nxt)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class ReconcileScene:
    """N messages on both stacks; ``diverge`` takes some away, ``reconcile`` runs a pass."""

    def __init__(self, dsn: str, messages: int, per_chat: int, seed: int = 7) -> None:
        self.dsn, self.n, self.per_chat = dsn, messages, per_chat
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.clock.rightNow = START_S
        self.net = MemoryNetwork(self.clock)
        sn_ids = [f"sn{i}" for i in range(SUPERNODES)]
        self.directory = {sn: wire.SupernodeAddress(sn_id=sn, host="127.0.0.1",
                                                    port=BASE_PORT + i)
                          for i, sn in enumerate(sn_ids)}
        self.ring = HashRing(sn_ids)
        trace = Trace(self.clock)
        faults = HopFaults(PRESETS["none"], random.Random(seed))
        secrets = Secrets(peer_secret=PEER_SECRET, login_secret=b"bench-login-secret-0123")
        self.supernodes = {
            sn: Supernode(SupernodeConfig(sn_id=sn, port=self.directory[sn].port),
                          network=self.net, ring=self.ring, directory=self.directory,
                          secrets=secrets, hop_faults=faults, trace=trace,
                          rng=random.Random(self.rng.getrandbits(64)))
            for sn in sn_ids}
        for node in self.supernodes.values():
            node.startService()
        self.clock.run_until(self.clock.seconds() + 1.0)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.lock_conn = psycopg.connect(dsn, autocommit=True)
        self.db = InlineDatabase(self.conn)
        #: chat id -> (members, [guid, ...]) in history order
        self.chats: dict[str, tuple[tuple[str, str], list[str]]] = {}

    def close(self) -> None:
        self.conn.close()
        self.lock_conn.close()

    # -- building both stacks ---------------------------------------------------------------

    def _history(self) -> list[tuple[str, tuple[str, str], list[wire.ChatMessage]]]:
        rng, now_ms = self.rng, int(self.clock.seconds() * 1000)
        first_ms = now_ms - HISTORY_MS
        last_ms = now_ms - 3600 * 1000  # an hour old: well below any watermark
        out = []
        chats = -(-self.n // self.per_chat)
        for c in range(chats):
            chat_id = f"chat-{c:06d}"
            members = (f"user-{2 * c:06d}", f"user-{2 * c + 1:06d}")
            count = min(self.per_chat, self.n - c * self.per_chat)
            stamps = sorted(rng.randrange(first_ms, last_ms) for _ in range(count))
            msgs = [wire.ChatMessage(chat_id=chat_id, guid=f"{rng.getrandbits(128):032x}",
                                     legacy_seq=i + 1, sender=members[rng.getrandbits(1)],
                                     ts_ms=ts, body=f"message {i} of {chat_id}: " + "x" * 40,
                                     origin="legacy")
                    for i, ts in enumerate(stamps)]
            out.append((chat_id, members, msgs))
        return out

    def build(self) -> dict[str, float]:
        """Put the same history into the supernodes' memory and the cloud store."""
        t0 = time.perf_counter()
        history = self._history()
        t1 = time.perf_counter()
        for chat_id, members, msgs in history:
            node = self.supernodes[self.ring.home_of(chat_id)]
            node.mem.chats[chat_id] = ChatState(
                members=members, next_seq=len(msgs) + 1,
                history={m.guid: m for m in msgs})
            self.chats[chat_id] = (members, [m.guid for m in msgs])
        t2 = time.perf_counter()
        self._load_cloud(history)
        t3 = time.perf_counter()
        return {"generate_s": round(t1 - t0, 2), "legacy_s": round(t2 - t1, 2),
                "cloud_s": round(t3 - t2, 2)}

    def _load_cloud(self, history: list) -> None:
        """Accounts, conversations and members as ``bridge.mirror.mirror_changes`` makes
        them; the messages by binary COPY (the digest columns are generated by the server,
        the maintained slots by its triggers, as for any write)."""
        conn = self.conn
        handles = {h: ids.account_id(h) for _, members, _ in history for h in members}
        with conn.transaction():
            accounts, _ = accounts_store.ensure_linked_accounts(conn, handles)
            for chat_id, members, _ in history:
                conversations_store.create_conversation(conn, ids.conversation_id(chat_id),
                                                        [accounts[h] for h in members],
                                                        legacy_chat_id=chat_id)
        batch: list[tuple] = []

        def flush() -> None:
            with copy_messages(conn) as cp:
                for row in batch:
                    cp.write_row(row)
            batch.clear()

        for chat_id, _, msgs in history:
            cid = ids.conversation_id(chat_id)
            for m in msgs:
                batch.append((cid, m.legacy_seq, ids.message_id(m.guid), m.guid,
                              accounts[m.sender], m.sender, m.ts_ms, m.body, "legacy"))
            if len(batch) >= 50_000:
                flush()
        if batch:
            flush()
        with conn.transaction():
            conn.execute("UPDATE conversations c SET next_seq = n.top + 1 FROM "
                         "(SELECT conversation_id, max(seq) AS top FROM messages GROUP BY 1) n "
                         "WHERE c.conversation_id = n.conversation_id")
        conn.execute("VACUUM ANALYZE messages")
        unhashed = conn.execute("SELECT count(*) FROM messages WHERE digest_hash IS NULL "
                                "OR digest_bucket IS NULL").fetchone()[0]
        if unhashed:
            raise RuntimeError(f"{unhashed} messages without digest columns")

    def check_in_sync(self) -> None:
        legacy = sum(len(node.mem.chats[c].history) for c in self.chats
                     for node in [self.supernodes[self.ring.home_of(c)]])
        cloud = self.conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        if legacy != self.n or cloud != self.n:
            raise RuntimeError(f"stacks not in sync: legacy {legacy}, cloud {cloud}, "
                               f"expected {self.n}")

    # -- one pass ---------------------------------------------------------------------------

    def diverge(self, k: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Take k random messages away: the first half from the cloud store, the rest from
        their home supernodes' memory. Returns the (chat id, guid) pairs of each half."""
        chat_ids = sorted(self.chats)
        picked: set[tuple[str, str]] = set()
        while len(picked) < k:
            chat_id = self.rng.choice(chat_ids)
            picked.add((chat_id, self.rng.choice(self.chats[chat_id][1])))
        victims = sorted(picked)
        self.rng.shuffle(victims)
        from_cloud, from_legacy = victims[:k // 2], victims[k // 2:]
        with self.conn.transaction():
            for chat_id, guid in from_cloud:
                self.conn.execute("DELETE FROM messages WHERE conversation_id = %s "
                                  "AND legacy_guid = %s", (ids.conversation_id(chat_id), guid))
        for chat_id, guid in from_legacy:
            node = self.supernodes[self.ring.home_of(chat_id)]
            node.mem.chats[chat_id].drop(guid)
        return from_cloud, from_legacy

    def reconcile(self, full_sweep: bool = True) -> dict:
        links = SupernodeLinks(self.net, list(self.directory.values()), name="reconciler",
                               secret=PEER_SECRET)
        rec = GapsReconciler(links, GapsConfig(lag_ms=0, full_sweep=full_sweep))
        gc.collect()
        before = memory_mb()["VmRSS"]
        reset = reset_peak_rss()
        t0 = time.perf_counter()
        d = defer.Deferred.fromCoroutine(runner.run_one(
            rec, clock=self.clock, db=self.db, lock_conn=self.lock_conn, dry_run=False,
            max_seconds=None))
        report = wait(self.clock, d, timeout=86400)
        wall = time.perf_counter() - t0
        peak = memory_mb()["VmHWM"]
        links.close()
        if report.error is not None:
            raise RuntimeError(f"reconcile failed: {report.error}")
        moved = dict(self.conn.execute(
            "SELECT kind, sum((detail->>'count')::int) FROM reconcile_findings "
            "WHERE run_id = %s AND state = 'repaired' GROUP BY kind",
            (report.run_id,)).fetchall())
        c = rec.counters
        injected = int(moved.get("missing_in_legacy", 0))
        return {"seconds": wall, "simulated_seconds": report.duration_s,
                "compared": report.compared, "confirmed": report.confirmed,
                "repaired": report.repaired, "clean": report.clean,
                "digest_requests": c.digest_requests, "listed_guids": c.listed_guids,
                "digest_rows_read": c.digest_rows_read,
                "skipped_clean": report.detail.get("skipped_clean"),
                "fetched_messages": c.fetched_messages, "injected_messages": injected,
                "written_to_cloud": int(moved.get("missing_in_cloud", 0)),
                "fraction_moved": (c.listed_guids + c.fetched_messages + injected) / self.n,
                "pass_extra_mb": peak - before if reset else None}


def bench_size(dsn: str, messages: int, repeat: int, per_chat: int) -> dict:
    """Build one scene of *messages* and run *repeat* passes, each on fresh differences."""
    scene = ReconcileScene(dsn, messages, per_chat)
    try:
        build = scene.build()
        scene.check_in_sync()
        built = memory_mb()
        passes = []
        for _ in range(repeat):
            from_cloud, from_legacy = scene.diverge(DIFFERENCES)
            out = scene.reconcile()
            if out["repaired"] != DIFFERENCES or not out["clean"]:
                raise RuntimeError(f"the pass repaired {out['repaired']} of {DIFFERENCES}: "
                                   f"{out}")
            scene.check_in_sync()
            passes.append(out)
        # over stacks that agree: the dirty-set pass that vouches for the repairs, the next
        # one (nothing changed), and a full sweep of every root
        vouch = scene.reconcile(full_sweep=False)
        in_sync = scene.reconcile(full_sweep=False)
        sweep = scene.reconcile(full_sweep=True)
        for p in (vouch, in_sync, sweep):
            if p["confirmed"] or not p["clean"]:
                raise RuntimeError(f"a pass over stacks that agree found differences: {p}")
    finally:
        scene.close()
    extra = [p["pass_extra_mb"] for p in passes if p["pass_extra_mb"] is not None]
    return {
        "messages": messages, "chats": len(scene.chats), "per_chat": per_chat,
        "supernodes": SUPERNODES, "differences": DIFFERENCES,
        "missing_in_cloud": DIFFERENCES // 2, "missing_in_legacy": DIFFERENCES - DIFFERENCES // 2,
        "build_seconds": build,
        "seconds": summarize([p["seconds"] for p in passes], 3),
        "fraction_moved": summarize([p["fraction_moved"] for p in passes], 6),
        "digest_requests": summarize([p["digest_requests"] for p in passes], 0),
        "digest_rows_read": summarize([p["digest_rows_read"] for p in passes], 0),
        "listed_guids": summarize([p["listed_guids"] for p in passes], 0),
        "fetched_messages": summarize([p["fetched_messages"] for p in passes], 0),
        "injected_messages": summarize([p["injected_messages"] for p in passes], 0),
        "vouch_pass_seconds": round(vouch["seconds"], 4),
        "vouch_pass_digest_requests": vouch["digest_requests"],
        "vouch_pass_rows_read": vouch["digest_rows_read"],
        "in_sync_pass_seconds": round(in_sync["seconds"], 4),
        "in_sync_digest_requests": in_sync["digest_requests"],
        "in_sync_rows_read": in_sync["digest_rows_read"],
        "in_sync_skipped_clean": in_sync["skipped_clean"],
        "full_sweep_in_sync_seconds": round(sweep["seconds"], 3),
        "full_sweep_in_sync_digest_requests": sweep["digest_requests"],
        "full_sweep_in_sync_rows_read": sweep["digest_rows_read"],
        "rss_built_mb": round(built["VmRSS"], 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "pass_extra_mb": summarize(extra, 1) if extra else None,
    }


def run_one_size(server: str, messages: int, repeat: int, per_chat: int) -> dict:
    with scratch_database(server, "bridge_benchr") as dsn:
        return bench_size(dsn, messages, repeat, per_chat)


def run_sizes(server: str, sizes: list[int], repeat: int, per_chat: int = PER_CHAT) -> dict:
    """Each size in its own subprocess (so its memory figures are its own)."""
    by_size = {}
    for n in sizes:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--dsn", server, "--one", str(n),
             "--repeat", str(repeat), "--per-chat", str(per_chat)],
            capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"bench_reconcile --one {n} failed:\n{out.stderr[-3000:]}")
        by_size[str(n)] = json.loads(out.stdout)
    return by_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=os.environ.get("BRIDGE_DSN"),
                   help="a server to create the scratch databases on (default: embedded)")
    p.add_argument("--sizes", type=int, nargs="+", help="message counts (default: 10^4..10^6)")
    p.add_argument("--repeat", type=int, default=3, help="passes per size (default 3)")
    p.add_argument("--per-chat", type=int, default=PER_CHAT, help="messages per chat")
    p.add_argument("--quick", action="store_true", help="10^4 and 10^5 messages, 1 pass")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size
    args = p.parse_args()
    server = args.dsn or embedded.ensure_running(os.environ.get("BRIDGE_HOME", ".bridge"))
    if args.one is not None:
        print(json.dumps(run_one_size(server, args.one, args.repeat, args.per_chat)))
        return
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    repeat = 1 if args.quick else args.repeat
    print(json.dumps({"reconcile": run_sizes(server, sizes, repeat, args.per_chat)},
                     indent=2))


if __name__ == "__main__":
    main()
