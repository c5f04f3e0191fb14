"""API posts per second with 50 concurrent clients (used by bench_cloud.py), and the
ceiling measured in the same run.

``bridgectl cloud run`` serves the API in a subprocess; this process runs 50 closed-loop
clients over loopback HTTP with persistent connections, each posting the next message as
soon as the previous one was acknowledged. Each run lasts a fixed time and counts
acknowledged posts (201). The median of several runs, with min and max.

It is measured for each ``cloud run --processes`` value in ``PROCESSES``: all those servers
run at once (idle but for their dispatchers' polls when not measured) and are measured in
turn, run by run, so a busy moment of the machine does not fall on one configuration only.
``posts_per_s`` is ``DEPLOYED_PROCESSES``' figure; ``posts_per_s_by_processes`` has all, and
``api_cpu_us_per_post_by_processes`` the CPU the API's processes (parent and workers) spent
per acknowledged post.

The ceiling: single-row insert transactions per second on the same server from as many
clients, right after each API run: ``pgbench`` (shipped with pgserver's PostgreSQL) with 50
connections, each inserting one row into ``messages`` per transaction (autocommit, a cloud
message's columns and size, the table's own indexes and generated digest columns). A post
does that insert and more (notification rows, the sequence number, its checks), over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import psycopg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_stats import summarize  # noqa: E402

from cloud.store import conversations as conversations_store  # noqa: E402
from cloud.workload import Population, provision  # noqa: E402

CLIENTS = 50


#: ``cloud run --processes`` values measured in the same run, alternated run by run.
PROCESSES = (1, 2)
#: The configuration ``posts_per_s`` reports: ``cloud run``'s default, one process.
DEPLOYED_PROCESSES = 1


def _start_api(dsn: str, home: str, processes: int = 1) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridgectl.main", "cloud", "run", "--dsn", dsn, "--port", "0",
         "--processes", str(processes)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "BRIDGE_HOME": home})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"cloud API on (http://[\d.]+:\d+)/v1", proc.stderr.readline())
        if match:
            # keep reading what it logs: a full pipe would block the server
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("cloud run did not start")


class _Connection:
    """One keep-alive HTTP/1.1 connection of a closed-loop client: one request at a time.

    A bare asyncio client rather than Twisted's Agent: the clients share the 2 cores with the
    server and PostgreSQL, and Agent spent about 0.3 ms of CPU per post, as much as
    PostgreSQL did; this one spends a fraction of that, leaving the cores to what is measured.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str) -> None:
        self._reader, self._writer, self._host = reader, writer, host

    async def request(self, method: str, path: str, body: dict,
                      token: str | None = None) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n")
        if token is not None:
            head += f"Authorization: Bearer {token}\r\n"
        self._writer.write(head.encode() + b"\r\n" + payload)
        status = int((await self._reader.readline()).split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)


def _run_clients(url: str, population: Population, seconds: float) -> dict:
    host, port = url.removeprefix("http://").split(":")

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        connections = []
        for _ in range(CLIENTS):
            reader, writer = await asyncio.open_connection(host, int(port))
            connections.append(_Connection(reader, writer, f"{host}:{port}"))
        tokens = []
        for (handle, _aid), conn in zip(population.accounts[:CLIENTS], connections, strict=True):
            status, body = await conn.request(
                "POST", "/v1/login", {"handle": handle, "password": population.password})
            assert status == 200, body
            tokens.append(json.loads(body)["token"])
        chats = {members[0]: cid for cid, members in population.conversations}
        deadline = loop.time() + seconds
        counts = {"ok": 0, "errors": 0}

        async def client(i: int) -> None:
            path = f"/v1/conversations/{chats[population.accounts[i][1]]}/messages"
            n = 0
            while loop.time() < deadline:
                n += 1
                status, _ = await connections[i].request(
                    "POST", path,
                    {"client_message_id": f"bench-{time.time_ns()}-{i}-{n}", "body": "x" * 80},
                    token=tokens[i])
                counts["ok" if status == 201 else "errors"] += 1

        t0 = loop.time()
        await asyncio.gather(*(client(i) for i in range(len(tokens))))
        return {**counts, "seconds": loop.time() - t0}

    return asyncio.run(main())


