"""docs/k8s/reconcile-cronjob.yaml, read as the API server reads it (PyYAML, a dev
dependency: the manifest uses YAML's flow style, which the rules file's subset reader in
``tests/test_alerts.py`` refuses).

    every CronJob   a run refused by the lock (exit 4) is no failed Job: the command has
                    --locked-ok (exit 0), and no podFailurePolicy rule retries or fails on 4
                    backoffLimit 0; a pod evicted or preempted (DisruptionTarget) is ignored,
                    so a replacement resumes; restartPolicy Never (podFailurePolicy needs it)
    --locked-ok     a real ``bridgectl reconcile`` exits 0 instead of 4 while another run
                    holds the kind's lock, and says ``locked`` in its report
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

from reconcilers import runner

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "docs" / "k8s" / "reconcile-cronjob.yaml"
BRIDGECTL = [sys.executable, "-m", "bridgectl.main"]


def cronjobs() -> list[dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]
    assert {d["kind"] for d in docs} == {"CronJob"}
    return docs


def job_spec(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]


def exit_code_rules(spec: dict) -> list[dict]:
    return [r for r in spec.get("podFailurePolicy", {}).get("rules", []) if "onExitCodes" in r]


def matches(rule: dict, code: int) -> bool:
    on = rule["onExitCodes"]
    return (code in on["values"]) == (on.get("operator", "In") == "In")


def test_a_run_refused_by_the_lock_does_not_fail_the_job():
    """Each CronJob runs its reconcile with --locked-ok, so the lock's refusal exits 0, and
    no podFailurePolicy rule acts on 4 (Ignore would start the same refused pod again)."""
    jobs = cronjobs()
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "bridge-reconcile-all", "bridge-reconcile-gaps", "bridge-reconcile-notifications",
        "bridge-reconcile-presence"]
    for job in jobs:
        spec = job_spec(job)
        (container,) = spec["template"]["spec"]["containers"]
        assert container["args"][:2] == ["bridgectl", "reconcile"], job["metadata"]["name"]
        assert "--locked-ok" in container["args"], job["metadata"]["name"]
        assert [r for r in exit_code_rules(spec) if matches(r, runner.EXIT_LOCKED)] == []


def test_failures_fail_the_job_and_disruptions_are_retried():
    """backoffLimit 0 (the next schedule is the retry, exit 1 and 3 fail the Job); an
    evicted or preempted pod is Ignored (a replacement resumes the saved progress), within
    activeDeadlineSeconds, which is above the run's own --max-seconds."""
    for job in cronjobs():
        name, spec = job["metadata"]["name"], job_spec(job)
        assert spec["backoffLimit"] == 0, name
        assert spec["template"]["spec"]["restartPolicy"] == "Never", name
        rules = spec["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} \
            in rules, name
        for rule in rules:
            assert rule["action"] in ("FailJob", "Ignore", "Count"), name
            assert ("onExitCodes" in rule) != ("onPodConditions" in rule), name
        for rule in exit_code_rules(spec):  # none today; any must spare 0 and leave 1, 3 failing
            assert not matches(rule, 0) and not (
                rule["action"] == "Ignore" and {1, 3} & set(rule["onExitCodes"]["values"]))
        args = spec["template"]["spec"]["containers"][0]["args"]
        max_seconds = float(args[args.index("--max-seconds") + 1])
        assert max_seconds < spec["activeDeadlineSeconds"], name
        assert job["spec"]["concurrencyPolicy"] == "Forbid", name


@pytest.mark.parametrize("locked_ok", [False, True], ids=["plain", "locked-ok"])
def test_locked_ok_turns_the_locks_refusal_into_exit_0(db_dsn, conn, tmp_path, locked_ok):
    """While another session holds the notifications lock, a real reconcile exits 4, or 0
    with --locked-ok; either way its report says locked and it did nothing."""
    env = {"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    with psycopg.connect(db_dsn, autocommit=True) as holder:
        assert runner.try_lock(holder, "notifications")
        out = subprocess.run(
            [*BRIDGECTL, "reconcile", "notifications", "--dsn", db_dsn, "--json",
             "--max-seconds", "20", *(["--locked-ok"] if locked_ok else [])],
            capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == (0 if locked_ok else runner.EXIT_LOCKED), out.stderr
    report = json.loads(out.stdout)
    assert report["locked"] is True and report["compared"] == 0
    assert conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] == 0
