"""The chaos suite (``bridgectl chaos``, ``make chaos``): faults injected into real processes.

Each scenario is one ``bridgectl demo`` run (``drills.demo.Demo``) with its faults replaced
by the scenario's: real processes on 127.0.0.1, a real PostgreSQL, traffic both ways, the
fault, then heal, a reconcile pass, and the invariants checked from both stacks' own records
(``drills.convergence``). A run passes only with zero lost and zero duplicated messages,
every notification settled, and (``pause-worker``) the paused worker refused its stale
commits. Each scenario runs over several seeds: the seed moves every fault in time.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, TextIO

import attrs

from drills.config import DemoConfig, Scenario
from drills.databases import drop_database, fresh_database
from drills.demo import Demo

Plan = list[tuple[float, str, dict[str, Any]]]

#: reconcile-crash: the cron runs' interval and deadline, the operator's run's deadline, and
#: how much longer than its deadline a run's process may take (interpreter start, schema
#: check and database connect before the deadline's clock starts; exit after it).
RECONCILE_CRON_EVERY_S = 5.0
RECONCILE_CRON_DEADLINE_S = 12.0
RECONCILE_BY_HAND_S = 20.0
PROCESS_SLACK_S = 8.0


def _bridge_kill(rng: random.Random, window: float) -> Plan:
    return [(rng.uniform(0.05, 0.85) * window, "kill_worker",
             {"restart_after": round(rng.uniform(0.2, 2.0), 2)}) for _ in range(10)]


def _pg_restart(rng: random.Random, window: float) -> Plan:
    return [(rng.uniform(0.25, 0.45) * window, "pg_restart", {"down_s": 5.0})]


def _supernode_crash(rng: random.Random, window: float) -> Plan:
    return [(rng.uniform(0.25, 0.45) * window, "legacy",
             {"crash": 0.3, "restart_after": 5.0, "storm": True})]


def _reconcile_during_crash(rng: random.Random, window: float) -> Plan:
    """30% of the supernodes crash while cron runs (every few seconds, short deadline) and
    an operator's run by hand are under way; they come back 10 s later."""
    t = rng.uniform(0.25, 0.45) * window
    return [(t, "legacy", {"crash": 0.3, "restart_after": 10.0}),
            (t + rng.uniform(0.5, 2.0), "reconcile", {"max_seconds": RECONCILE_BY_HAND_S})]


def _partition(rng: random.Random, window: float) -> Plan:
    return [(rng.uniform(0.15, 0.3) * window, "legacy",
             {"cut_peers": 0.5, "seconds": 20.0, "prefix": "demo-worker-"})]


def _inject_kill(rng: random.Random, window: float) -> Plan:
    return [(rng.uniform(0.1, 0.85) * window, "kill_injecting",
             {"burst": 400, "restart_after": round(rng.uniform(0.2, 1.5), 2)})
            for _ in range(4)]


def _pause_worker(rng: random.Random, window: float) -> Plan:
    return [(rng.uniform(0.1, 0.2) * window, "kill_worker", {"worker": 1, "restart_after": 3.0}),
            (rng.uniform(0.3, 0.4) * window, "pause_worker", {"worker": 2, "seconds": 25.0})]


SCENARIOS = {s.name: s for s in (
    Scenario("bridge-kill", "a bridge worker SIGKILLed at 10 random moments and restarted",
             _bridge_kill),
    Scenario("pg-restart", "the embedded PostgreSQL stopped for 5 s and started under load",
             _pg_restart, needs_embedded=True),
    Scenario("supernode-crash", "30% of supernodes crash at once (memory lost), restart "
             "after 5 s, then every online device logs in again (the 2010 shape)",
             _supernode_crash),
    Scenario("partition", "the bridge workers cut off from half the supernodes for 20 s",
             _partition),
    Scenario("reconcile-crash", "reconcile all every 5 s (deadline 12 s) and once by hand "
             "(deadline 20 s) while 30% of supernodes crash, back after 10 s: every run "
             "exits 0, 3 or 4 within its deadline",
             _reconcile_during_crash, reconcile_every=RECONCILE_CRON_EVERY_S,
             reconcile_max_seconds=RECONCILE_CRON_DEADLINE_S),
    Scenario("push-loss", "the push gateway loses 20% of notifications",
             lambda _rng, _w: [], push_loss=0.2),
    Scenario("inject-kill", "400 cloud messages posted at once, every worker SIGKILLed while "
             "an injection batch is in flight, then restarted; four times",
             _inject_kill),
    Scenario("pause-worker", "two workers: one SIGKILLed, the other paused (SIGSTOP) for "
             "25 s, past its 15 s lease, then resumed: it must commit nothing stale",
             _pause_worker),
)}


@attrs.frozen
class ChaosResult:
    scenario: str
    seed: int
    passed: bool
    why: str
    summary: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        s = self.summary
        check = s.get("check", {})
        return {
            "scenario": self.scenario, "seed": self.seed, "passed": self.passed,
            "why": self.why,
            "acked_legacy": check.get("acked_legacy"), "acked_cloud": check.get("acked_cloud"),
            "lost": s.get("lost"), "duplicates": s.get("duplicates"),
            "lost_by_legacy_network": check.get("lost_by_legacy_network"),
            "cloud_not_owed_to_legacy": check.get("cloud_not_owed_to_legacy"),
            "notifications_owed": s.get("notifications_owed"),
            "notifications_acked": s.get("notifications_acked"),
            "notifications_failed": s.get("notifications_failed"),
            "findings_repaired": s.get("findings_repaired"),
            "seconds_to_converge": s.get("seconds", {}).get("converge"),
            "fenced_after_pause": s.get("fenced_after_pause"),
            "leases_when_paused": s.get("leases_when_paused"),
            "chaos_events": s.get("chaos_events"),
            "kills_mid_injection": s.get("kills_mid_injection"),
            "reconcile_runs": s.get("reconcile_runs"),
        }


