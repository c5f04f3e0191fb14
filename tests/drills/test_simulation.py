"""The whole-migration simulation (``drills.simulation``, ``bridgectl simulate``): a bounded
run converges, replays exactly from its seed, and bad flags or plans are refused."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import psycopg
import pytest

from bridge import ids
from bridgectl import cmd_simulate
from bridgectl import main as cli
from cloud.store import accounts as accounts_store
from cloud.store import messages as messages_store
from drills import simcheck, simtraffic
from drills.simfaults import outage_start_s
from drills.simplan import (
    DAY_S,
    FAULTS,
    PlanStep,
    SimConfig,
    check_plan,
    default_plan,
    parse_plan,
    ring_size,
)
from drills.simulation import START_S, Simulation
from legacy.network import MemoryNetwork
from legacy.sim import LegacyDeployment, RunConfig
from legacy.simclock import SimClock
from tests.dbfixture import make_account, make_conversation, truncate_all, tx

#: Reconciles every 2 simulated hours, so the gates have a recent clean run to see; every
#: account dual on the first afternoon, then cloud, then half of them cloud-only.
PLAN = (PlanStep(0.45, 100, "dual"), PlanStep(0.6, 100, "cloud"),
        PlanStep(0.75, 50, "cloud-only"))
#: The same, with the cloud-only cohort rolled back in the evening and moved forward again.
PLAN_WITH_ROLLBACK = (PlanStep(0.45, 100, "dual"), PlanStep(0.6, 100, "cloud"),
                      PlanStep(0.7, 50, "cloud-only"), PlanStep(0.85, 50, reverse=True),
                      PlanStep(0.92, 50, "cloud-only"))


def run_simulation(conn: psycopg.Connection, db_dsn: str, seed: int,
                   **overrides) -> tuple[dict, Simulation]:
    truncate_all(conn)
    PROGRESS.clear()
    config = SimConfig(**{"days": 1.0, "users": 50, "supernodes": 4, "seed": seed,
                          "faults": "light", "plan": PLAN, "reconcile_every_h": 2.0,
                          **overrides})
    with psycopg.connect(db_dsn, autocommit=True) as lock_conn:
        sim = Simulation(config, conn, lock_conn, progress=PROGRESS.append)
        return sim.run(), sim


#: the progress lines of the latest run above, for a test to read
PROGRESS: list[str] = []


def simulate(conn: psycopg.Connection, db_dsn: str, seed: int, **overrides) -> dict:
    return run_simulation(conn, db_dsn, seed, **overrides)[0]


def test_a_bounded_run_converges_and_replays_exactly_from_its_seed(conn, db_dsn):
    """A day under light faults, cohorts moving to cloud-only while both stacks
    post, the cloud-only cohort rolled back in the evening and moved forward again: nothing
    lost, nothing duplicated, every notification acknowledged or failed in sight; the same
    seed gives the same outcome hash, another seed another one."""
    first, sim = run_simulation(conn, db_dsn, 7, plan=PLAN_WITH_ROLLBACK)
    assert first["converged"], json.dumps(first["verdict"])
    assert first["lost"] == 0 and first["duplicates"] == 0
    m = first["messages"]
    assert m["legacy_sent"] > 20 and m["cloud_posted"] > 20  # both stacks carried traffic
    assert sum(x["moved"] for x in first["moves"]) > 0
    assert first["accounts_by_phase"][-1]["cloud-only"] > 0
    _check_the_rollback(conn, first, sim)
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
    first_day = _check_the_work(first, PROGRESS)
    again = simulate(conn, db_dsn, 7, plan=PLAN_WITH_ROLLBACK)
    assert again["outcome_hash"] == first["outcome_hash"]
    # what the run cost in frames and transactions is the seed's too (the seconds are not),
    # and so is the day's line: counted from the day's start, not from the process's
    assert ({k: again["work"][k] for k in ("legacy_frames", "transactions")}
            == {k: first["work"][k] for k in ("legacy_frames", "transactions")})
    assert _check_the_work(again, PROGRESS) == first_day
    assert again["trace_hash"] == first["trace_hash"]
    assert again["messages"] == first["messages"]
    assert again["rollbacks"] == first["rollbacks"]
    other = simulate(conn, db_dsn, 8, plan=PLAN_WITH_ROLLBACK)
    assert other["outcome_hash"] != first["outcome_hash"]


def _check_the_work(report: dict, progress: list[str]) -> tuple[int, int]:
    """The report's ``work`` counts this run's frames and transactions, and the day's
    progress line a part of them (the finish adds its own); returns the line's two counts."""
    work = report["work"]
    assert work["legacy_frames"] > 0 and work["transactions"] > 0
    assert work["transaction_seconds"] > 0
    (line,) = [x for x in progress if x.startswith("day 1/1:")]
    found = re.search(r"today ([\d,]+) frames, ([\d,]+) transactions \(([\d.]+) s\)", line)
    assert found, line
    frames, transactions = (int(found[i].replace(",", "")) for i in (1, 2))
    assert 0 < frames < work["legacy_frames"]
    assert 0 < transactions < work["transactions"]
    return frames, transactions


