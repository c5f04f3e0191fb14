"""API posts per second with 50 concurrent clients (used by bench_cloud.py).

``bridgectl cloud run`` serves the API in a subprocess (its own core); this process runs
50 closed-loop clients over loopback HTTP with persistent connections, each posting the next
message as soon as the previous one was acknowledged. Each run lasts a fixed time and counts
acknowledged posts (201). The median of several runs, with min and max.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import psycopg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cloud.store import conversations as conversations_store  # noqa: E402
from cloud.workload import AgentHTTP, Population, provision  # noqa: E402

CLIENTS = 50


def _start_api(dsn: str, home: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridgectl.main", "cloud", "run", "--dsn", dsn, "--port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "BRIDGE_HOME": home})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"cloud API on (http://[\d.]+:\d+)/v1", proc.stderr.readline())
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("cloud run did not start")


def _run_clients(url: str, population, seconds: float) -> dict:
    from twisted.internet import defer, task

    result: dict = {}

    async def main(reactor) -> None:
        http = AgentHTTP(reactor, url, max_connections=CLIENTS)
        tokens = []
        for handle, _aid in population.accounts[:CLIENTS]:
            status, body = await http.request(
                "POST", "/v1/login", {"handle": handle, "password": population.password})
            assert status == 200, body
            tokens.append(body["token"])
        chats = {members[0]: cid for cid, members in population.conversations}
        deadline = reactor.seconds() + seconds
        counts = {"ok": 0, "errors": 0}

        async def client(i: int) -> None:
            token = tokens[i]
            cid = chats[population.accounts[i][1]]
            n = 0
            while reactor.seconds() < deadline:
                n += 1
                status, _ = await http.request(
                    "POST", f"/v1/conversations/{cid}/messages",
                    {"client_message_id": f"bench-{time.time_ns()}-{i}-{n}", "body": "x" * 80},
                    token=token)
                counts["ok" if status == 201 else "errors"] += 1

        t0 = reactor.seconds()
        await defer.gatherResults([defer.Deferred.fromCoroutine(client(i))
                                   for i in range(len(tokens))])
        result.update(counts, seconds=reactor.seconds() - t0)
        await http.close()

    try:
        task.react(lambda r: defer.Deferred.fromCoroutine(main(r)))
    except SystemExit:
        pass
    return result


def bench_population(dsn: str) -> Population:
    """50 posters, each in its own two-member conversation (no seq contention between them).

    Idempotent: the parent and every child process call it and get the same ids.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        everyone = provision(conn, users=2 * CLIENTS, conversations=0, seed=99, prefix="bench")
        posters, chats = [], []
        with conn.transaction():
            for i in range(CLIENTS):
                (handle, a), (_, b) = everyone.accounts[2 * i], everyone.accounts[2 * i + 1]
                cid = uuid.uuid5(a, "bench")
                conversations_store.create_conversation(conn, cid, [a, b])
                posters.append((handle, a))
                chats.append((cid, (a,)))
    return Population(tuple(posters), tuple(chats), everyone.password)


def bench_api(dsn: str, quick: bool = False, runs: int = 3) -> dict:
    bench_population(dsn)
    seconds = 3.0 if quick else 8.0
    rates, errors = [], 0
    with tempfile.TemporaryDirectory() as home:
        proc, url = _start_api(dsn, home)
        try:
            for _ in range(runs):
                # each run in a fresh process: task.react can run only once per process
                out = subprocess.run(
                    [sys.executable, __file__, url, str(seconds), dsn],
                    capture_output=True, text=True, timeout=120)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr)
                ok, err, secs = map(float, out.stdout.split())
                rates.append(ok / secs)
                errors += int(err)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"clients": CLIENTS, "seconds_per_run": seconds,
            "posts_per_s": {"median": round(statistics.median(rates), 1),
                            "min": round(min(rates), 1), "max": round(max(rates), 1),
                            "runs": runs},
            "errors": errors}


if __name__ == "__main__":
    # child mode: python bench_api.py URL SECONDS DSN; prints "ok errors seconds"
    url, seconds, dsn = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    r = _run_clients(url, bench_population(dsn), seconds)
    print(r["ok"], r["errors"], r["seconds"])
