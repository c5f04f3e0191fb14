"""bridgectl migrate and accounts import: argument errors, exit codes, dry runs, the audit
log, and (as real processes over loopback TCP) the legacy login server refusing a moved
handle."""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from bridgectl import main as cli
from drills.ports import free_port_range
from legacy import wire
from tests.bridge.test_phases import add_finding, audit_rows, healthy, make_account
from tests.processes import wait_for_line

BRIDGECTL = [sys.executable, "-m", "bridgectl.main"]


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path))
    monkeypatch.delenv("BRIDGE_DSN", raising=False)
    return tmp_path


def migrate(db_dsn: str, *argv: str) -> int:
    return cli.main(["migrate", "--dsn", db_dsn, "--actor", "ops-carol", *argv])


def phases_of(conn) -> dict[str, str]:
    return dict(conn.execute("SELECT handle, phase FROM accounts").fetchall())


@pytest.mark.parametrize("argv,needle", [
    (["--to", "sideways", "--accounts", "alice"],
     "unknown phase 'sideways': use one of legacy, dual, cloud, cloud-only"),
    (["--to", "dual", "--percent", "101"], "--percent must be a whole number from 0 to 100"),
    (["--to", "dual", "--percent", "ten"], "--percent must be a whole number from 0 to 100"),
    (["--to", "dual", "--accounts", "alice", "--percent", "10"],
     "exactly one of --accounts, --percent, --file (got --accounts and --percent)"),
    (["--to", "dual"], "exactly one of --accounts, --percent, --file"),
    (["--to", "dual", "--accounts", "alice,nobody"], "unknown account: 'nobody'"),
    (["--to", "dual", "--accounts", " , "], "--accounts names no account"),
    (["--to", "dual", "--file", "/nonexistent/accounts.txt"], "cannot read --file"),
    (["--to", "cloud-only", "--accounts", "carol"], "pass --legacy HOST:PORT"),
    (["--to", "dual", "--accounts", "alice", "--reconcile-window", "0"], "must be positive"),
    (["--to", "dual", "--accounts", "alice", "--outbox-age-bound", "0"], "must be positive"),
    (["--to", "dual", "--accounts", "alice", "--outbox-age-bound", "0.0001"],
     "a gate bound is too small"),
    (["--to", "dual", "--accounts", "alice", "--reconcile-window", "0.0001"],
     "a gate bound is too small"),
    (["--to", "dual", "--accounts", "alice", "--legacy-retention", "3600"],
     "--legacy-retention must be more than 3600 seconds"),
])
def test_bad_flags_exit_2_with_one_line_and_change_nothing(argv, needle, conn, db_dsn, home,
                                                           capsys):
    """Every bad flag exits 2 with one 'bridgectl: error:' line, no traceback, no change."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    make_account(conn, "carol", "cloud")
    before = phases_of(conn)
    assert migrate(db_dsn, *argv) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bridgectl: error:") and needle in err[0], err
    assert "Traceback" not in captured.err and captured.out == ""
    assert phases_of(conn) == before and audit_rows(conn) == []


def test_migrate_moves_the_accounts_and_exits_0(conn, db_dsn, home, capsys):
    """All gates pass: every selected account moves, exit 0, audited under --actor."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    bob = make_account(conn, "bob")
    assert migrate(db_dsn, "--to", "dual", "--accounts", f"alice,{bob}") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert re.search(r"alice\s+legacy -> dual\s+moved", out)
    assert "2 accounts selected for dual: 2 moved (done)" in out
    assert phases_of(conn) == {"alice": "dual", "bob": "dual"}
    assert [(r[0], r[3]["handle"]) for r in audit_rows(conn)] == [("ops-carol", "alice"),
                                                                  ("ops-carol", "bob")]
    assert migrate(db_dsn, "--to", "dual", "--accounts", "alice,bob") == cli.EXIT_OK
    assert "2 unchanged" in capsys.readouterr().out and len(audit_rows(conn)) == 2


