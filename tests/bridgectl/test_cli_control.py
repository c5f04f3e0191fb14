"""bridgectl control pause|resume|set|show: stored, audited, shown by status; a pause held
twice, a resume of nothing, an unknown target and a bad concurrency change nothing; a paused
reconciler refuses to start with exit 5."""

from __future__ import annotations

import json
import time

import pytest

from bridgectl import main as cli
from reconcilers import runner
from tests.bridge.test_phases import add_worker, audit_rows
from tests.bridgectl.test_cli_migrate import home  # noqa: F401 (fixture)


def control(db_dsn: str, *argv: str) -> int:
    return cli.main(["control", *argv, "--dsn", db_dsn, *(
        ["--actor", "ops-dana"] if argv[0] != "show" else [])])


def stored(conn) -> list[tuple]:
    return conn.execute("SELECT name, value, set_by FROM operator_controls ORDER BY name"
                        ).fetchall()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_pause_shows_in_status_and_control_show_and_resume_lifts_it(conn, db_dsn, home,  # noqa: F811
                                                                    capsys):
    """pause stores and audits; status (text and JSON) and control show say who and why;
    resume removes it, audited; status then says running."""
    assert control(db_dsn, "pause", "injection", "--reason", "SN upgrade",
                   "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["paused"] is True and got["changed"] is True and got["dry_run"] is False
    assert got["pause"]["reason"] == "SN upgrade" and got["pause"]["set_by"] == "ops-dana"
    assert stored(conn) == [("injection_paused", {"reason": "SN upgrade"}, "ops-dana")]

    assert cli.main(["status", "--json", "--dsn", db_dsn]) == cli.EXIT_OK
    controls = json.loads(capsys.readouterr().out)["controls"]
    assert controls["paused"]["injection"]["reason"] == "SN upgrade"
    assert controls["paused"]["reconcilers"] is None
    assert controls["injector_concurrency"] is None
    assert cli.main(["status", "--dsn", db_dsn]) == cli.EXIT_OK
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("controls:"))
    assert "INJECTION PAUSED by ops-dana" in line and "SN upgrade" in line
    assert "reconcilers running" in line and "injector concurrency as configured" in line

    assert control(db_dsn, "show") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "INJECTION PAUSED by ops-dana" in out and "live workers: 0" in out

    assert control(db_dsn, "resume", "injection") == cli.EXIT_OK
    assert "injection is resumed (paused by ops-dana" in capsys.readouterr().out
    assert stored(conn) == []
    assert [r[1] for r in audit_rows(conn)] == ["control_paused", "control_resumed"]
    assert cli.main(["status", "--json", "--dsn", db_dsn]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["controls"]["paused"]["injection"] is None


def test_control_show_says_how_each_live_worker_applied_the_controls(conn, db_dsn, home,  # noqa: F811
                                                                     capsys):
    """The injection state a worker's heartbeat reported is shown per live worker."""
    now = int(time.time() * 1000)
    add_worker(conn, "w-1", now=now)
    conn.execute("UPDATE bridge_workers SET detail = detail || %s::jsonb",
                 (json.dumps({"injection": {"paused": True, "window": 40}}),))
    assert control(db_dsn, "show", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert [(w["worker_id"], w["injection"]) for w in got["workers"]] == [
        ("w-1", {"paused": True, "window": 40})]
    assert control(db_dsn, "show") == cli.EXIT_OK
    assert "w-1" in (out := capsys.readouterr().out) and "injection PAUSED, window 40" in out


def test_set_injector_concurrency_then_back_to_the_configured_window(conn, db_dsn, home,  # noqa: F811
                                                                     capsys):
    """set stores the value, audited with from and to; the same value again changes
    nothing; default removes it."""
    assert control(db_dsn, "set", "injector-concurrency", "200", "--json") == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out) == {
        "setting": "injector-concurrency", "from": None, "to": 200, "dry_run": False,
        "changed": True}
    assert stored(conn) == [("injector_concurrency", {"value": 200}, "ops-dana")]
    assert control(db_dsn, "set", "injector-concurrency", "200") == cli.EXIT_OK
    assert "is 200 already; nothing to change" in capsys.readouterr().out
    assert control(db_dsn, "set", "injector-concurrency", "default") == cli.EXIT_OK
    assert "set from 200 to the configured window" in capsys.readouterr().out
    assert stored(conn) == []
    assert [r[3] for r in audit_rows(conn)] == [{"from": None, "to": 200},
                                                 {"from": 200, "to": None}]


def test_dry_runs_change_nothing_and_are_refused_like_the_real_command(conn, db_dsn,
                                                                       home, capsys):  # noqa: F811
    """--dry-run says what would change and stores and audits nothing; a dry run that the
    real command would refuse is refused the same way."""
    assert control(db_dsn, "pause", "reconcilers", "--dry-run") == cli.EXIT_OK
    assert "reconcilers would be paused by ops-dana" in capsys.readouterr().out
    assert control(db_dsn, "resume", "reconcilers", "--dry-run") == cli.EXIT_USAGE
    assert one_error_line(capsys) == "bridgectl: error: reconcilers is not paused"
    assert control(db_dsn, "set", "injector-concurrency", "8", "--dry-run",
                   "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["to"] == 8 and got["dry_run"] is True and got["changed"] is False
    assert stored(conn) == [] and audit_rows(conn) == []
    assert control(db_dsn, "pause", "reconcilers", "--reason", "x") == cli.EXIT_OK
    capsys.readouterr()
    assert control(db_dsn, "pause", "reconcilers", "--dry-run") == cli.EXIT_USAGE
    assert "reconcilers is already paused by ops-dana: x" in one_error_line(capsys)
    assert control(db_dsn, "resume", "reconcilers", "--dry-run", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["ended"]["reason"] == "x" and got["changed"] is False
    assert len(stored(conn)) == 1 and len(audit_rows(conn)) == 1


def test_bad_controls_exit_2_and_change_nothing(conn, db_dsn, home, capsys):  # noqa: F811
    """A resume of nothing, a pause held twice, an unknown target or setting, a
    concurrency that is not a whole number from 1 to 100000: one clear error, exit 2, the
    first pause kept as it was."""
    assert control(db_dsn, "resume", "injection") == cli.EXIT_USAGE
    assert one_error_line(capsys) == "bridgectl: error: injection is not paused"
    assert control(db_dsn, "pause", "injection", "--reason", "first") == cli.EXIT_OK
    capsys.readouterr()
    assert control(db_dsn, "pause", "injection", "--reason", "second") == cli.EXIT_USAGE
    assert one_error_line(capsys) == ("bridgectl: error: injection is already paused by "
                                      "ops-dana: first")
    assert control(db_dsn, "pause", "reconcilers", "--reason", "x" * 1001) == cli.EXIT_USAGE
    assert "--reason must be at most 1000 characters" in one_error_line(capsys)
    for argv, needle in [
            (["pause", "everything"], "invalid choice: 'everything'"),
            (["resume", "feeds"], "invalid choice: 'feeds'"),
            (["set", "passes", "3"], "invalid choice: 'passes'"),
            (["set", "injector-concurrency", "0"], "0 is not from 1 to 100000"),
            (["set", "injector-concurrency", "-3"], "-3 is not from 1 to 100000"),
            (["set", "injector-concurrency", "100001"], "100001 is not from 1 to 100000"),
            (["set", "injector-concurrency", "1.5"], "'1.5' is not a whole number"),
            (["set", "injector-concurrency", "many"], "'many' is not a whole number")]:
        with pytest.raises(SystemExit) as exc:
            control(db_dsn, *argv)
        assert exc.value.code == cli.EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    assert stored(conn) == [("injection_paused", {"reason": "first"}, "ops-dana")]
    assert len(audit_rows(conn)) == 1


def test_a_reconcile_run_refuses_to_start_while_the_reconcilers_are_paused(conn, db_dsn,
                                                                           home, capsys):  # noqa: F811
    """Paused: reconcile exits 5, says who paused it and why, and writes no run row; once
    resumed it runs again (and writes one)."""
    assert control(db_dsn, "pause", "reconcilers", "--reason", "db upgrade") == cli.EXIT_OK
    capsys.readouterr()
    argv = ["reconcile", "notifications", "--dsn", db_dsn, "--max-seconds", "30"]
    assert cli.main(argv) == runner.EXIT_PAUSED == 5
    out = capsys.readouterr().out
    assert "notifications: the reconcilers are paused by ops-dana: db upgrade" in out
    assert "nothing done" in out
    assert cli.main([*argv, "--json"]) == runner.EXIT_PAUSED
    report = json.loads(capsys.readouterr().out)
    assert report["paused"] is True and report["run_id"] is None
    assert report["detail"]["paused"]["reason"] == "db upgrade"
    assert conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] == 0
    assert control(db_dsn, "resume", "reconcilers") == cli.EXIT_OK
    assert cli.main(argv) != runner.EXIT_PAUSED
    assert conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] == 1