#: One transaction of the ceiling: a cloud message's row, one per client's own conversation
#: (seq random in a range no post reaches; a collision, once in ~10^14, is skipped).
CEILING_SCRIPT = (
    "\\set seq random(1000000000000, 9000000000000000000)\n"
    "INSERT INTO messages (conversation_id, seq, message_id, sender_account_id, "
    "sender_handle, sent_ms, body, origin, client_message_id) VALUES ("
    "md5(:client_id || '-ceiling')::uuid, :seq, gen_random_uuid(), "
    "md5(:client_id || '-ceiling')::uuid, 'ceiling', 1700000000000, "
    f"'{'x' * 80}', 'cloud', 'ceiling-' || :seq) ON CONFLICT DO NOTHING;\n")


def _pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    import pgserver  # its PostgreSQL build ships pgbench

    return os.path.join(os.path.dirname(pgserver.__file__), "pginstall", "bin", "pgbench")


def insert_ceiling(dsn: str, seconds: float, clients: int = CLIENTS) -> float:
    """Single-row insert transactions/s from *clients* connections (see the module doc)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(CEILING_SCRIPT)
        script.flush()
        out = subprocess.run(
            [_pgbench(), "-n", "-c", str(clients), "-j", "2", "-T", str(max(1, round(seconds))),
             "-f", script.name, dsn], capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {out.stderr.strip() or out.stdout.strip()}")
    return float(match.group(1))


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


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process *pid* and its children (the API workers)."""
    def stat(p: str) -> list[str] | None:
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None

    total = 0.0
    for p in os.listdir("/proc"):
        fields = stat(p) if p.isdigit() else None
        if fields and (int(p) == pid or int(fields[1]) == pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bench_api(dsn: str, quick: bool = False, runs: int = 3,
              processes: tuple[int, ...] = PROCESSES) -> dict:
    """Posts/s for each ``--processes`` value (all servers up at once, measured in turn,
    run by run) and the insert ceiling after each round."""
    bench_population(dsn)
    seconds = 3.0 if quick else 8.0
    rates: dict[int, list[float]] = {p: [] for p in processes}
    cpu_us: dict[int, list[float]] = {p: [] for p in processes}
    ceilings, errors = [], 0
    with tempfile.TemporaryDirectory() as home:
        servers: dict[int, tuple[subprocess.Popen, str]] = {}
        try:
            for p in processes:
                servers[p] = _start_api(dsn, home, p)
            for _ in range(runs):
                for p in processes:
                    proc, url = servers[p]
                    cpu_before = process_tree_cpu_s(proc.pid)
                    # each run in a fresh process: a fresh event loop and connections
                    out = subprocess.run(
                        [sys.executable, __file__, url, str(seconds), dsn],
                        capture_output=True, text=True, timeout=120)
                    if out.returncode != 0:
                        raise RuntimeError(out.stderr)
                    ok, err, secs = map(float, out.stdout.split())
                    rates[p].append(ok / secs)
                    cpu_us[p].append(1e6 * (process_tree_cpu_s(proc.pid) - cpu_before)
                                     / max(ok, 1))
                    errors += int(err)
                ceilings.append(insert_ceiling(dsn, seconds))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                proc.wait(timeout=60)
    deployed = DEPLOYED_PROCESSES if DEPLOYED_PROCESSES in processes else processes[0]
    return {"clients": CLIENTS, "seconds_per_run": seconds, "processes": deployed,
            "posts_per_s": summarize(rates[deployed], 1),
            "posts_per_s_by_processes": {str(p): summarize(r, 1) for p, r in rates.items()},
            "api_cpu_us_per_post_by_processes": {str(p): summarize(c, 0)
                                                 for p, c in cpu_us.items()},
            "insert_ceiling_tx_per_s": summarize(ceilings, 1),
            "ratio_to_ceiling": round(statistics.median(rates[deployed])
                                      / statistics.median(ceilings), 3),
            "errors": errors}


if __name__ == "__main__":
    # child mode: python bench_api.py URL SECONDS DSN; prints "ok errors seconds"
    url, seconds, dsn = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    r = _run_clients(url, bench_population(dsn), seconds)
    print(r["ok"], r["errors"], r["seconds"])