def _check_the_rollback(conn: psycopg.Connection, report: dict, sim: Simulation) -> None:
    """Each forward step ran through its own cohort and the reverse through the cloud-only
    step's: its accounts went back to where they were (the phases after the step before it),
    and every cloud message posted while they were cloud-only is in its chat's history on
    its home supernode (legacy's own records), some of them there by the back-fill."""
    steps = {x["cohort"]: x for x in report["moves"] if x["action"] == "advance"}
    assert list(steps) == ["step-1-dual-100", "step-2-cloud-100", "step-3-cloud-only-50",
                           "step-5-cloud-only-50"]
    back = [x for x in report["moves"] if x["action"] == "reverse"]
    assert len(back) == 1 and back[0]["cohort"] == "step-3-cloud-only-50"
    moved = steps["step-3-cloud-only-50"]["moved"]
    assert moved > 0 and back[0]["moved"] == moved and back[0]["failed"] == 0
    assert steps["step-3-cloud-only-50"]["accounts_by_phase"]["cloud-only"] == moved
    assert back[0]["accounts_by_phase"] == steps["step-2-cloud-100"]["accounts_by_phase"]
    assert report["rollbacks"] == {"steps": 1, "moved_back": moved,
                                   "backfilled": back[0]["backfilled"], "failed": 0}
    assert report["rollbacks"]["backfilled"] > 0
    # the store's own record of the cohorts: the reversed one was cancelled by the next step
    states = dict(conn.execute("SELECT name, state FROM cohorts").fetchall())
    assert states == {"step-1-dual-100": "completed", "step-2-cloud-100": "completed",
                      "step-3-cloud-only-50": "cancelled", "step-5-cloud-only-50": "active"}
    # legacy's own records: the home supernodes' histories
    day_ms = 86_400_000
    start_ms = int(START_S * 1000)
    window = conn.execute(
        "SELECT l.legacy_chat_id, coalesce(m.legacy_guid, %s || m.message_id::text) "
        "FROM messages m "
        "JOIN conversation_legacy_ids l USING (conversation_id) WHERE m.origin = 'cloud' "
        "AND m.sent_ms >= %s AND m.sent_ms < %s",
        (ids.CLOUD_PREFIX, start_ms + int(0.7 * day_ms),
         start_ms + int(0.85 * day_ms))).fetchall()
    assert len(window) >= report["rollbacks"]["backfilled"]
    held = sim.legacy_histories
    assert sum(len(guids) for guids in held.values()) > 0
    missing = [(chat, guid) for chat, guid in window if guid not in held.get(chat, ())]
    assert missing == []


