"""bridgectl legacy versions and legacy min-version: bad input exits 2 and changes nothing,
an unreachable login server exits 1 and stores nothing, and (as real processes over loopback
TCP) a rule for everyone or for one cohort refuses old clients with upgrade_required, is
audited, and is sent again with --reapply after the login server restarted."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import time

import pytest

from bridgectl import main as cli
from drills.ports import free_port, free_port_range
from legacy import wire
from tests.bridge.test_phases import audit_rows
from tests.bridgectl.test_cli_migrate import BRIDGECTL, home  # noqa: F401 (fixture)
from tests.processes import wait_for_line


def stored(conn) -> list[tuple]:
    return conn.execute("SELECT name, value, set_by FROM operator_controls").fetchall()


@pytest.mark.parametrize(("argv", "needle"), [
    (["7.x", "--legacy", "127.0.0.1:1"], "bad version '7.x'"),
    (["1.2.3.4.5", "--legacy", "127.0.0.1:1"], "bad version"),
    (["8.0", "--clear", "--legacy", "127.0.0.1:1"], "give one of VERSION and --clear"),
    (["--reapply", "--cohort", "pilot", "--legacy", "127.0.0.1:1"], "takes no --cohort"),
    (["8.0"], "pass --legacy HOST:PORT"),
    (["--clear"], "pass --legacy HOST:PORT"),
    (["8.0", "--cohort", "nope", "--legacy", "127.0.0.1:1"], "unknown cohort: 'nope'"),
    (["8.0", "--cohort", " ", "--legacy", "127.0.0.1:1"], "--cohort needs a cohort name"),
])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(argv, needle, conn, db_dsn,
                                                             home, capsys):  # noqa: F811
    code = cli.main(["legacy", "min-version", *argv, "--dsn", db_dsn, "--actor", "ops"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert stored(conn) == [] and audit_rows(conn) == []


def test_an_unreachable_login_server_exits_1_and_stores_nothing(conn, db_dsn, tmp_path):
    """(In a process of its own: the command runs the reactor.)"""
    env = {"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    nobody = f"127.0.0.1:{free_port()}"
    for argv in (["min-version", "8.0", "--legacy", nobody, "--dsn", db_dsn, "--actor", "o"],
                 ["min-version", "--reapply", "--legacy", nobody, "--dsn", db_dsn],
                 ["versions", "--legacy", nobody]):
        done = run(env, "legacy", *argv)
        assert done.returncode == 1, (argv, done.stderr)
        assert "cannot connect to the legacy login server" in done.stderr
        assert "Traceback" not in done.stderr
    assert stored(conn) == [] and audit_rows(conn) == []


def test_dry_run_and_show_change_nothing(conn, db_dsn, home, capsys):  # noqa: F811
    """--dry-run needs no login server and says what would change; with no VERSION the
    command shows the stored rules."""
    assert cli.main(["legacy", "min-version", "08.0", "--dry-run", "--json", "--dsn",
                     db_dsn]) == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got == {"before": None, "changed": False, "cohort": None, "dry_run": True,
                   "handles": 0, "login_server": None, "version": "8.0"}
    assert cli.main(["legacy", "min-version", "--dsn", db_dsn]) == cli.EXIT_OK
    assert "no minimum version stored" in capsys.readouterr().out
    assert stored(conn) == [] and audit_rows(conn) == []


# ---------------------------------------------------------------- over loopback TCP

def start_legacy(env: dict, login_port: int) -> subprocess.Popen:
    """A one-supernode legacy run whose supernode listens just below *login_port* (a block
    of two from free_port_range; a restart binds the same two)."""
    proc = subprocess.Popen(
        [*BRIDGECTL, "legacy", "run", "--supernodes", "1", "--users", "6", "--rate", "0",
         "--port", str(login_port - 1), "--login-port", str(login_port), "--duration", "120",
         "--client-versions", "7.1:0.5,8.0:0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_line(proc, r"login server 127\.0\.0\.1:(\d+)")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def tcp_login(port: int, handle: str, version: str | None):
    """A legacy client's login over TCP, reporting *version* (None: the old LoginRequest)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")

        def read():
            (n,) = struct.unpack(">I", f.read(4))
            return wire.decode(f.read(n))

        assert isinstance(read(), wire.Challenge)
        password = f"pw-{handle}"
        req = (wire.LoginRequest(handle=handle, password=password) if version is None else
               wire.VersionedLoginRequest(handle=handle, password=password,
                                          client_version=version))
        body = wire.encode(req)
        s.sendall(struct.pack(">I", len(body)) + body)
        return read()


