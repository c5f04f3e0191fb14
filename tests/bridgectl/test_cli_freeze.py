"""bridgectl freeze on/off: stored, audited, shown by status; a second freeze, a lift of
none, an empty reason and a dry run change nothing."""

from __future__ import annotations

import json
import time

from bridgectl import main as cli
from tests.bridge.test_phases import audit_rows, healthy, make_account, phase_of
from tests.bridgectl.test_cli_migrate import home, migrate  # noqa: F401 (fixture)


def freeze(db_dsn: str, *argv: str) -> int:
    return cli.main(["freeze", *argv, "--dsn", db_dsn, "--actor", "ops-dana"])


def stored(conn) -> list[tuple]:
    return conn.execute("SELECT name, value, set_by FROM operator_controls").fetchall()


def test_freeze_on_shows_in_status_and_off_lifts_it(conn, db_dsn, home, capsys):  # noqa: F811
    """on stores the freeze and audits it; status (text and JSON) shows who and why; off
    removes it, audited; status then says off."""
    assert freeze(db_dsn, "on", "--reason", "incident 42", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["frozen"] is True and got["changed"] is True
    assert got["freeze"]["reason"] == "incident 42" and got["freeze"]["set_by"] == "ops-dana"
    assert stored(conn) == [("migration_freeze", {"reason": "incident 42"}, "ops-dana")]

    assert cli.main(["status", "--json", "--dsn", db_dsn]) == cli.EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert status["freeze"]["reason"] == "incident 42"
    assert status["freeze"]["set_by"] == "ops-dana" and status["freeze"]["age_ms"] >= 0
    assert cli.main(["status", "--dsn", db_dsn]) == cli.EXIT_OK
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("freeze:"))
    assert "ON, promotions held (gate frozen), set by ops-dana" in line
    assert line.endswith(": incident 42")

    assert freeze(db_dsn, "off") == cli.EXIT_OK
    assert "freeze lifted (set by ops-dana" in capsys.readouterr().out
    assert stored(conn) == []
    assert [r[1] for r in audit_rows(conn)] == ["migration_frozen", "migration_unfrozen"]
    assert cli.main(["status", "--json", "--dsn", db_dsn]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["freeze"] is None


def test_dry_runs_change_nothing(conn, db_dsn, home, capsys):  # noqa: F811
    """--dry-run says what would change, stores and audits nothing, and is refused like the
    real command when it would be."""
    assert freeze(db_dsn, "on", "--reason", "x", "--dry-run") == cli.EXIT_OK
    assert "promotions would be frozen by ops-dana: x" in capsys.readouterr().out
    assert stored(conn) == [] and audit_rows(conn) == []
    assert freeze(db_dsn, "off", "--dry-run") == cli.EXIT_USAGE
    assert "promotions are not frozen" in capsys.readouterr().err
    assert freeze(db_dsn, "on", "--reason", "x") == cli.EXIT_OK
    assert freeze(db_dsn, "off", "--dry-run", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["frozen"] is False and got["dry_run"] is True and got["changed"] is False
    assert got["ended"]["reason"] == "x"
    assert len(stored(conn)) == 1 and len(audit_rows(conn)) == 1


def test_bad_freezes_exit_2_and_change_nothing(conn, db_dsn, home, capsys):  # noqa: F811
    """A lift of none, a freeze held twice, an empty reason: one usage line, exit
    2, the first freeze kept as it was."""
    for argv, needle in [(["off"], "promotions are not frozen"),
                         (["on", "--reason", "  "], "--reason must say why")]:
        assert freeze(db_dsn, *argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert stored(conn) == [] and audit_rows(conn) == []
    assert freeze(db_dsn, "on", "--reason", "first") == cli.EXIT_OK
    capsys.readouterr()
    assert freeze(db_dsn, "on", "--reason", "second") == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bridgectl: error: promotions are already frozen by ops-dana: first"]
    assert stored(conn) == [("migration_freeze", {"reason": "first"}, "ops-dana")]
    assert len(audit_rows(conn)) == 1


def test_migrate_exits_3_with_the_freeze_as_the_reason(conn, db_dsn, home, capsys):  # noqa: F811
    """Frozen: a healthy promotion is held, exit 3, the output names the frozen gate and
    why (the only gate that fails); --force does not get it through; a backward move
    still goes."""
    healthy(conn, now=int(time.time() * 1000))  # the command plans at the real time
    alice = make_account(conn, "alice")
    bob = make_account(conn, "bob", "cloud")
    assert freeze(db_dsn, "on", "--reason", "incident 42") == cli.EXIT_OK
    capsys.readouterr()
    for force in ([], ["--force"]):
        assert migrate(db_dsn, "--to", "dual", "--accounts", "alice", *force) == cli.EXIT_GATED
        out = capsys.readouterr().out
        held = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("held by")]
        assert len(held) == 2 and held[0].startswith("held by frozen: promotions frozen by "
                                                     "ops-dana at "), out
        assert held[0].endswith("): incident 42") and held[1] == "held by frozen: 1 account"
    assert migrate(db_dsn, "--to", "dual", "--accounts", "bob") == cli.EXIT_OK
    assert phase_of(conn, alice) == "legacy" and phase_of(conn, bob) == "dual"
