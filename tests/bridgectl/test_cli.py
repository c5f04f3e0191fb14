"""bridgectl: argument errors, JSON output, and the state directory's secrets."""

from __future__ import annotations

import json
import os
import stat

import pytest

from bridge import state
from bridgectl import main as cli


@pytest.mark.parametrize("argv,needle", [
    (["legacy", "simulate", "--duration", "-5"], "--duration must be positive"),
    (["legacy", "simulate", "--duration", "10", "--users", "1"], "--users must be between"),
    (["legacy", "simulate", "--duration", "10", "--supernodes", "0"], "--supernodes"),
    (["legacy", "run", "--duration", "5", "--port", "65530", "--supernodes", "10"],
     "--port leaves no room"),
])
def test_bad_values_exit_2_with_one_clear_line(argv, needle, capsys, tmp_path, monkeypatch):
    """A value out of range exits 2 with one 'bridgectl: error:' line, no traceback."""
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bridgectl: error:") and needle in err[0]


@pytest.mark.parametrize("argv", [
    [], ["legacy"], ["legacy", "simulate"], ["legacy", "simulate", "--duration", "x"],
    ["legacy", "simulate", "--duration", "5", "--faults", "apocalypse"], ["nonsense"],
])
def test_malformed_arguments_exit_2_with_usage(argv, capsys):
    """Missing or malformed arguments exit 2 with argparse's usage and error, not a traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_help_exists_on_every_level(capsys):
    """--help works for the program, the legacy group and each legacy subcommand."""
    for argv in (["--help"], ["legacy", "--help"], ["legacy", "run", "--help"],
                 ["legacy", "simulate", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_simulate_json_is_one_object_with_the_summary(capsys):
    """simulate --json prints one JSON object with the documented summary fields."""
    assert cli.main(["legacy", "simulate", "--duration", "20", "--users", "30",
                     "--supernodes", "3", "--rate", "5", "--seed", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("sent", "delivered", "held_offline", "lost_to_faults", "presence_changes",
                "trace_hash"):
        assert key in out
    assert out["sent"] > 0 and out["delivered"] > 0


def test_secrets_are_created_once_with_mode_0600(tmp_path):
    """A secret is generated on first use (0600) and the same bytes come back afterwards."""
    first = state.secret(tmp_path / "home", "peer")
    path = tmp_path / "home" / "peer.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.secret(tmp_path / "home", "peer") == first
    assert state.secret(tmp_path / "home", "login") != first
    assert not [p for p in os.listdir(tmp_path / "home") if p.endswith(".tmp")]


def test_a_secret_readable_by_others_is_refused(tmp_path):
    """A secret file with group/other permissions is refused with a chmod hint."""
    state.secret(tmp_path, "peer")
    (tmp_path / "peer.secret").chmod(0o644)
    with pytest.raises(state.StateError, match="chmod 600"):
        state.secret(tmp_path, "peer")


def test_peer_secret_file_too_short_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """--peer-secret-file with fewer than 16 bytes fails with a clear error, before any port."""
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path / "home"))
    short = tmp_path / "s"
    short.write_text("tiny\n")
    code = cli.main(["legacy", "run", "--duration", "1", "--peer-secret-file", str(short)])
    assert code == cli.EXIT_FAILURE
    assert "at least 16 bytes" in capsys.readouterr().err
