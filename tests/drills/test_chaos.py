"""The chaos suite: its verdict, its plans, and one bounded scenario on real processes (the
full suite is ``make chaos``)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from drills import chaos

GOOD = {"lost": 0, "duplicates": 0, "notifications_unsettled": 0, "final_reconcile_exit": 0,
        "converged": True, "fenced_after_pause": {}}


def test_verdict_passes_only_with_nothing_lost_duplicated_or_unsettled():
    kill = chaos.SCENARIOS["bridge-kill"]
    assert chaos.verdict(kill, GOOD) == (True, "ok")
    for key, value, why in (("lost", 2, "2 lost"), ("duplicates", 1, "1 duplicated"),
                            ("notifications_unsettled", 3, "3 notifications unsettled"),
                            ("final_reconcile_exit", 3, "final reconcile exit 3")):
        passed, text = chaos.verdict(kill, {**GOOD, key: value, "converged": False})
        assert not passed and why in text
    assert chaos.verdict(kill, {"aborted": True}) == (False, "aborted")
    # nothing counted as lost, yet the check did not converge (e.g. no legacy record)
    assert chaos.verdict(kill, {**GOOD, "converged": False}) == (False, "not converged")


def test_a_paused_worker_must_have_held_a_lease_and_show_it_was_fenced_off():
    pause = chaos.SCENARIOS["pause-worker"]
    held = {"leases_when_paused": {"2": ["feed:sn0001"]}}
    assert not chaos.verdict(pause, GOOD)[0]  # no evidence at all
    assert not chaos.verdict(pause, {**GOOD, **held, "fenced_after_pause": {"2": 0}})[0]
    assert chaos.verdict(pause, {**GOOD, **held, "fenced_after_pause": {"2": 3}})[0]
    # paused while holding nothing: the run proved nothing about fencing
    passed, why = chaos.verdict(pause, {**GOOD, "leases_when_paused": {"2": []},
                                        "fenced_after_pause": {"2": 3}})
    assert not passed and "holding no lease" in why


def test_kills_mid_injection_must_have_met_a_batch_in_flight():
    """inject-kill passes only when at least half its kills found outbox rows under a live
    claim (an injection batch in flight); otherwise it proved nothing about mid-batch."""
    scenario = chaos.SCENARIOS["inject-kill"]
    assert not chaos.verdict(scenario, GOOD)[0]  # no evidence at all
    passed, why = chaos.verdict(scenario, {**GOOD, "kills_mid_injection": [0, 0, 0, 37]})
    assert not passed and "in flight" in why
    assert chaos.verdict(scenario, {**GOOD, "kills_mid_injection": [12, 0, 40, 37]}) == (
        True, "ok")


@pytest.mark.parametrize("name", sorted(chaos.SCENARIOS))
def test_plans_fit_the_window_and_follow_the_seed(name):
    scenario = chaos.SCENARIOS[name]
    plan = scenario.plan(random.Random(7), 45.0)
    assert plan == scenario.plan(random.Random(7), 45.0)
    for t, action, kw in plan:
        assert 0 <= t <= 45.0 and action in ("kill_worker", "pause_worker", "legacy",
                                             "pg_restart", "reconcile",
                                             "kill_injecting")
        if action == "pause_worker":
            assert kw["seconds"] > 15.0  # past the 15 s lease, or it proves nothing
    if name == "bridge-kill":
        assert sum(a == "kill_worker" for _, a, _ in plan) == 10


def run_scenario(db_server: str, tmp_path, name: str, *, duration: int, supernodes: int,
                 legacy_users: int) -> dict:
    """``bridgectl chaos --scenario NAME`` once (seed 2) on real processes: it must pass;
    its one run's JSON."""
    env = {**os.environ, "BRIDGE_HOME": str(tmp_path)}
    env.pop("BRIDGE_DSN", None)
    done = subprocess.run(
        [sys.executable, "-m", "bridgectl.main", "chaos", "--scenario", name,
         "--seeds", "1", "--first-seed", "2", "--duration", str(duration), "--supernodes",
         str(supernodes), "--legacy-users", str(legacy_users), "--rate", "8",
         "--dsn", db_server, "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["passed"] is True
    [run] = out["runs"]
    return run


@pytest.mark.db
@pytest.mark.processes
def test_pause_worker_scenario_passes_on_real_processes(db_server, tmp_path):
    """Two workers, one SIGKILLed and one paused past its lease: nothing lost or doubled,
    and the paused one noticed it was fenced off (the bounded subset of make chaos)."""
    run = run_scenario(db_server, tmp_path, "pause-worker", duration=35, supernodes=3,
                       legacy_users=24)
    assert run["lost"] == 0 and run["duplicates"] == 0 and run["acked_legacy"] > 0
    assert run["leases_when_paused"]["2"] and run["fenced_after_pause"]["2"] > 0
    assert [e["action"] for e in run["chaos_events"]] == ["kill_worker", "pause_worker"]


def test_reconcile_crash_wants_every_run_to_exit_0_3_or_4_within_its_deadline():
    """The reconcile-crash verdict: cron and hand runs each end 0, 3 or 4, within their
    --max-seconds (plus the process's start-up slack); an exit 1 or an overrun fails it."""
    scenario = chaos.SCENARIOS["reconcile-crash"]
    runs = [{"why": "cron", "exit_code": 0, "seconds": 2.0, "max_seconds": 12.0, "t": 10},
            {"why": "hand", "exit_code": 4, "seconds": 1.0, "max_seconds": 20.0, "t": 19},
            {"why": "cron", "exit_code": 3, "seconds": 12.5, "max_seconds": 12.0, "t": 24},
            {"why": "final", "exit_code": 0, "seconds": 3.0, "max_seconds": 120.0, "t": 40}]
    assert chaos.verdict(scenario, {**GOOD, "reconcile_runs": runs}) == (True, "ok")
    failed = [*runs[:2], {**runs[2], "exit_code": 1}, runs[3]]
    passed, why = chaos.verdict(scenario, {**GOOD, "reconcile_runs": failed})
    assert not passed and "exit 1" in why
    late = [*runs[:2], {**runs[2], "seconds": 12.0 + chaos.PROCESS_SLACK_S + 1}, runs[3]]
    passed, why = chaos.verdict(scenario, {**GOOD, "reconcile_runs": late})
    assert not passed and "past its 12 s deadline" in why
    passed, why = chaos.verdict(scenario, {**GOOD, "reconcile_runs": runs[:1]})
    assert not passed and "too few reconcile runs" in why


@pytest.mark.db
@pytest.mark.processes
def test_reconcile_crash_scenario_passes_on_real_processes(db_server, tmp_path):
    """Cron-like reconcile runs and one by hand while 30% of 10 supernodes crash: each run
    exits 0, 3 or 4 within its deadline, and the final one is clean with nothing lost (in
    the bounded subset: it runs in about 52 s here)."""
    run = run_scenario(db_server, tmp_path, "reconcile-crash", duration=35, supernodes=10,
                       legacy_users=40)
    assert run["lost"] == 0 and run["duplicates"] == 0 and run["acked_legacy"] > 0
    runs = run["reconcile_runs"]
    assert {r["why"] for r in runs} == {"cron", "hand", "final"}
    assert all(r["exit_code"] in (0, 3, 4) for r in runs)
    assert runs[-1]["why"] == "final" and runs[-1]["exit_code"] == 0
    assert [e["action"] for e in run["chaos_events"]] == ["legacy", "reconcile"]


@pytest.mark.db
@pytest.mark.processes
def test_inject_kill_scenario_passes_on_real_processes(db_server, tmp_path):
    """Every worker SIGKILLed while an injection batch is in flight, four times: nothing
    lost or duplicated, and each kill met rows under a live claim."""
    run = run_scenario(db_server, tmp_path, "inject-kill", duration=30, supernodes=3,
                       legacy_users=24)
    assert run["lost"] == 0 and run["duplicates"] == 0
    assert [e["action"] for e in run["chaos_events"]] == ["kill_injecting"] * 4
    assert sum(n > 0 for n in run["kills_mid_injection"]) >= 2
