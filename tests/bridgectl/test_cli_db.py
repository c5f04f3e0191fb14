"""bridgectl db: upgrade, status, dsn and stop, against a real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest

from bridgectl import main as cli
from cloud import embedded, schema


def test_upgrade_then_status_shows_every_version_applied(empty_dsn, capsys):
    """db status lists pending versions; db upgrade applies them; a rerun applies nothing."""
    shipped = [m.version for m in schema.shipped_migrations()]
    assert cli.main(["db", "status", "--dsn", empty_dsn, "--json"]) == cli.EXIT_OK
    before = json.loads(capsys.readouterr().out)
    assert [p["version"] for p in before["pending"]] == shipped and before["current"] == 0
    assert cli.main(["db", "upgrade", "--dsn", empty_dsn]) == cli.EXIT_OK
    assert "applied 0001" in capsys.readouterr().out
    assert cli.main(["db", "upgrade", "--dsn", empty_dsn]) == cli.EXIT_OK
    assert "nothing to apply" in capsys.readouterr().out
    assert cli.main(["db", "status", "--dsn", empty_dsn, "--json"]) == cli.EXIT_OK
    after = json.loads(capsys.readouterr().out)
    assert after["pending"] == [] and after["current"] == shipped[-1]


def test_bridge_dsn_environment_variable_is_used(empty_dsn, capsys, monkeypatch):
    """With no --dsn, $BRIDGE_DSN selects the server (and db dsn prints it)."""
    monkeypatch.setenv("BRIDGE_DSN", empty_dsn)
    assert cli.main(["db", "dsn"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == empty_dsn
    assert cli.main(["db", "upgrade"]) == cli.EXIT_OK
    with psycopg.connect(empty_dsn) as conn:
        assert schema.status(conn).pending == ()


@pytest.mark.parametrize("dsn,code,needle", [
    ("nonsense===", cli.EXIT_USAGE, "not a valid PostgreSQL connection string"),
    ("postgresql://u:hunter2secret@127.0.0.1:1/x", cli.EXIT_FAILURE,
     "cannot connect to the database"),
])
def test_bad_or_unreachable_dsn_is_one_clear_line_without_the_password(dsn, code, needle,
                                                                       capsys):
    """A malformed DSN exits 2, an unreachable one 1; one line, password never printed."""
    assert cli.main(["db", "status", "--dsn", dsn]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "hunter2secret" not in err[0]


def test_embedded_server_is_the_default_and_is_shared_and_stoppable(tmp_path, capsys,
                                                                    monkeypatch):
    """No DSN: db dsn starts the embedded server under $BRIDGE_HOME; db stop stops it."""
    monkeypatch.delenv("BRIDGE_DSN", raising=False)
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    try:
        assert cli.main(["db", "dsn"]) == cli.EXIT_OK
        dsn = capsys.readouterr().out.strip()
        assert str(tmp_path) in dsn and embedded.is_running(tmp_path)
        assert cli.main(["db", "upgrade"]) == cli.EXIT_OK
        capsys.readouterr()
        # another process finds the same running server and the schema just applied
        other = subprocess.run([sys.executable, "-m", "bridgectl.main", "db", "status", "--json"],
                               capture_output=True, text=True, timeout=60, check=True)
        report = json.loads(other.stdout)
        assert report["pending"] == [] and str(tmp_path) in report["dsn"]
    finally:
        assert cli.main(["db", "stop"]) == cli.EXIT_OK
    assert "stopped the embedded server" in capsys.readouterr().out
    assert not embedded.is_running(tmp_path)