def test_the_2010_outage_loses_supernodes_at_once_and_the_run_still_converges(conn, db_dsn):
    """Over a quarter of the supernodes go down together on the afternoon; their devices
    log in again at once, the offline-message answers queue up, late ones crash the 2010
    clients, which log in again: the report measures the re-login peak against a normal
    day's busy hour and counts crashes, queued answers and stale presence. What the legacy
    network itself lost is counted apart, nothing else is lost, and the seed replays it."""
    out, sim = run_simulation(conn, db_dsn, 3, faults="outage-2010", supernodes=8,
                              days=0.75, plan=(PlanStep(0.4, 50, "dual"),))
    f = out["faults"]
    assert f["outages"] == 1
    assert f["supernode_crashes"] >= 2  # 28% of 8
    assert f["flush_delayed"] > 0 and f["client_crashes"] > 0
    assert f["client_crashes"] == sim.legacy.stats.client_crashes
    assert f["logins_peak_per_min"] > f["logins_busy_hour_per_min"] > 0
    assert f["relogin_peak_ratio"] == pytest.approx(
        f["logins_peak_per_min"] / f["logins_busy_hour_per_min"], rel=0.02)
    assert f["relogin_peak_ratio"] > 5
    assert f["stale_presence_peak"] >= 1  # a lost supernode's word: online, the user gone
    assert out["converged"], json.dumps(out["verdict"])
    # the run healed with the bound lifted and the 2010 bug gone: the drain and the final
    # reconcile met no crash loop
    assert all(n.offline.rate is None for n in sim.legacy.supernodes.values())
    assert all(d.late_reply_crash_s is None for ds in sim.legacy.devices.values() for d in ds)
    again = simulate(conn, db_dsn, 3, faults="outage-2010", supernodes=8, days=0.75,
                     plan=(PlanStep(0.4, 50, "dual"),))
    assert again["outcome_hash"] == out["outcome_hash"] and again["faults"] == f


def test_the_outage_strikes_on_a_working_day_afternoon_with_time_to_recover():
    """At 14:00 of the first working day from 60% of the run on (day 27 of 45 is a weekend
    day: day 28), or at 60% itself when that afternoon leaves no two hours to recover."""
    def start(days: float) -> float:
        return outage_start_s(FAULTS["outage-2010"].outage_at, days * DAY_S)

    assert start(45) == 28 * DAY_S + 14 * 3600
    assert start(2) == DAY_S + 14 * 3600
    assert start(0.75) == 14 * 3600
    assert start(0.5) == pytest.approx(0.3 * DAY_S)
    # no afternoon, and 60% leaves no two hours either: early enough to lift the bound
    assert start(0.2) == pytest.approx(0.2 * DAY_S - 2 * 3600)
    assert start(0.05) == 0.0


def test_a_ring_is_sized_from_the_users_unless_given():
    """About 800 users a client-hosted supernode (at least 16), 4,100 a dedicated one (at
    least 2); --supernodes overrides either."""
    assert SimConfig(users=2000).supernodes == 16
    assert SimConfig(users=100_000).supernodes == 125
    assert SimConfig(users=2000, dedicated_supernodes=True).supernodes == 2
    assert SimConfig(users=9000, dedicated_supernodes=True).supernodes == 3
    assert SimConfig(users=1_000_000, dedicated_supernodes=True).supernodes == 244
    assert SimConfig(users=9000, supernodes=5, dedicated_supernodes=True).supernodes == 5
    assert ring_size(801, dedicated=False) == 16 and ring_size(12_801, dedicated=False) == 17


def test_the_command_sizes_the_ring_and_its_replay_line_leaves_it_to_the_sizing():
    """What the command builds from its flags: dedicated and no --supernodes gives the
    sized ring, and the replay line does not pin a size the user never gave."""
    parser = cli.build_parser()
    args = parser.parse_args(["simulate", "--users", "9000", "--dedicated-supernodes"])
    assert cmd_simulate._config(args, 1).supernodes == 3
    assert "--supernodes" not in cmd_simulate.replay_command(args, 1)
    args = parser.parse_args(["simulate", "--users", "9000", "--supernodes", "7",
                              "--dedicated-supernodes"])
    assert cmd_simulate._config(args, 1).supernodes == 7
    assert "--supernodes 7" in cmd_simulate.replay_command(args, 1)


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


