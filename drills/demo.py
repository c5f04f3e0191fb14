"""``bridgectl demo``: the whole migration on one machine, the way an operator first meets it.

Separate processes on 127.0.0.1, each the real command an operator would run::

    bridgectl legacy run     supernodes, login server, legacy clients and their traffic
    bridgectl cloud run      the cloud API, the notification dispatcher, a simulated gateway
    bridgectl bridge run     x workers (leases share the feeds; /status, /metrics)
    bridgectl accounts import / migrate / reconcile      one-shot, as an operator or cron would
    this process             simulated cloud devices (cloud-native users, and every legacy
                             user once a cohort moves them to a cloud phase), the status line

Timeline (``--duration D``)::

    set-up | traffic, faults, cohorts moving, reconcile every ~D/4 | heal | settle | reconcile
           0 ......................................................... D     final check

At the end the legacy network heals (SIGUSR1: traffic and faults stop, crashed supernodes
restart), the bridge drains, the reconcilers run once more, and ``drills.convergence``
checks the invariants from both stacks' own records. Only this module's caller
(``bridgectl/cmd_demo.py``) touches the global reactor; time, processes and sockets come
through the reactor it is given.

The module is long (about 760 lines) because ``Demo`` is one run told in order, set-up to
final check, and reads best in one place; what stands alone lives beside it: the settings
(``drills.config``), child processes (``drills.processes``), the run's databases and ports
(``drills.databases``, ``drills.ports``) and what it reads from the store
(``drills.readings``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

import attrs
from twisted.internet import defer, task

from bridge import state
from drills import convergence
from drills.config import COHORTS, FAULTS, DemoConfig, FaultSettings, Scenario
from drills.ports import NoFreePorts, free_port_block, release_block
from drills.processes import Child, DemoError
from drills.readings import (
    figures,
    leases_held,
    migrated_devices,
    post_burst,
    rows_under_claim,
)
from servicekit.sleep import Sleeper

# -- the demo ----------------------------------------------------------------------------------

class Demo:
    """One run: start everything, drive the migration, heal, check, stop everything."""

    def __init__(self, reactor: Any, config: DemoConfig, *, dsn: str, home: Path,
                 workdir: Path, out: TextIO, status_stream: TextIO | None = None,
                 dsn_display: str | None = None, scenario: Scenario | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.dsn = dsn
        self.dsn_display = dsn_display or dsn
        self.home = home
        self.workdir = workdir
        self.out = out
        self.status_stream = status_stream if status_stream is not None else sys.stderr
        self.rng = random.Random(config.seed)
        self.scenario = scenario
        self.faults = FAULTS[config.faults] if scenario is None else FaultSettings(
            push_loss=scenario.push_loss, push_errors=scenario.push_errors)
        self.legacy_faults = config.faults if scenario is None else scenario.legacy_faults
        self.chaos_done: list[dict[str, Any]] = []
        self.paused: dict[int, tuple[Child, int]] = {}  # worker -> (process, log offset)
        self.paused_leases: dict[int, list[tuple[str, int]]] = {}  # worker -> held when paused
        self.pending_faults: list[defer.Deferred] = []
        self.children: list[Child] = []
        self.workers: dict[int, Child] = {}
        self.legacy: Child | None = None
        self.cloud: Child | None = None
        self.stop_requested = False
        self.abort_requested = False
        self.events: list[dict[str, Any]] = []
        self.reconcile_runs: list[dict[str, Any]] = []
        self.cohorts: list[dict[str, Any]] = []
        self.bridge_kills = 0
        #: the mirror lag the workers reported under traffic (p99, and outside faults)
        self.traffic_lag: dict[str, Any] = {
            "last": {}, "worst_outside_faults_ms": {"to_cloud": None, "to_legacy": None}}
        self.t_heal: float | None = None
        #: rows under a live outbox claim at each kill_injecting fault
        self.kills_mid_injection: list[int] = []
        self._last_held = ""
        self.legacy_progress: dict[str, int] = {}
        self._sleeper = Sleeper(reactor)  # the 1 s pauses, which a stop request cuts short
        self._dirty = False  # a status line is on the terminal, unfinished
        self.t0 = reactor.seconds()  # run() sets it again when the run starts
        self._setsid = shutil.which("setsid")
        self.env = {**os.environ, "BRIDGE_HOME": str(home), "BRIDGE_DSN": dsn,
                    "PYTHONUNBUFFERED": "1", "BRIDGE_STOP_WITH_PARENT": str(os.getpid())}

    # -- control from signals ------------------------------------------------------------------

    def request_stop(self) -> None:
        """End the traffic now and go on to heal, reconcile and check (first Ctrl-C)."""
        self.stop_requested = True
        self._sleeper.wake()

    def request_abort(self) -> None:
        """Shut every process down now, without the final check (second Ctrl-C, SIGTERM)."""
        self.stop_requested = self.abort_requested = True
        self._sleeper.wake()

    def note(self, text: str) -> None:
        t = self.reactor.seconds() - self.t0
        self.events.append({"t": round(t, 1), "event": text})
        self._status_clear()
        print(f"[{t:5.0f}s] {text}", file=self.status_stream, flush=True)

    # -- processes -----------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str], *, capture: bool = False,
              env: dict[str, str] | None = None) -> Child:
        child = Child(name, self.workdir / f"{name}.log", capture_stdout=capture)
        argv = [sys.executable, "-m", "bridgectl.main", *args]
        if self._setsid:  # its own session: a Ctrl-C at the terminal reaches only the demo
            argv = [self._setsid, *argv]
        self.reactor.spawnProcess(child, argv[0], argv, env=self.env if env is None else env)
        self.children.append(child)
        return child

    async def command(self, name: str, args: list[str], timeout: float = 120.0,
                      env: dict[str, str] | None = None) -> tuple[int, Any]:
        """Run a one-shot command to its end: (exit code, its stdout as JSON or None)."""
        child = self.spawn(name, args, capture=True, env=env)
        timer = self.reactor.callLater(timeout, child.signal, signal.SIGTERM)
        code = await child.ended
        if timer.active():
            timer.cancel()
        self.children.remove(child)
        return code, child.stdout_json()

    async def _start_worker(self, i: int) -> Child:
        child = self.spawn(f"bridge-{i}", [
            "bridge", "run", "--legacy", f"127.0.0.1:{self.login_port}",
            "--metrics-port", str(self.metrics_ports[i]), "--worker-id", f"demo-worker-{i}"])
        self.workers[i] = child
        await child.wait_for(r"metrics on http", self.reactor, 60)
        return child

    async def _stop(self, child: Child, timeout: float = 20.0) -> int | None:
        if child.running:
            child.signal(signal.SIGTERM)
            timer = self.reactor.callLater(timeout, child.signal, signal.SIGKILL)
            await child.ended
            if timer.active():
                timer.cancel()
        return child.exit_code

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        from cloud.db import Database

        self.t0 = self.reactor.seconds()
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        # one block for every server: the supernodes, the login server, the cloud API and
        # each worker's metrics (kernel picks, freed and then bound by another process,
        # could even coincide); drawn from a random source of its own, so the seed's plan
        # does not depend on the machine's ports
        block = cfg.supernodes + 2 + cfg.workers
        try:
            self.base_port = free_port_block(block, random.Random())
        except NoFreePorts as e:
            raise DemoError(str(e)) from None
        self.login_port = self.base_port + cfg.supernodes
        self.api_port = self.login_port + 1
        self.metrics_ports = {i: self.api_port + i for i in range(1, cfg.workers + 1)}
        self.db = Database(self.reactor, self.dsn, max_connections=3, name="demo-db")
        self.db.startService()
        self.traffic: Any = None
        self.http: Any = None
        try:
            return await self._run()
        finally:
            try:
                await self._shutdown()
            finally:
                release_block(self.base_port, block)  # its servers are gone

    async def _run(self) -> dict[str, Any]:
        cfg = self.config
        record_path = self.workdir / "legacy-record.json"
        if record_path.exists():
            record_path.unlink()
        self.control_dir = self.workdir / "control"
        self.control_dir.mkdir(exist_ok=True)
        for stale in self.control_dir.glob("*.json"):
            stale.unlink()
        self.legacy = self.spawn("legacy", [
            "legacy", "run", "--supernodes", str(cfg.supernodes), "--users",
            str(cfg.legacy_users), "--rate", f"{cfg.rate:g}", "--faults", self.legacy_faults,
            "--seed", str(cfg.seed), "--port", str(self.base_port),
            "--fault-window", f"{cfg.duration or 600:g}", "--record", str(record_path),
            "--control-dir", str(self.control_dir), "--client-versions", cfg.client_versions])
        self.legacy.on_line = self._legacy_line
        self.cloud = self.spawn("cloud", [
            "cloud", "run", "--port", str(self.api_port),
            "--push-loss", f"{self.faults.push_loss:g}",
            "--push-errors", f"{self.faults.push_errors:g}",
            "--resend-after", "3", "--max-attempts", "8", "--seed", str(cfg.seed)])
        legacy_up = self.legacy.wait_for(r"legacy network up", self.reactor, 60)
        cloud_up = self.cloud.wait_for(r"cloud API on", self.reactor, 60)
        await legacy_up
        await cloud_up
        code, counts = await self.command(
            "accounts-import", ["accounts", "import", "--legacy",
                                f"127.0.0.1:{self.login_port}", "--json"])
        if code != 0:
            raise DemoError(f"bridgectl accounts import failed ({code}); see "
                            f"{self.workdir / 'accounts-import.log'}")
        self.note(f"imported {counts.get('seen', '?')} legacy accounts")
        for i in sorted(self.metrics_ports):
            await self._start_worker(i)
        first = self.metrics_ports[min(self.metrics_ports)]
        self.status_url = f"http://127.0.0.1:{first}/status"
        self.note(f"status page {self.status_url}  metrics http://127.0.0.1:{first}/metrics  "
                  f"cloud API http://127.0.0.1:{self.api_port}/v1  logs {self.workdir}")
        self.note(f"to look around from another shell: export BRIDGE_DSN='{self.dsn_display}'"
                  f"; the legacy login server (--legacy) is 127.0.0.1:{self.login_port}")
        await self._start_cloud_devices()
        self.t_traffic = self.reactor.seconds()
        await self._traffic_phase()
        if self.abort_requested:
            return {"aborted": True}
        return await self._final_phase(record_path)

    async def _start_cloud_devices(self) -> None:
        from cloud.workload import AgentHTTP, CloudWorkload, WorkloadConfig, provision

        population = await self.db.run("provision_workload", provision,
                                       users=self.config.cloud_users,
                                        conversations=max(1, self.config.cloud_users // 2),
                                        seed=self.config.seed)
        self.http = AgentHTTP(self.reactor, f"http://127.0.0.1:{self.api_port}")
        self.traffic = CloudWorkload(self.reactor, self.http, population,
                                     WorkloadConfig(rate=self.config.rate / 2, longpoll_s=10),
                                     self.config.seed)
        self.device_handles = {h for h, _ in population.accounts}
        self.traffic.startService()

    async def _refresh_devices(self) -> None:
        try:
            accounts = await self.db.run("migrated_devices", migrated_devices)
        except Exception:  # the store is restarting (a chaos scenario): next time
            return
        for handle, legacy_handle, conversations in accounts:
            if handle not in self.device_handles:
                self.device_handles.add(handle)
                # the simulated legacy users' passwords (legacy.traffic.build_population)
                self.traffic.add_device(handle, f"pw-{legacy_handle}", conversations)

    async def _traffic_phase(self) -> None:
        cfg = self.config
        end = None if cfg.duration == 0 else self.t_traffic + cfg.duration
        cohort_at = [self.t_traffic + t for t in cfg.cohort_times()]
        next_cohort = 0
        next_reconcile = self.t_traffic + min(8.0, cfg.reconcile_interval)
        window = cfg.duration or 120.0
        if self.scenario is not None:
            plan = self.scenario.plan(self.rng, window)
        else:
            plan = [(self.rng.uniform(0.2, 0.8) * window, "kill_worker", {})
                    for _ in range(self.faults.bridge_kills)]
        events = sorted(((self.t_traffic + t, action, kw) for t, action, kw in plan),
                        key=lambda e: e[0])
        next_status = 0.0
        reconcile: defer.Deferred | None = None
        while not self.stop_requested:
            now = self.reactor.seconds()
            if end is not None and now >= end:
                break
            await self._check_children()
            while events and now >= events[0][0]:
                _t, action, kw = events.pop(0)
                await self._act(action, kw)
            if (reconcile is None or reconcile.called) and now >= next_reconcile:
                reconcile = defer.Deferred.fromCoroutine(self._reconcile("cron"))
                next_reconcile = now + cfg.reconcile_interval
            if (next_cohort < len(COHORTS) and now >= cohort_at[next_cohort]
                    and (reconcile is None or reconcile.called)):
                if await self._migrate_cohort(next_cohort):
                    next_cohort += 1
                else:  # held back by the gates: try again in a few seconds
                    cohort_at[next_cohort] = self.reactor.seconds() + 3.0
            await self._refresh_devices()
            if now >= next_status:
                await self._status_line()
                next_status = now + 2.0
            await self._sleeper.sleep(1.0)
        if reconcile is not None and not reconcile.called:
            await reconcile
        for d in self.pending_faults:  # a paused worker resumes before the heal
            await d

    async def _check_children(self) -> None:
        for child in (self.legacy, self.cloud):
            if child is not None and not child.running:
                raise DemoError(f"{child.name} exited unexpectedly ({child.exit_code}); "
                                f"see {child.log_path}:\n  " + "\n  ".join(
                                    list(child.tail)[-8:]))
        for i, child in list(self.workers.items()):
            if not child.running:
                self.note(f"bridge worker {i} exited ({child.exit_code}); restarting it")
                await self._start_worker(i)

    async def _act(self, action: str, kw: dict[str, Any]) -> None:
        """Carry out one planned fault (see ``Scenario``)."""
        self.chaos_done.append({"t": round(self.reactor.seconds() - self.t0, 1),
                                "action": action, **kw})
        if action == "kill_worker":
            await self._kill_and_restart_worker(kw.get("worker"),
                                                float(kw.get("restart_after", 1.0)))
        elif action == "kill_injecting":
            await self._kill_mid_injection(int(kw.get("burst", 400)),
                                           float(kw.get("restart_after", 1.0)))
        elif action == "pause_worker":  # runs alongside the traffic; awaited before the heal
            self.pending_faults.append(defer.Deferred.fromCoroutine(
                self._pause_worker(int(kw["worker"]), float(kw["seconds"]))))
        elif action == "legacy":
            self._legacy_command(kw)
        elif action == "pg_restart":
            await self._pg_restart(float(kw.get("down_s", 5.0)))
        elif action == "reconcile":  # by hand, alongside the cron runs; awaited before the heal
            self.pending_faults.append(defer.Deferred.fromCoroutine(
                self._reconcile("hand", max_seconds=float(kw["max_seconds"]))))
        else:
            raise DemoError(f"unknown fault action {action!r}")

    async def _kill_and_restart_worker(self, worker: int | None = None,
                                       restart_after: float = 1.0) -> None:
        i = worker if worker in self.workers else self.rng.choice(sorted(self.workers))
        child = self.workers[i]
        child.signal(signal.SIGCONT)  # a paused worker dies as well
        child.signal(signal.SIGKILL)
        await child.ended
        self.bridge_kills += 1
        self.note(f"fault: bridge worker {i} killed with SIGKILL; restarting it under the "
                  f"same --worker-id in {restart_after:.1f} s (it takes its feeds back and "
                  f"fences its dead self)")
        await task.deferLater(self.reactor, restart_after, lambda: None)
        await self._start_worker(i)

    async def _kill_mid_injection(self, burst: int, restart_after: float) -> None:
        """Post a burst of cloud messages, wait (up to 5 s) until outbox rows are held
        under a live claim, which means an injection batch is in flight, then SIGKILL every
        worker, so the one injecting dies mid-batch; restart them. What the kill met is
        kept in ``kills_mid_injection`` (rows under claim at the kill)."""
        now_ms = int(self.reactor.seconds() * 1000)
        tag = f"burst-{now_ms}"
        posted = await self.db.run("post_burst", post_burst, burst, now_ms, tag)
        claimed = 0
        deadline = self.reactor.seconds() + 5.0
        while posted and not claimed and self.reactor.seconds() < deadline:
            claimed = await self.db.run("rows_under_claim", rows_under_claim,
                                        int(self.reactor.seconds() * 1000))
            if not claimed:
                await task.deferLater(self.reactor, 0.01, lambda: None)
        for child in self.workers.values():
            child.signal(signal.SIGCONT)
            child.signal(signal.SIGKILL)
        for child in list(self.workers.values()):
            await child.ended
        self.bridge_kills += len(self.workers)
        self.kills_mid_injection.append(claimed)
        self.note(f"fault: {posted} cloud messages posted; every bridge worker killed with "
                  f"SIGKILL while {claimed} outbox rows were under a claim; restarting them "
                  f"in {restart_after:.1f} s")
        await task.deferLater(self.reactor, restart_after, lambda: None)
        for i in sorted(self.workers):
            await self._start_worker(i)

    async def _pause_worker(self, i: int, seconds: float) -> None:
        """SIGSTOP worker *i* once it holds a feed lease (a worker holding none would test
        nothing), SIGCONT it *seconds* later; its leases expire meanwhile and the other
        worker takes them under newer fences."""
        child = self.workers[i]
        holder = f"demo-worker-{i}"
        waited_until = self.reactor.seconds() + 45.0
        held: list[tuple[str, int]] = []
        while not self.stop_requested and self.reactor.seconds() < waited_until:
            held = await self.db.run("leases_held", leases_held, holder,
                                     int(self.reactor.seconds() * 1000))
            if held:
                break
            await task.deferLater(self.reactor, 0.5, lambda: None)
        child.signal(signal.SIGSTOP)
        self.note(f"fault: bridge worker {i} paused (SIGSTOP) for {seconds:g} s, past its "
                  f"lease, holding {', '.join(f'{n} (fence {f})' for n, f in held) or 'no lease'}"
                  f"; when it resumes it must commit nothing under its old fences")
        self.paused_leases[i] = held
        resume_at = self.reactor.seconds() + seconds
        while not self.abort_requested and self.reactor.seconds() < resume_at:
            await task.deferLater(self.reactor, 0.5, lambda: None)
        self.paused[i] = (child, child.mark())
        child.signal(signal.SIGCONT)
        self.note(f"bridge worker {i} resumed (SIGCONT)")

    def _legacy_command(self, cmd: dict[str, Any]) -> None:
        n = len(list(self.control_dir.iterdir()))
        path = self.control_dir / f"{len(self.chaos_done):04d}-{n}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cmd), encoding="utf-8")
        tmp.replace(path)  # atomically: legacy run only reads *.json
        self.note(f"fault: legacy network: {json.dumps(cmd)}")

    async def _pg_restart(self, down_s: float) -> None:
        self.note(f"fault: PostgreSQL stopped for {down_s:g} s under load")
        code, _ = await self.command("db-stop", ["db", "stop"], timeout=60)
        if code != 0:
            raise DemoError(f"bridgectl db stop failed ({code})")
        await task.deferLater(self.reactor, down_s, lambda: None)
        # without $BRIDGE_DSN, `db dsn` starts the embedded server under $BRIDGE_HOME
        embedded_env = {k: v for k, v in self.env.items() if k != "BRIDGE_DSN"}
        code, _ = await self.command("db-start", ["db", "dsn"], timeout=120, env=embedded_env)
        if code != 0:
            raise DemoError(f"restarting the embedded PostgreSQL failed ({code})")
        self.note("PostgreSQL is back")

    def fenced_after_pause(self) -> dict[int, int]:
        """Per paused worker: log lines after its resume saying it lost a lease or was
        refused a commit under an old fence (it noticed, and committed nothing)."""
        out = {}
        for i, (child, offset) in self.paused.items():
            text = child.log_since(offset)
            out[i] = sum(1 for line in text.splitlines()
                         if "lease on feed" in line and "lost" in line
                         or "held under a newer fence" in line)
        return out

    async def _reconcile(self, why: str, max_seconds: float | None = None) -> int:
        # the final run comes after the traffic stopped and the bridge drained: compare
        # everything (the workers' measured p99 lag still remembers the faults' spikes)
        final = ("--lag-ms", "0", "--margin", "1") if why == "final" else ("--margin", "5")
        if max_seconds is None:
            max_seconds = 120.0
            if why == "cron" and self.scenario is not None \
                    and self.scenario.reconcile_max_seconds is not None:
                max_seconds = self.scenario.reconcile_max_seconds
        args = ["reconcile", "all", "--legacy", f"127.0.0.1:{self.login_port}", "--json",
                "--since", "1d", "--max-seconds", f"{max_seconds:g}", *final]
        started = self.reactor.seconds()
        # the SIGTERM is a backstop far past the deadline: a run must end by itself
        code, report = await self.command("reconcile", args, timeout=max_seconds + 60)
        seconds = self.reactor.seconds() - started
        repaired = found = 0
        for r in (report or {}).get("reports", []):
            repaired += int(r.get("repaired") or 0)
            found += int(r.get("confirmed") or 0)
        self.reconcile_runs.append({"why": why, "exit_code": code, "confirmed": found,
                                    "repaired": repaired,
                                    "t": round(self.reactor.seconds() - self.t0, 1),
                                    "seconds": round(seconds, 1), "max_seconds": max_seconds})
        meaning = {0: "in sync", 1: "error", 3: "partial or differences remain",
                   4: "locked"}.get(code, "?")
        self.note(f"reconcile all ({why}): exit {code} ({meaning}), {found} differences, "
                  f"{repaired} repaired, {seconds:.1f} s of {max_seconds:g}")
        return code

    async def _migrate_cohort(self, step: int) -> bool:
        _share, percent, phase = COHORTS[step]
        code, report = await self.command("migrate", [
            "migrate", "--percent", str(percent), "--to", phase, "--legacy",
            f"127.0.0.1:{self.login_port}", "--actor", "demo", "--json"])
        counts = (report or {}).get("counts", {})
        moved, held = counts.get("moved", 0), counts.get("held", 0)
        reasons = sorted({a["reason"] for a in (report or {}).get("accounts", [])
                          if a.get("result") == "held" and a.get("reason")})
        self.cohorts.append({"percent": percent, "to": phase, "exit_code": code,
                             "moved": moved, "held": held,
                             "t": round(self.reactor.seconds() - self.t0, 1)})
        if code == 3:
            text = (f"migrate --percent {percent} --to {phase}: {moved} moved, {held} held "
                    f"back by the gates ({'; '.join(reasons)[:160]}); retrying")
            if text != self._last_held:  # say it once, not every retry
                self._last_held = text
                self.note(text)
            return False
        self.note(f"migrate --percent {percent} --to {phase}: exit {code}, {moved} moved")
        return True

    def _legacy_line(self, line: str) -> None:
        m = re.search(r"sent=(\d+) acked=(\d+)", line)
        if m:
            self.legacy_progress = {"sent": int(m.group(1)), "acked": int(m.group(2))}

    async def _status_line(self) -> None:
        try:
            f = await self.db.run("demo_figures", figures, int(self.reactor.seconds() * 1000))
        except Exception as e:  # the store is down for a moment: say so, carry on
            self._status_print(f"store unavailable: {e}")
            return
        out = f["lag_outside_faults"]

        def ms(v: Any) -> str:
            return "-" if v is None else f"{v} ms"

        lag = (f"{ms(f['lag_to_cloud_ms'])} to cloud ({ms(out['to_cloud']['p99_ms'])} outside "
               f"faults), {ms(f['lag_to_legacy_ms'])} to legacy "
               f"({ms(out['to_legacy']['p99_ms'])})")
        if self.t_heal is None:  # what the status page showed under traffic, for the summary
            worst = self.traffic_lag["worst_outside_faults_ms"]
            for d in ("to_cloud", "to_legacy"):
                steady = out[d]["p99_ms"]
                self.traffic_lag["last"][d] = {
                    "p99_ms": f[f"lag_{d}_ms"], "p99_outside_faults_ms": steady,
                    "samples": out[d]["samples"], "met_faults": out[d]["met_faults"]}
                if steady is not None and (worst.get(d) is None or steady > worst[d]):
                    worst[d] = steady
        phases = " ".join(f"{p} {n}" for p, n in f["accounts_by_phase"].items())
        t = self.reactor.seconds() - self.t0
        acked = self.legacy_progress.get("acked", "?")
        self._status_print(
            f"[{t:5.0f}s] legacy acked {acked} | cloud {f['messages_cloud']} msgs | mirrored "
            f"to cloud {f['mirrored_to_cloud']}, to legacy {f['mirrored_to_legacy']} | p99 lag "
            f"{lag} | findings open {f['findings_open']} repaired {f['findings_repaired']} | "
            f"{phases}")

    def _status_print(self, text: str) -> None:
        stream = self.status_stream
        if stream.isatty():
            width = shutil.get_terminal_size((120, 20)).columns
            stream.write("\r\x1b[K" + text[:width - 1])
            self._dirty = True
        else:
            stream.write(text + "\n")
        stream.flush()

    def _status_clear(self) -> None:
        if self._dirty:
            self.status_stream.write("\r\x1b[K")
            self._dirty = False

    # -- the end: heal, settle, reconcile, check -------------------------------------------------

    async def _final_phase(self, record_path: Path) -> dict[str, Any]:
        from bridge.discovery import SupernodeLinks, discover
        from legacy.network import TCPNetwork

        traffic_s = self.reactor.seconds() - self.t_traffic
        self.traffic.stop_posting()
        assert self.legacy is not None
        self.legacy.signal(signal.SIGUSR1)
        self.note("traffic stopped; healing the legacy network, draining the bridge")
        t_heal = self.t_heal = self.reactor.seconds()
        self.stop_requested = False  # a Ctrl-C from here on aborts (see request_abort)
        await self._check_children()
        await self._settle(quiet_s=4.0)
        code = await self._reconcile("final")
        for _ in range(2):
            if code == 0 or self.abort_requested:
                break
            await self._settle(quiet_s=3.0)
            code = await self._reconcile("final")
        await self._settle(quiet_s=2.0, notifications=True)
        if self.abort_requested:
            return {"aborted": True}
        network = TCPNetwork(self.reactor)
        secret = state.secret(self.home, "peer")
        directory = await discover(network, "127.0.0.1", self.login_port, name="demo-check",
                                   secret=secret)
        links = SupernodeLinks(network, directory, name="demo-check", secret=secret)
        try:
            legacy_inv = await convergence.legacy_inventory(links)
        finally:
            links.close()
        versions = await self._client_versions(network, secret)
        not_owed = await self.db.run("cloud_not_owed_to_legacy",
                                     convergence.cloud_not_owed_to_legacy)
        cloud_inv = await self.db.run("cloud_inventory", convergence.cloud_inventory,
                                      list(legacy_inv), not_owed)
        dups = await self.db.run("cloud_duplicates", convergence.cloud_duplicates)
        posts_missing = await self.db.run("cloud_posts_missing", convergence.cloud_posts_missing,
                                          dict(self.traffic.stats.posted))
        final = await self.db.run("demo_figures", figures, int(self.reactor.seconds() * 1000))
        await self._stop(self.legacy)
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        verdict = convergence.judge(legacy_inv, cloud_inv, legacy_record=record,
                                    cloud_posts_missing=posts_missing,
                                    acked_cloud=len(self.traffic.stats.posted),
                                    cloud_duplicates=dups)
        n = final["notifications"]
        unsettled = n["pending"] + n["sent"]
        converged = verdict.converged and code == 0 and unsettled == 0 and record is not None
        return {
            "converged": converged,
            "messages_legacy": verdict.messages_legacy,
            "messages_cloud": final["messages_cloud"],
            "mirrored": final["mirrored_to_cloud"] + final["mirrored_to_legacy"],
            "mirrored_to_cloud": final["mirrored_to_cloud"],
            "mirrored_to_legacy": final["mirrored_to_legacy"],
            "lost": verdict.lost, "duplicates": verdict.duplicates,
            "findings_repaired": final["findings_repaired"],
            "findings_open": final["findings_open"],
            "findings_unrecoverable": final["findings_unrecoverable"],
            "notifications_owed": sum(n.values()),
            "notifications_acked": n["acked"], "notifications_failed": n["failed"],
            "notifications_unsettled": unsettled,
            "accounts_by_phase": final["accounts_by_phase"],
            "client_versions": versions,
            "check": {**verdict.to_json(), "cloud_not_owed_to_legacy": len(not_owed)},
            "final_reconcile_exit": code,
            "reconcile_runs": self.reconcile_runs,
            "cohorts": self.cohorts,
            "scenario": None if self.scenario is None else self.scenario.name,
            "chaos_events": self.chaos_done,
            "fenced_after_pause": {str(k): v for k, v in self.fenced_after_pause().items()},
            "leases_when_paused": {str(k): [n for n, _f in v]
                                   for k, v in self.paused_leases.items()},
            "kills_mid_injection": self.kills_mid_injection,
            "lag_under_traffic": self.traffic_lag,
            "faults": {"preset": self.legacy_faults, "bridge_kills": self.bridge_kills,
                       "supernode_crashes": len((record or {}).get("crashes", [])),
                       "push_loss": self.faults.push_loss,
                       "push_errors": self.faults.push_errors},
            "seconds": {"setup": round(self.t_traffic - self.t0, 1),
                        "traffic": round(traffic_s, 1),
                        "converge": round(self.reactor.seconds() - t_heal, 1)},
            "status_page": self.status_url,
            "logs": str(self.workdir),
            "config": attrs.asdict(self.config),
        }

    async def _client_versions(self, network: Any, secret: bytes) -> dict[str, Any]:
        """The versions the legacy clients reported at the login server, and its minimum
        versions (what ``bridgectl legacy versions`` shows)."""
        from legacy.peer import connect_peer

        peer = await connect_peer(network, "127.0.0.1", self.login_port, name="demo-check",
                                  secret=secret, timeout=10.0, request_timeout=10.0)
        try:
            reply = await peer.versions()
        finally:
            peer.disconnect()
        return {"spread": self.config.client_versions,
                "versions": [{"version": v.version, "logins": v.logins, "handles": v.handles}
                             for v in reply.versions],
                "rules": [{"cohort": r.cohort or None, "version": r.version}
                          for r in reply.rules]}

    async def _settle(self, quiet_s: float, notifications: bool = False) -> None:
        """Wait until the store stops changing for *quiet_s* with the outbox empty (and, with
        *notifications*, every notification acked or failed), or the settle timeout."""
        deadline = self.reactor.seconds() + self.config.settle_timeout
        last, quiet_since = None, self.reactor.seconds()
        while self.reactor.seconds() < deadline and not self.abort_requested:
            await self._check_children()
            await self._refresh_devices()
            try:
                f = await self.db.run("demo_figures", figures, int(self.reactor.seconds() * 1000))
            except Exception:  # the store is restarting: not settled yet
                await self._sleeper.sleep(1.0)
                continue
            n = f["notifications"]
            key = (f["messages_cloud"], f["mirrored_to_legacy"], f["outbox_pending"])
            if key != last:
                last, quiet_since = key, self.reactor.seconds()
            feeds = self.config.supernodes
            done = (f["outbox_pending"] == 0 and f["live_workers"] > 0
                    and f["feeds_leased"] == feeds and f["feeds_streaming"] == feeds
                    and (not notifications or n["pending"] + n["sent"] == 0))
            if done and self.reactor.seconds() - quiet_since >= quiet_s:
                return
            await self._status_line()
            await self._sleeper.sleep(1.0)

    async def _shutdown(self) -> None:
        """Stop every process and service; SIGKILL what does not stop in time."""
        self._status_clear()
        if self.traffic is not None:
            await self.traffic.stopService()
        if self.http is not None:
            await self.http.close()
        for child in [*self.workers.values(), *(c for c in (self.cloud, self.legacy)
                                                if c is not None)]:
            await self._stop(child)
        for child in list(self.children):
            if child.running:
                await self._stop(child, timeout=5.0)
        await self.db.stopService()
        await task.deferLater(self.reactor, 0, lambda: None)


def _lag_line(lag: dict[str, Any]) -> str:
    """The workers' p99 lag at the end of the traffic, and outside the faults' windows."""
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v} ms"

    last, worst = lag.get("last") or {}, lag.get("worst_outside_faults_ms") or {}
    parts = []
    for d in ("to_cloud", "to_legacy"):
        x = last.get(d) or {}
        parts.append(f"{d.replace('_', ' ')} {ms(x.get('p99_ms'))} (outside faults "
                     f"{ms(x.get('p99_outside_faults_ms'))}, worst {ms(worst.get(d))})"
                     + (f", {x['met_faults']} of {x['samples']} recent met a fault"
                        if x.get("samples") else ""))
    return "p99 lag (traffic):    " + "; ".join(parts)


def _versions_line(v: dict[str, Any]) -> str:
    versions = v.get("versions") or []
    total = sum(x["handles"] for x in versions) or 1
    seen = ", ".join(f"{x['version']} {100 * x['handles'] / total:.0f}%" for x in versions)
    rules = "; ".join(f"minimum {r['version']} for {r['cohort'] or 'everyone'}"
                      for r in v.get("rules") or []) or "no minimum"
    return f"client versions:      {seen or 'none reported'} of legacy handles; {rules}"


def render_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary for a terminal."""
    if summary.get("aborted"):
        return "demo aborted before the final check; every process was stopped"
    check = summary["check"]
    lines = [
        f"converged:            {'yes' if summary['converged'] else 'NO'}",
        f"messages:             legacy {summary['messages_legacy']}, cloud "
        f"{summary['messages_cloud']} (acknowledged: legacy {check['acked_legacy']}, "
        f"cloud {check['acked_cloud']})",
        f"mirrored:             {summary['mirrored']} (to cloud "
        f"{summary['mirrored_to_cloud']}, to legacy {summary['mirrored_to_legacy']})",
        f"lost / duplicates:    {summary['lost']} / {summary['duplicates']}"
        + (f"  (+{check['lost_by_legacy_network']} lost inside the legacy network: "
           "acknowledged by a supernode that crashed before the bridge read them)"
           if check["lost_by_legacy_network"] else ""),
        f"findings:             {summary['findings_repaired']} repaired, "
        f"{summary['findings_open']} open"
        + (f", {summary['findings_unrecoverable']} unrecoverable (lost by the legacy "
           "network itself)" if summary["findings_unrecoverable"] else ""),
        f"notifications:        {summary['notifications_owed']} owed, "
        f"{summary['notifications_acked']} acked, {summary['notifications_failed']} failed, "
        f"{summary['notifications_unsettled']} unsettled",
        "accounts by phase:    " + ", ".join(f"{p} {n}" for p, n in
                                             summary["accounts_by_phase"].items()),
        _versions_line(summary.get("client_versions") or {}),
        f"faults:               {summary['faults']['preset']}: "
        f"{summary['faults']['supernode_crashes']} supernode crashes, "
        f"{summary['faults']['bridge_kills']} bridge kills, "
        f"push loss {summary['faults']['push_loss']:.0%}",
        _lag_line(summary.get("lag_under_traffic") or {}),
        f"final reconcile:      exit {summary['final_reconcile_exit']}",
        f"time:                 set-up {summary['seconds']['setup']} s, traffic "
        f"{summary['seconds']['traffic']} s, heal to converged "
        f"{summary['seconds']['converge']} s",
        f"logs:                 {summary['logs']}",
    ]
    for key in ("missing_in_cloud", "missing_in_legacy", "cloud_posts_missing"):
        if check[key]:
            lines.append(f"{key}: {', '.join(check[key])}")
    return "\n".join(lines)
