"""The whole-migration simulation (``drills.simulation``, ``bridgectl simulate``): a bounded
run converges, replays exactly from its seed, and bad flags or plans are refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import psycopg
import pytest

from bridgectl import main as cli
from cloud.store import accounts as accounts_store
from cloud.store import messages as messages_store
from drills import simcheck, simtraffic
from drills.simplan import FAULTS, PlanStep, SimConfig, default_plan, parse_plan
from drills.simulation import Simulation
from legacy.network import MemoryNetwork
from legacy.sim import LegacyDeployment, RunConfig
from legacy.simclock import SimClock
from tests.dbfixture import make_account, make_conversation, truncate_all, tx

#: Reconciles every 2 simulated hours, so the gates have a recent clean run to see; every
#: account dual on the first afternoon, then cloud, then half of them cloud-only.
PLAN = (PlanStep(0.45, 100, "dual"), PlanStep(0.6, 100, "cloud"),
        PlanStep(0.75, 50, "cloud-only"))


def simulate(conn: psycopg.Connection, db_dsn: str, seed: int, **overrides) -> dict:
    truncate_all(conn)
    config = SimConfig(**{"days": 1.0, "users": 50, "supernodes": 4, "seed": seed,
                          "faults": "light", "plan": PLAN, "reconcile_every_h": 2.0,
                          **overrides})
    with psycopg.connect(db_dsn, autocommit=True) as lock_conn:
        return Simulation(config, conn, lock_conn).run()


def test_a_bounded_run_converges_and_replays_exactly_from_its_seed(conn, db_dsn):
    """A day under light faults, cohorts moving to cloud-only while both stacks
    post: nothing lost, nothing duplicated, every notification acknowledged or failed in
    sight; the same seed gives the same outcome hash, another seed another one."""
    first = simulate(conn, db_dsn, 7)
    assert first["converged"], json.dumps(first["verdict"])
    assert first["lost"] == 0 and first["duplicates"] == 0
    m = first["messages"]
    assert m["legacy_sent"] > 20 and m["cloud_posted"] > 20  # both stacks carried traffic
    assert sum(x["moved"] for x in first["moves"]) > 0
    assert first["accounts_by_phase"][-1]["cloud-only"] > 0
    # every notification owed was acknowledged or is visibly failed, none left pending
    assert first["notifications_owed"] > 0
    assert first["notifications_pending"] == 0
    assert (first["notifications_acked"] + first["notifications_failed"]
            == first["notifications_owed"])
    kinds = {r["kind"] for r in first["reconcile_runs"]}
    assert kinds == {"gaps", "notifications", "presence"}
    # the final pass ran after the last day, and none of its three runs failed
    final = first["reconcile_runs"][-3:]
    assert {r["kind"] for r in final} == kinds and all(r["day"] > 1.0 for r in final)
    assert all(r["exit_code"] != 1 for r in final)
    again = simulate(conn, db_dsn, 7)
    assert again["outcome_hash"] == first["outcome_hash"]
    assert again["trace_hash"] == first["trace_hash"]
    assert again["messages"] == first["messages"]
    other = simulate(conn, db_dsn, 8)
    assert other["outcome_hash"] != first["outcome_hash"]


def test_the_2010_outage_loses_supernodes_at_once_and_the_run_still_converges(conn, db_dsn):
    """Over a quarter of the supernodes go down together and every device logs in again:
    what the legacy network itself lost is counted apart, nothing else is lost."""
    out = simulate(conn, db_dsn, 3, faults="outage-2010", supernodes=8, days=0.75,
                   plan=(PlanStep(0.4, 50, "dual"),))
    assert out["faults"]["outages"] == 1
    assert out["faults"]["supernode_crashes"] >= 2  # 28% of 8
    assert out["converged"], json.dumps(out["verdict"])


def test_heavy_faults_with_bridge_workers_killed_mid_run_lose_and_duplicate_nothing(
        conn, db_dsn):
    """Supernode crashes, hop loss, push errors and bridge workers dying as by SIGKILL
    (nothing drained, no lease released) and coming back under new ids: invariant 4 over a
    simulated day."""
    out = simulate(conn, db_dsn, 11, faults="heavy")
    assert out["faults"]["worker_kills"] >= 1
    assert out["faults"]["supernode_crashes"] >= 1
    assert out["converged"], json.dumps(out["verdict"])
    assert out["duplicates"] == 0 and out["lost"] == 0


# ---------------------------------------------------------------- plans and flags

def test_the_default_plan_is_stretched_to_the_run_and_ends_with_cloud_only():
    plan = default_plan(90)
    assert plan[-1].phase == "cloud-only" and plan[-1].day == 86.0
    assert [s.day for s in plan] == sorted(s.day for s in plan)
    assert default_plan(45)[0] == PlanStep(2, 5, "dual")


def test_a_plan_file_reads_objects_and_triples_in_day_order():
    steps = parse_plan('[[3, 20, "cloud"], {"day": 1.5, "percent": 20, "phase": "dual"}]')
    assert steps == (PlanStep(1.5, 20, "dual"), PlanStep(3, 20, "cloud"))


@pytest.mark.parametrize("text,needle", [
    ("not json", "not JSON"),
    ("[]", "non-empty JSON list"),
    ('{"day": 1}', "non-empty JSON list"),
    ('[{"day": 1, "percent": 10}]', "plan step 1: missing 'phase'"),
    ('[{"day": 1, "percent": 10, "phase": "legacy"}]', "phase must be one of"),
    ('[[1, 10, "dual"], [2, 150, "cloud"]]', "plan step 2: a plan step's percent"),
    ('[[-1, 10, "dual"]]', "day must be a number >= 0"),
    ('[[1, 10, "dual", 4]]', "want {"),
    ('[{"day": 1, "percent": 10, "phase": "dual", "when": 3}]', "unknown key 'when'"),
])
def test_a_bad_plan_is_refused_with_the_step_it_concerns(text, needle):
    with pytest.raises(ValueError) as e:
        parse_plan(text)
    assert needle in str(e.value)


def test_every_fault_profile_is_a_choice_of_the_command():
    assert set(FAULTS) == {"none", "light", "heavy", "outage-2010"}


@pytest.mark.parametrize("argv,needle", [
    (["--days", "0"], "--days must be a number above 0"),
    (["--users", "1"], "--users must be a whole number between 2"),
    (["--supernodes", "0"], "--supernodes must be a whole number between 1"),
    (["--rate", "-1"], "--rate must be a number above 0"),
    (["--seeds", "5..1"], "A <= B"),
    (["--seeds", "1-5"], "--seeds must look like A..B"),
    (["--seeds", "1..5000"], "at most 1000 seeds"),
    (["--reconcile-every", "0"], "--reconcile-every"),
    (["--database", "postgres"], "--database must start with bridge_sim"),
    (["--plan", "/nonexistent/plan.json"], "cannot read --plan"),
])
def test_bad_flags_exit_2_with_one_clear_line_before_anything_runs(argv, needle, capsys,
                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    monkeypatch.setenv("BRIDGE_DSN", "postgresql://nobody@127.0.0.1:1/none")  # never reached
    assert cli.main(["simulate", *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bridgectl: error:") and needle in err[0], err


def test_a_bad_plan_file_exits_2_naming_the_file_and_the_step(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    monkeypatch.setenv("BRIDGE_DSN", "postgresql://nobody@127.0.0.1:1/none")
    plan = tmp_path / "plan.json"
    plan.write_text('[[1, 10, "dual"], [2, 10, "sideways"]]')
    assert cli.main(["simulate", "--plan", str(plan)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(plan) in err and "plan step 2" in err and "sideways" in err


def test_the_command_prints_a_report_and_the_replay_line_of_a_swarm(capsys, db_server,
                                                                     tmp_path, monkeypatch):
    """Two seeds through the command: a JSON report each, exit 0 when both converged."""
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    monkeypatch.setenv("BRIDGE_DSN", db_server)
    code = cli.main(["simulate", "--days", "0.5", "--users", "20", "--supernodes", "3",
                     "--faults", "none", "--seeds", "4..5", "--json",
                     "--database", "bridge_sim_test"])
    out, err = capsys.readouterr()
    reports = [json.loads(line) for line in out.splitlines()]
    assert [r["seed"] for r in reports] == [4, 5]
    assert code == (cli.EXIT_OK if all(r["converged"] for r in reports) else 3)
    assert reports[0]["replay"].startswith("bridgectl simulate --seed 4 --days 0.5")
    assert "2 of 2 seeds converged" in err or "did not converge; replay:" in err
    assert "day 0.5/0.5" in err  # the progress line


def test_the_check_owes_legacy_nothing_in_a_chat_all_of_whose_members_left_it(conn):
    """A cloud message legacy never got is lost while a member still has legacy clients;
    once every member is cloud-only, legacy owes that chat nothing (invariant 1: "wherever
    a participant still uses legacy clients"); a 45-day run had counted 122 such messages,
    forgotten by home supernodes that restarted after the chats' members had all left."""
    dep = LegacyDeployment(RunConfig(supernodes=1, users=2, duration=None),
                           MemoryNetwork(SimClock()), peer_secret=b"p" * 20,
                           login_secret=b"l" * 20)
    chat = dep.chats[0]
    a, b = [make_account(conn, handle, "cloud") for handle in chat.members]
    cid = make_conversation(conn, a, b, chat=chat.chat_id)
    message, _ = tx(conn, messages_store.post_message, cid, a, "c1", "hi", 1_000)
    posted = {"c1": (str(cid), message.seq)}
    month_ms = 30 * 86_400_000
    owed = simcheck.verdict(conn, dep, posted, 2_000, month_ms)
    assert not owed.converged
    assert owed.missing_in_legacy == (f"{chat.chat_id}/cloud:{message.message_id}",)
    for account in (a, b):
        tx(conn, accounts_store.set_phase, account, "cloud-only")
    assert simcheck.verdict(conn, dep, posted, 2_000, month_ms).converged


def test_traffic_follows_a_working_day_and_a_week():
    """The hourly weights average 1 over a working day (so --rate is messages per user per
    day), nights are quieter than mornings, weekends carry a share; sessions start in the
    morning or evening and end after they start."""
    day = [simtraffic.weight(h * 3600 + 1) for h in range(24)]
    assert sum(day) / 24 == pytest.approx(1.0)
    assert simtraffic.weight(3 * 3600) < 0.2 < 1.5 < simtraffic.weight(10 * 3600)
    assert simtraffic.weight(5 * 86_400 + 10 * 3600) == pytest.approx(
        simtraffic.weight(10 * 3600) * simtraffic.WEEKEND)
    assert max(day) / 1.0 == pytest.approx(simtraffic.PEAK)
    rng = random.Random(1)
    sessions = [s for d in range(70) for s in simtraffic.day_sessions(rng, d)]
    assert len(sessions) > 50 and all(off > on for on, off in sessions)
    assert all(5 <= on <= 13 or 19 <= on <= 22 for on, _ in sessions)


def test_a_seed_replays_in_another_process_with_other_string_hashes(db_server, tmp_path):
    """What a swarm prints as the replay command gives the same outcome in a new process,
    whatever Python's string hash seed there (nothing that decides iterates a set of
    strings or objects)."""
    hashes = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "BRIDGE_DSN": db_server,
               "BRIDGE_HOME": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-m", "bridgectl", "simulate", "--days", "0.5", "--users", "30",
             "--supernodes", "3", "--faults", "heavy", "--seed", "5", "--json",
             "--database", "bridge_sim_replay"],
            env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode in (0, 3), done.stderr[-2000:]
        hashes.append(json.loads(done.stdout)["outcome_hash"])
    assert hashes[0] == hashes[1]