def test_a_plan_file_reads_a_reverse_step_with_or_without_its_percent():
    steps = parse_plan('[{"day": 4, "reverse": true}, [3, 20, "cloud-only"], '
                       '{"day": 5, "percent": 20, "phase": "cloud-only"}, '
                       '{"day": 6, "reverse": true, "percent": 20}]')
    assert steps == (PlanStep(3, 20, "cloud-only"), PlanStep(4, reverse=True),
                     PlanStep(5, 20, "cloud-only"), PlanStep(6, 20, reverse=True))


def test_the_default_plan_rolls_a_cloud_only_wave_back_past_the_first_month():
    """Its one reverse undoes the day-32 cloud-only wave two days later (legacy has been
    dropping history since day 30), and the same wave goes forward again the next day."""
    plan = default_plan(45)
    i = next(i for i, s in enumerate(plan) if s.reverse)
    assert plan[i - 1] == PlanStep(32, 20, "cloud-only") and plan[i].day == 34
    assert plan[i + 1] == PlanStep(35, 20, "cloud-only")
    assert [s for s in plan if s.reverse] == [plan[i]]
    assert check_plan(plan) == plan


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
    ('[{"day": 1, "reverse": true}, [2, 10, "dual"]]',
     "plan step 1: a reverse undoes the forward step before it, and no forward step comes "
     "before day 1"),
    ('[[2, 10, "dual"], {"day": 1, "reverse": true}]', "plan step 2: a reverse undoes"),
    ('[[1, 10, "cloud-only"], {"day": 2, "reverse": true, "percent": 20}]',
     "plan step 2: this reverse undoes step 1 (day 1: 10% to cloud-only): its percent must "
     "be 10 or left out, not 20"),
    ('[[1, 10, "dual"], {"day": 2, "reverse": true}, {"day": 3, "reverse": true}]',
     "plan step 3: a reverse undoes the forward step just before it, but step 2 (day 2: "
     "reverse) is a reverse already"),
    ('[[1, 10, "dual"], {"day": 2, "reverse": true, "phase": "dual"}]',
     "plan step 2: a reverse step has no phase"),
    ('[[1, 10, "dual"], {"day": 2, "reverse": "yes"}]',
     "plan step 2: a plan step's reverse must be true or false"),
    ('[[1, 10, "dual"], {"day": 2, "reverse": true, "cohort": "a"}]',
     "plan step 2: unknown key 'cohort'"),
    ('[[1, 10, "dual"], {"day": 2, "reverse": false}]', "plan step 2: missing 'percent'"),
])
def test_a_bad_plan_is_refused_with_the_step_it_concerns(text, needle):
    with pytest.raises(ValueError) as e:
        parse_plan(text)
    assert needle in str(e.value)


def test_a_plan_given_as_steps_is_checked_like_a_plan_file():
    with pytest.raises(ValueError, match="plan step 1: a reverse undoes"):
        SimConfig(days=1, plan=(PlanStep(0.5, reverse=True),))


def test_every_fault_profile_is_a_choice_of_the_command():
    assert set(FAULTS) == {"none", "light", "heavy", "outage-2010"}


def test_a_minimum_version_set_mid_run_refuses_old_clients_and_counts_them(conn, db_dsn):
    """Devices report versions from a spread; at 7 am of the first day the minimum becomes
    8.0, set as the command sets it (login server, then store, audited). From then on the
    7.1 devices that log in are refused, each once (no retry loop), none of 8.0 is; the
    report counts them, and the run still converges."""
    report, sim = run_simulation(conn, db_dsn, 11, faults="none",
                                 client_versions="7.1:0.5,8.0:0.5",
                                 min_versions=((0.3, "8.0"),))
    v = report["client_versions"]
    assert set(v["devices_by_version"]) == {"7.1", "8.0"}
    assert v["min_versions"] == [{"day": 0.3, "version": "8.0", "refused_before": 0}]
    assert v["refused_logins"] > 0
    assert v["refused_logins"] == v["devices_refused"]  # refused once, then it stopped
    assert set(v["devices_refused_by_version"]) == {"7.1"}
    refused = [d for ds in sim.legacy.devices.values() for d in ds
               if d.state == "upgrade_required"]
    assert len(refused) == v["devices_refused"] and all(d.version == "7.1" for d in refused)
    assert sum(v["logins_by_version"].values()) > v["refused_logins"]
    assert conn.execute("SELECT value->'rules'->''->>'version' FROM operator_controls "
                        "WHERE name = 'legacy_min_versions'").fetchone() == ("8.0",)
    assert conn.execute("SELECT actor FROM audit_log WHERE action = 'legacy_min_version_set'"
                        ).fetchall() == [("simulate",)]
    assert report["converged"], json.dumps(report["verdict"])