def verdict(scenario: Scenario, summary: dict[str, Any]) -> tuple[bool, str]:
    """Pass only with nothing lost or duplicated, everything settled, and (when a worker
    was paused past its lease) evidence that it was fenced off."""
    if summary.get("aborted"):
        return False, "aborted"
    problems = []
    if summary["lost"]:
        problems.append(f"{summary['lost']} lost")
    if summary["duplicates"]:
        problems.append(f"{summary['duplicates']} duplicated")
    if summary["notifications_unsettled"]:
        problems.append(f"{summary['notifications_unsettled']} notifications unsettled")
    if summary["final_reconcile_exit"] != 0:
        problems.append(f"final reconcile exit {summary['final_reconcile_exit']}")
    if not summary["converged"] and not problems:
        problems.append("not converged")
    if scenario.reconcile_max_seconds is not None:
        runs = [r for r in summary.get("reconcile_runs", []) if r["why"] != "final"]
        if not any(r["why"] == "hand" for r in runs) or len(runs) < 3:
            problems.append(f"too few reconcile runs to judge ({len(runs)})")
        for r in runs:
            if r["exit_code"] not in (0, 3, 4):
                problems.append(f"reconcile ({r['why']}, t={r['t']}) exit {r['exit_code']}")
            if r["seconds"] > r["max_seconds"] + PROCESS_SLACK_S:
                problems.append(f"reconcile ({r['why']}, t={r['t']}) took {r['seconds']} s "
                                f"past its {r['max_seconds']:g} s deadline")
    planned = sum(1 for _t, action, _kw in scenario.plan(random.Random(0), 60.0)
                  if action == "pause_worker")
    fenced = summary.get("fenced_after_pause", {})
    held = summary.get("leases_when_paused", {})
    if planned and (len(held) < planned or not all(held.values())):
        problems.append(f"a worker was paused holding no lease, which tests nothing ({held})")
    elif planned and (len(fenced) < planned or not all(fenced.values())):
        problems.append(f"a paused worker showed no sign of being fenced off ({fenced})")
    kills = sum(1 for _t, action, _kw in scenario.plan(random.Random(0), 60.0)
                if action == "kill_injecting")
    met = summary.get("kills_mid_injection", [])
    if kills and sum(1 for n in met if n > 0) * 2 < kills:
        problems.append(f"fewer than half the kills met an injection batch in flight, which "
                        f"tests little (rows under claim at each kill: {met})")
    return (not problems), "; ".join(problems) or "ok"


async def run_suite(reactor: Any, names: list[str], seeds: list[int], *, server_dsn: str,
                    home: Path, duration: float, out: TextIO, status_stream: TextIO,
                    stop_requested: Any = lambda: False, sizes: dict[str, Any] | None = None
                    ) -> list[ChaosResult]:
    """Run each scenario of *names* once per seed, each in a fresh database (dropped after
    a run that passed, kept for a post-mortem after one that failed)."""
    results = []
    for name in names:
        scenario = SCENARIOS[name]
        for seed in seeds:
            if stop_requested():
                return results
            # one database per run; kept when the run fails, for a post-mortem
            dbname = f"bridge_chaos_{name.replace('-', '_')}_{seed}_{os.getpid()}"
            dsn = await reactor_thread(reactor, fresh_database, server_dsn, dbname)
            config = DemoConfig(duration=duration, seed=seed, faults="none",
                                reconcile_every=scenario.reconcile_every
                                or max(10.0, duration / 3), **(sizes or {}))
            workdir = home / "chaos" / f"{name}-{seed}"
            print(f"== {name} (seed {seed}): {scenario.description}", file=status_stream,
                  flush=True)
            demo = Demo(reactor, config, dsn=dsn, home=home, workdir=workdir, out=out,
                        status_stream=status_stream, scenario=scenario)
            try:
                summary = await demo.run()
            except Exception as e:  # DemoError, or a process that would not start
                results.append(ChaosResult(name, seed, False, f"error: {e}", {}))
                print(f"   FAIL {name} seed {seed}: {e}", file=status_stream, flush=True)
                continue
            passed, why = verdict(scenario, summary)
            result = ChaosResult(name, seed, passed, why, summary)
            if passed:
                await reactor_thread(reactor, drop_database, server_dsn, dbname)
            results.append(result)
            print("   " + render_line(result), file=status_stream, flush=True)
    return results


def reactor_thread(reactor: Any, fn: Any, *args: Any) -> Any:
    from twisted.internet import threads

    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


def render_line(result: ChaosResult) -> str:
    j = result.to_json()
    return (f"{'PASS' if result.passed else 'FAIL'} {j['scenario']:<16} seed {j['seed']:<3} "
            f"acked legacy {j['acked_legacy']} cloud {j['acked_cloud']}  lost {j['lost']}  "
            f"dup {j['duplicates']}  notifications {j['notifications_owed']} owed/"
            f"{j['notifications_acked']} acked/{j['notifications_failed']} failed  "
            f"repaired {j['findings_repaired']}  converged in {j['seconds_to_converge']} s"
            + ("" if result.passed else f"  ({result.why})"))