def test_leaving_cloud_only_reports_what_was_queued_for_legacy(conn, db_dsn, home, capsys):
    """Moving accounts out of cloud-only queues what legacy missed in their conversations and
    says how many, per account and in total, in the text and in --json (a dry run says how
    many it would, and queues nothing); older than --legacy-retention: counted, not
    queued."""
    from cloud.store import conversations as conversations_store
    from cloud.store import messages as messages_store
    from tests.dbfixture import tx

    ann = make_account(conn, "ann", "cloud-only", linked=False)  # no login server needed
    ben = make_account(conn, "ben", "cloud-only", linked=False)
    talk = uuid.uuid4()
    tx(conn, conversations_store.create_conversation, talk, [ann, ben])
    now = now_ms()
    for i, at in enumerate((now - 5000, now - 4000, now - 3 * 86_400_000)):
        tx(conn, messages_store.post_message, talk, ann, f"c{i}", f"m{i}", at)
    assert migrate(db_dsn, "--to", "cloud", "--accounts", "ann", "--allow-rollback", "--dry-run",
                   "--legacy-retention", str(2 * 86400)) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert ("would queue 2 messages for legacy from 1 conversation (2 never queued, 0 skipped "
            "while nobody was on legacy); 1 message older than legacy's retention not queued"
            ) in out
    assert "1 would move; 2 messages would be queued for legacy (dry run" in out
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy").fetchone() == (0,)
    assert migrate(db_dsn, "--to", "cloud", "--accounts", "ann", "--allow-rollback",
                   "--legacy-retention", str(2 * 86400)) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert ("queued 2 messages for legacy from 1 conversation (2 never queued, 0 skipped "
            "while nobody was on legacy); 1 message older than legacy's retention not queued"
            ) in out
    assert "1 account selected for cloud: 1 moved; 2 messages queued for legacy (done)" in out
    assert conn.execute("SELECT seq, state FROM outbox_to_legacy ORDER BY seq").fetchall() == [
        (1, "pending"), (2, "pending")]
    assert migrate(db_dsn, "--to", "cloud", "--accounts", "ben", "--allow-rollback",
                   "--json") == cli.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["queued_for_legacy"] == 1 and report["older_than_legacy_retention"] == 0
    assert report["accounts"][0]["backfill"] == {
        "conversations": 1, "queued": 1, "requeued": 0, "queued_for_legacy": 1,
        "older_than_window": 0}


def test_accounts_held_back_by_gates_exit_3_and_the_others_move(conn, db_dsn, home, capsys):
    """One account with an open finding is held (exit 3) while the other moves; --json
    reports each account's result and the failed gate."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    bob = make_account(conn, "bob")
    add_finding(conn, "gap", account_id=bob)
    assert migrate(db_dsn, "--to", "cloud", "--accounts", "alice,bob", "--json") == \
        cli.EXIT_GATED
    report = json.loads(capsys.readouterr().out)
    results = {a["handle"]: a for a in report["accounts"]}
    assert results["alice"]["result"] == "moved" and results["bob"]["result"] == "held"
    assert "no_open_findings: 1 open finding" in results["bob"]["reason"]
    assert report["counts"] == {"moved": 1, "held": 1}
    assert phases_of(conn) == {"alice": "cloud", "bob": "legacy"}
    assert [r[3]["handle"] for r in audit_rows(conn)] == ["alice"]


def test_dry_run_shows_moves_and_failed_gates_and_changes_nothing(conn, db_dsn, home, capsys):
    """--dry-run prints what would move and why others would not; no phase, no audit row;
    it exits as the real run would (3: something would be held). --force overrides failed
    gates only; --allow-rollback only lets an account leave cloud-only."""
    make_account(conn, "alice")
    make_account(conn, "bob", "cloud-only", linked=False)
    assert migrate(db_dsn, "--to", "dual", "--accounts", "alice,bob", "--dry-run") == \
        cli.EXIT_GATED
    out = capsys.readouterr().out
    assert re.search(r"alice\s+legacy -> dual\s+held", out)
    assert "mirror_lag: no live bridge worker" in out
    assert "recent_clean_reconcile: no clean reconcile run" in out
    assert "leaving cloud-only needs --allow-rollback" in out
    assert "(dry run, nothing changed)" in out
    assert migrate(db_dsn, "--to", "dual", "--accounts", "alice,bob", "--dry-run",
                   "--force") == cli.EXIT_GATED  # --force overrides gates, not the rollback
    out = capsys.readouterr().out
    assert re.search(r"alice\s+legacy -> dual\s+would move \(forced\)", out)
    assert "overrode mirror_lag" in out and "needs --allow-rollback" in out
    assert migrate(db_dsn, "--to", "dual", "--accounts", "alice,bob", "--dry-run",
                   "--allow-rollback") == cli.EXIT_GATED  # and --allow-rollback no gate
    out = capsys.readouterr().out
    assert re.search(r"alice\s+legacy -> dual\s+held", out)
    assert re.search(r"bob\s+cloud-only -> dual\s+would move\n", out)
    assert migrate(db_dsn, "--to", "dual", "--accounts", "alice,bob", "--dry-run",
                   "--force", "--allow-rollback") == cli.EXIT_OK
    assert phases_of(conn) == {"alice": "legacy", "bob": "cloud-only"}
    assert audit_rows(conn) == []


def test_file_and_percent_selections_and_the_default_actor(conn, db_dsn, home, capsys,
                                                           monkeypatch, tmp_path):
    """--file skips comments and blank lines; --percent 100 takes every linked account; the
    actor defaults to the OS user."""
    healthy(conn, now=now_ms())
    for h in ("alice", "bob", "carol"):
        make_account(conn, h)
    make_account(conn, "native", "cloud-only", linked=False)
    listing = tmp_path / "cohort.txt"
    listing.write_text("# first wave\nalice\n\n  bob  # the second\n")
    monkeypatch.setattr("getpass.getuser", lambda: "night-shift")
    assert cli.main(["migrate", "--dsn", db_dsn, "--to", "dual", "--file",
                     str(listing)]) == cli.EXIT_OK
    assert phases_of(conn) == {"alice": "dual", "bob": "dual", "carol": "legacy",
                               "native": "cloud-only"}
    assert {r[0] for r in audit_rows(conn)} == {"night-shift"}
    assert migrate(db_dsn, "--to", "dual", "--percent", "100") == cli.EXIT_OK
    assert "1 moved, 2 unchanged" in capsys.readouterr().out
    assert phases_of(conn)["carol"] == "dual" and phases_of(conn)["native"] == "cloud-only"


# ---------------------------------------------------------------- over loopback TCP

def tcp_login(port: int, handle: str, password: str):
    """A legacy client's login over TCP: the Credential or the Error frame it gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")

        def read():
            (n,) = struct.unpack(">I", f.read(4))
            return wire.decode(f.read(n))

        assert isinstance(read(), wire.Challenge)
        body = wire.encode(wire.LoginRequest(handle=handle, password=password))
        s.sendall(struct.pack(">I", len(body)) + body)
        return read()