@pytest.mark.parametrize("argv,needle", [
    (["--days", "0"], "--days must be a number above 0"),
    (["--users", "1"], "--users must be a whole number between 2"),
    (["--supernodes", "0"], "--supernodes must be a whole number between 1"),
    (["--supernodes", "0", "--dedicated-supernodes"],
     "--supernodes must be a whole number between 1 and 5000"),
    (["--supernodes", "5001"], "--supernodes must be a whole number between 1 and 5000"),
    (["--users", "1", "--dedicated-supernodes"], "--users must be a whole number between 2"),
    (["--rate", "-1"], "--rate must be a number above 0"),
    (["--seeds", "5..1"], "A <= B"),
    (["--seeds", "1-5"], "--seeds must look like A..B"),
    (["--seeds", "1..5000"], "at most 1000 seeds"),
    (["--reconcile-every", "0"], "--reconcile-every"),
    (["--database", "postgres"], "--database must start with bridge_sim"),
    (["--plan", "/nonexistent/plan.json"], "cannot read --plan"),
    (["--client-versions", "7.x:1"], "--client-versions: bad version '7.x'"),
    (["--client-versions", "7.1:0"], "--client-versions: the weights"),
    (["--min-version", "8.0"], "give VERSION@DAY"),
    (["--min-version", "8.x@1"], "bad version '8.x'"),
    (["--min-version", "8.0@soon"], "the day must be a number"),
    (["--min-version", "8.0@-1"], "the day must be a number >= 0"),
    (["--min-version", "8.0@nan"], "the day must be a number >= 0"),
    (["--days", "2", "--min-version", "8.0@2"], "day 2 is not within the run's 2 days"),
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
    plan.write_text('[{"day": 1, "reverse": true}, [2, 10, "dual"]]')
    assert cli.main(["simulate", "--plan", str(plan)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(plan) in err and "plan step 1: a reverse undoes the forward step" in err


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
    # pinned with its backends to one CPU, or it says why not
    assert all(r["pinned_cpu"] is not None for r in reports) or "not pinned to a CPU:" in err


def test_the_text_report_shows_the_client_versions_and_the_replay_keeps_them(
        capsys, db_server, tmp_path, monkeypatch):
    """Through the command: a line with the devices per version, the minimum and how many
    logins it refused; the replay command carries --client-versions and --min-version."""
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    monkeypatch.setenv("BRIDGE_DSN", db_server)
    argv = ["simulate", "--days", "0.5", "--users", "20", "--supernodes", "3", "--faults",
            "none", "--seed", "4", "--client-versions", "7.1:0.5,8.0:0.5", "--min-version",
            "8.0@0.2", "--database", "bridge_sim_test"]
    cli.main(argv)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "client versions:" in x)
    work = next(x for x in out.splitlines() if x.startswith("  work: "))
    assert re.fullmatch(r"  work: [\d,]+ legacy frames, [\d,]+ database transactions in "
                        r"[\d.,]+ s", work), work
    assert "devices 7.1 " in line and "8.0 " in line
    assert "minimum 8.0 from day 0.2:" in line and "logins refused as too old" in line
    cli.main([*argv, "--json", "--no-pin"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["pinned_cpu"] is None and "not pinned" not in err  # left alone, as asked
    assert report["client_versions"]["refused_logins"] > 0
    assert report["replay"].endswith(
        "--client-versions 7.1:0.5,8.0:0.5 --min-version 8.0@0.2")


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