def result_of(answer) -> str:
    return "ok" if isinstance(answer, wire.Credential) else answer.code


def run(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BRIDGECTL, *argv], capture_output=True, text=True, timeout=60,
                          env=env)


def test_min_version_over_tcp_for_a_cohort_then_everyone_survives_a_restart(conn, db_dsn,
                                                                              tmp_path):
    env = {"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    port = free_port_range(2) + 1
    legacy = start_legacy(env, port)
    address = f"127.0.0.1:{port}"
    try:
        done = run(env, "accounts", "import", "--legacy", address, "--dsn", db_dsn)
        assert done.returncode == 0, done.stderr
        done = run(env, "cohort", "create", "pilot", "--handles", "u000001", "u000002",
                   "--dsn", db_dsn, "--actor", "ci")
        assert done.returncode == 0, done.stderr
        # every simulated device reported its version at login
        tcp_login(port, "u000003", None)  # an old client: version 0
        versions = run(env, "legacy", "versions", "--legacy", address, "--json")
        assert versions.returncode == 0, versions.stderr
        got = json.loads(versions.stdout)
        assert {v["version"] for v in got["versions"]} <= {"0", "7.1", "8.0"}
        assert "0" in {v["version"] for v in got["versions"]} and got["rules"] == []

        done = run(env, "legacy", "min-version", "7.4", "--cohort", "pilot", "--legacy",
                   address, "--dsn", db_dsn, "--actor", "ci", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["handles"] == 2
        assert result_of(tcp_login(port, "u000001", "7.1")) == "upgrade_required"
        refused = tcp_login(port, "u000002", None)
        assert refused.code == "upgrade_required" and "7.4 or newer" in refused.reason
        assert result_of(tcp_login(port, "u000001", "7.4")) == "ok"
        assert result_of(tcp_login(port, "u000003", "7.1")) == "ok"  # not in the cohort

        done = run(env, "legacy", "min-version", "8.0", "--legacy", address, "--dsn",
                   db_dsn, "--actor", "ci")
        assert done.returncode == 0, done.stderr
        assert result_of(tcp_login(port, "u000003", "7.9")) == "upgrade_required"
        assert result_of(tcp_login(port, "u000003", "8.0")) == "ok"
        text = run(env, "legacy", "versions", "--legacy", address).stdout
        assert "minimum 8.0 for everyone" in text
        assert "minimum 7.4 for cohort pilot (2 handles)" in text
    finally:
        stop(legacy)

    legacy = start_legacy(env, port)  # a restart forgets the rules ...
    try:
        assert result_of(tcp_login(port, "u000003", "7.1")) == "ok"
        done = run(env, "legacy", "min-version", "--reapply", "--legacy", address, "--dsn",
                   db_dsn, "--actor", "ci")
        assert done.returncode == 0, done.stderr  # ... and --reapply sends them again
        assert "sent minimum 8.0 for everyone" in done.stdout
        assert result_of(tcp_login(port, "u000003", "7.1")) == "upgrade_required"
        done = run(env, "legacy", "min-version", "--clear", "--legacy", address, "--dsn",
                   db_dsn, "--actor", "ci")
        assert done.returncode == 0, done.stderr
        assert result_of(tcp_login(port, "u000003", "7.1")) == "ok"
        assert result_of(tcp_login(port, "u000001", "7.1")) == "upgrade_required"
    finally:
        stop(legacy)
    rules = json.loads(run(env, "legacy", "min-version", "--dsn", db_dsn, "--json").stdout)
    assert [(r["cohort"], r["version"]) for r in rules["rules"]] == [("pilot", "7.4")]
    assert [(r[1], r[2]) for r in audit_rows(conn) if r[1].startswith("legacy_min")] == [
        ("legacy_min_version_set", "cohort:pilot"),
        ("legacy_min_version_set", "legacy_min_versions"),
        ("legacy_min_version_reapplied", "legacy_min_versions"),
        ("legacy_min_version_set", "legacy_min_versions")]


@pytest.mark.processes
def test_a_running_bridge_gives_a_restarted_login_server_its_rules_back(conn, db_dsn,
                                                                        tmp_path):
    """Real processes: a minimum set with the command; the login server restarts and lets
    a 7.1 client in; without --reapply, the running `bridge run` sends the stored rule
    again and the 7.1 client is refused once more, within about ten seconds."""
    env = {"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    port = free_port_range(2) + 1
    address = f"127.0.0.1:{port}"
    legacy = start_legacy(env, port)
    bridge = None
    try:
        done = run(env, "accounts", "import", "--legacy", address, "--dsn", db_dsn)
        assert done.returncode == 0, done.stderr
        done = run(env, "legacy", "min-version", "8.0", "--legacy", address, "--dsn",
                   db_dsn, "--actor", "ci")
        assert done.returncode == 0, done.stderr
        assert result_of(tcp_login(port, "u000003", "7.1")) == "upgrade_required"
        bridge = subprocess.Popen(
            [*BRIDGECTL, "bridge", "run", "--legacy", address, "--dsn", db_dsn,
             "--metrics-port", "0", "--worker-id", "reapply-test"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        stop(legacy)
        legacy = start_legacy(env, port)  # a restart forgets the rule
        assert result_of(tcp_login(port, "u000003", "7.1")) == "ok"
        deadline = time.monotonic() + 40
        while result_of(tcp_login(port, "u000003", "7.1")) == "ok":
            assert time.monotonic() < deadline, "the bridge did not send the rule again"
            time.sleep(0.5)
        assert result_of(tcp_login(port, "u000003", "8.0")) == "ok"
    finally:
        stop(legacy)
        if bridge is not None:
            stop(bridge)
    rows = conn.execute("SELECT actor, detail->>'automatic' FROM audit_log WHERE action = "
                        "'legacy_min_version_reapplied'").fetchall()
    assert rows == [("reapply-test", "true")]


def test_a_large_cohort_is_sent_in_frames_and_reapply_clears_what_is_not_stored():
    """send_rules (what min-version and --reapply send) splits a cohort of 1000 handles into
    frames of MAX_RULE_HANDLES, and with clear_others removes the login server's rules that
    are not among those sent; on the in-memory network."""
    from twisted.internet import defer

    from bridge.min_versions import send_rules
    from tests.legacy.netfixture import LegacyNet

    net = LegacyNet(1).start()
    peer = net.login_peer()
    sent: list[int] = []
    original = peer.set_min_version
    peer.set_min_version = lambda *a, **kw: (sent.append(len(a[2]) if len(a) > 2 else 0),
                                             original(*a, **kw))[1]
    handles = tuple(f"u{i:06d}" for i in range(1000))
    net.wait(defer.Deferred.fromCoroutine(send_rules(peer, [("big", "8.0", handles)])))
    assert sent == [wire.MAX_RULE_HANDLES, wire.MAX_RULE_HANDLES, 200]
    assert net.login.min_versions["big"] == ("8.0", set(handles))
    net.login.set_min_version("stale", "9.0", ("x",))
    cleared = net.wait(defer.Deferred.fromCoroutine(
        send_rules(peer, [("", "7.4", ())], clear_others=True)))
    assert sorted(cleared) == ["big", "stale"]
    assert net.login.min_versions == {"": ("7.4", None)}