def test_import_then_cloud_only_over_tcp_makes_the_legacy_login_refuse(conn, db_dsn, tmp_path):
    """accounts import and migrate --to cloud-only --legacy against a real legacy run: the
    moved handle's legacy login is refused as moved, the others still log in."""
    env = {"BRIDGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    base = free_port_range(2)
    legacy = subprocess.Popen(
        [*BRIDGECTL, "legacy", "run", "--supernodes", "1", "--users", "3", "--rate", "0",
         "--port", str(base), "--login-port", str(base + 1), "--duration", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        login_port = int(wait_for_line(legacy, r"login server 127\.0\.0\.1:(\d+)").group(1))
        address = f"127.0.0.1:{login_port}"

        imported = subprocess.run(
            [*BRIDGECTL, "accounts", "import", "--legacy", address, "--dsn", db_dsn, "--json"],
            capture_output=True, text=True, timeout=60, env=env)
        assert imported.returncode == 0, imported.stderr
        assert json.loads(imported.stdout)["created"] == 3
        assert set(phases_of(conn).values()) == {"legacy"}

        healthy(conn, now=now_ms())
        moved = subprocess.run(
            [*BRIDGECTL, "migrate", "--to", "cloud-only", "--accounts", "u000001", "--legacy",
             address, "--dsn", db_dsn, "--actor", "ci"], capture_output=True, text=True,
            timeout=60, env=env)
        assert moved.returncode == 0, moved.stderr
        assert phases_of(conn)["u000001"] == "cloud-only"

        refused = tcp_login(login_port, "u000001", "pw-u000001")
        assert isinstance(refused, wire.Error) and refused.code == "moved"
        assert isinstance(tcp_login(login_port, "u000000", "pw-u000000"), wire.Credential)
    finally:
        legacy.send_signal(signal.SIGTERM)
        legacy.wait(timeout=30)


def test_migrate_says_which_gate_held_which_account_and_why(conn, db_dsn, home, capsys):
    """Each held account gets one line per gate that held it, naming the findings (a failed
    repair, a feed gap of its conversation's home supernode) and the conversation no clean
    compare has covered; a last line counts the accounts each gate held."""
    from bridge import ids
    from cloud.store import conversations as conversations_store
    from cloud.store import findings as findings_store
    from legacy.ring import HashRing
    from tests.dbfixture import tx

    now = now_ms()
    healthy(conn, now=now)
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    make_account(conn, "carol")
    ring = ("sn-0", "sn-1", "sn-2")
    chat = "chat-1"
    tx(conn, conversations_store.create_conversation, ids.conversation_id(chat), [alice, bob],
       legacy_chat_id=chat)
    tx(conn, findings_store.record_finding, "feed_gap", {"gap": "epoch", "ring": list(ring)},
       now - 1000, source=HashRing(ring).home_of(chat))
    tx(conn, findings_store.record_finding, "inject_failed", {}, now - 1000, account_id=bob)
    conn.execute("UPDATE reconcile_findings SET state = 'failed' WHERE kind = 'inject_failed'")
    assert migrate(db_dsn, "--to", "dual", "--accounts", "alice,bob,carol", "--dry-run") == \
        cli.EXIT_GATED
    out = capsys.readouterr().out
    home_sn = HashRing(ring).home_of(chat)
    assert re.search(r"alice\s+legacy -> dual\s+held", out)
    assert re.search(r"carol\s+legacy -> dual\s+would move", out)
    assert (f"held by no_open_findings: 1 open finding for the account or its conversations "
            f"(feed_gap: 1); open feed_gap of supernode {home_sn} (finding 1), the home of 1 "
            "of its conversations") in out
    assert ("held by no_open_findings: 2 open or failed findings for the account or its "
            "conversations (feed_gap: 1, inject_failed (failed): 1); finding 2;") in out
    assert re.search(r"held by recent_clean_reconcile: 1 of its 1 conversation not compared "
                     r"clean within 60 min and since its last finding: chat chat-1 never "
                     r"compared clean, last finding \d+ s ago", out)
    assert out.rstrip().endswith(
        "held by no_open_findings: 2 accounts, recent_clean_reconcile: 2 accounts")
    assert phases_of(conn) == {"alice": "legacy", "bob": "legacy", "carol": "legacy"}
