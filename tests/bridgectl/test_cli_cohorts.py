"""bridgectl cohort create/show/list/advance/reverse/cancel/complete, in process against a
real PostgreSQL: what each prints (text, --json, the next steps), held members and why,
the back-fill of a reverse out of cloud-only, the audit log, the freeze, and bad input
(exit 2) and dry runs changing nothing."""

from __future__ import annotations

import json
import re
import time
import uuid

import psycopg
import pytest

from bridgectl import main as cli
from cloud.store import cohorts as cohorts_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from tests.bridge.test_phases import add_finding, audit_rows, healthy, make_account
from tests.bridgectl.test_cli_migrate import home, phases_of  # noqa: F401 (home: fixture)
from tests.dbfixture import tx

READ_ONLY = ("show", "list")

pytestmark = pytest.mark.usefixtures("home")  # $BRIDGE_HOME in tmp_path, no $BRIDGE_DSN


def now_ms() -> int:
    return int(time.time() * 1000)


def cohort(db_dsn: str, sub: str, *argv: str) -> int:
    actor = [] if sub in READ_ONLY else ["--actor", "ops-erin"]
    return cli.main(["cohort", sub, *argv, "--dsn", db_dsn, *actor])


def snapshot(conn) -> dict:
    """Everything a cohort command may change."""
    counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("cohort_members", "cohort_advances", "cohort_advance_members",
                        "audit_log", "outbox_to_legacy")}
    return {**counts, "phases": phases_of(conn),
            "cohorts": conn.execute("SELECT name, state FROM cohorts ORDER BY 1").fetchall(),
            "reversed": conn.execute("SELECT count(*) FROM cohort_advances "
                                     "WHERE reversed_ms IS NOT NULL").fetchone()[0]}


def next_lines(out: str) -> list[str]:
    return [ln[len("next: "):] for ln in out.splitlines() if ln.startswith("next: ")]


def test_create_show_list_and_their_next_steps(conn, db_dsn, capsys, tmp_path):
    """Members are stored from --handles, --file or --percent (which leaves out members of
    active cohorts, and says so); show and list print them per phase with the history;
    each command says what to run next."""
    for h in ("alice", "bob", "carol"):
        make_account(conn, h)
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice", "bob") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "cohort pilot created: 2 members (legacy 2)" in out
    assert next_lines(out)[0] == ("`bridgectl cohort advance pilot --to dual --dry-run`, "
                                  "then without --dry-run")
    listing = tmp_path / "wave.txt"
    listing.write_text("# the second wave\ncarol\n")
    assert cohort(db_dsn, "create", "wave", "--file", str(listing), "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["members"] == 1 and got["created"] is True
    assert got["selection"] == {"file": str(listing), "names": 1}
    assert got["next"][0].startswith("`bridgectl cohort advance wave --to dual")

    assert cohort(db_dsn, "create", "all", "--percent", "100") == cli.EXIT_USAGE
    assert ("the selection has no account (the others are in active cohorts: 2 in pilot, "
            "1 in wave)") in capsys.readouterr().err
    make_account(conn, "dave")
    assert cohort(db_dsn, "create", "all", "--percent", "100", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["members"] == 1 and got["left_out"] == {"pilot": 2, "wave": 1}

    assert cohort(db_dsn, "list") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert re.search(r"^pilot\s+active\s+2\s+2\s+0\s+0\s+0\s+-$", out, re.M), out
    assert re.search(r"^all\s+active\s+1\s+1\s", out, re.M)
    assert next_lines(out) == ["`bridgectl cohort show NAME` for one cohort's members, held "
                               "members and history"]
    assert cohort(db_dsn, "list", "--json") == cli.EXIT_OK
    assert [c["name"] for c in json.loads(capsys.readouterr().out)["cohorts"]] == [
        "pilot", "wave", "all"]
    assert cohort(db_dsn, "show", "pilot") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("cohort pilot: active, 2 members (--handles alice bob; created "
                          "by ops-erin at ")
    assert "members per phase: legacy 2, dual 0, cloud 0, cloud-only 0" in out
    assert re.search(r"ops-erin  cohort_created  \{\"members\": 2", out)
    assert cohort(db_dsn, "show", "pilot", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["members"] == 2 and got["advances"] == [] and got["held"] == []
    assert [h["action"] for h in got["history"]] == ["cohort_created"]


@pytest.mark.parametrize("argv,needle", [
    (["create", "", "--handles", "bob"], "bad cohort name ''"),
    (["create", "Wave 1", "--handles", "bob"], "bad cohort name 'Wave 1': 1-63 characters"),
    (["create", "pilot", "--handles", "bob"], "a cohort named 'pilot' exists already"),
    (["create", "pilot", "--handles", "bob", "--dry-run"], "exists already"),
    (["create", "w", "--percent", "0"], "--percent must be a whole number from 1 to 100"),
    (["create", "w", "--percent", "101"], "--percent must be a whole number from 1 to 100"),
    (["create", "w", "--percent", "5.5"], "--percent must be a whole number from 1 to 100"),
    (["create", "w", "--file", "/nonexistent/wave.txt"], "cannot read --file"),
    (["create", "w", "--file", "{empty}"], "names no account"),
    (["create", "w", "--handles", "bob", "zed", "yy"], "unknown accounts: 'zed', 'yy'"),
    (["create", "w", "--handles", "bob", "alice"],
     "1 of the accounts is in another active cohort: alice (pilot)"),
    (["create", "w"], "exactly one of --percent, --file, --handles"),
    (["create", "w", "--percent", "5", "--handles", "bob"], "(got --percent and --handles)"),
    (["advance", "nope", "--to", "dual"], "unknown cohort 'nope'"),
    (["advance", "pilot", "--to", "legacy"],
     "a cohort advances to one of dual, cloud, cloud-only, not 'legacy'"),
    (["advance", "pilot", "--to", "sideways"], "unknown phase 'sideways'"),
    (["advance", "pilot", "--to", "dual", "--reconcile-window", "0"], "must be positive"),
    (["advance", "pilot", "--to", "cloud-only"], "pass --legacy HOST:PORT"),
    (["reverse", "pilot"], "cohort 'pilot' has nothing to reverse: it never advanced"),
    (["reverse", "pilot", "--dry-run"], "it never advanced"),
    (["reverse", "nope"], "unknown cohort 'nope'"),
    (["reverse", "pilot", "--legacy-retention", "3600"], "--legacy-retention must be more"),
    (["cancel", "nope"], "unknown cohort 'nope'"),
    (["complete", "pilot"], "cohort 'pilot' has moved nobody"),
    (["complete", "pilot", "--dry-run"], "has moved nobody"),
    (["show", "nope"], "unknown cohort 'nope'"),
])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(argv, needle, conn, db_dsn,
                                                             capsys, tmp_path):
    """Every bad name, selection, phase or cohort state: one 'bridgectl: error:' line,
    exit 2, no output, nothing stored, moved or audited (an advance that would need the
    login server records nothing either)."""
    healthy(conn, now=now_ms())
    for h in ("alice", "bob"):
        make_account(conn, h)
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice") == cli.EXIT_OK
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n\n")
    before = snapshot(conn)
    argv = [str(empty) if a == "{empty}" else a for a in argv]
    assert cohort(db_dsn, *argv) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bridgectl: error:") and needle in err[0], err
    assert "Traceback" not in captured.err and captured.out == ""
    assert snapshot(conn) == before


def test_an_advance_holds_a_member_and_show_says_why(conn, db_dsn, capsys):
    """A member with an open finding is held (exit 3) while the others move; the output
    and show name the gate and its reason; the moves' audit rows name the cohort."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    bob = make_account(conn, "bob")
    add_finding(conn, "gap", account_id=bob)
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice", "bob") == cli.EXIT_OK
    capsys.readouterr()
    assert cohort(db_dsn, "advance", "pilot", "--to", "dual") == cli.EXIT_GATED
    out = capsys.readouterr().out
    assert out.startswith("cohort pilot: advance 1 to dual\n")
    assert re.search(r"alice\s+legacy -> dual\s+moved", out)
    assert "held by no_open_findings: 1 open finding for the account" in out
    steps = next_lines(out)
    assert steps[0].startswith("`bridgectl cohort show pilot` lists the held members and why")
    assert steps[-1] == "to undo advance 1 (to dual): `bridgectl cohort reverse pilot`"
    assert phases_of(conn) == {"alice": "dual", "bob": "legacy"}

    assert cohort(db_dsn, "show", "pilot") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "members per phase: legacy 1, dual 1, cloud 0, cloud-only 0" in out
    assert re.search(r"1  to dual\s+by ops-erin at .*: 1 moved, 1 held, 0 failed", out)
    assert "held on advance 1: 1 member" in out
    assert re.search(r"bob\s+legacy\s+held by no_open_findings: 1 open finding", out)
    assert cohort(db_dsn, "show", "pilot", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["held_total"] == 1 and got["held"][0]["handle"] == "bob"
    assert got["held"][0]["gates"][0]["name"] == "no_open_findings"
    assert [(r[0], r[1], r[3].get("cohort")) for r in audit_rows(conn)] == [
        ("ops-erin", "cohort_created", None), ("ops-erin", "phase_change", "pilot"),
        ("ops-erin", "cohort_advanced", None)]


def test_dry_runs_print_the_plan_and_write_nothing(conn, db_dsn, capsys):
    """create, advance, reverse, cancel and complete with --dry-run say what they would do
    and change nothing."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice", "--dry-run") == cli.EXIT_OK
    assert "cohort pilot would be created: 1 member" in capsys.readouterr().out
    assert snapshot(conn)["cohorts"] == [] and audit_rows(conn) == []
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice") == cli.EXIT_OK
    before = snapshot(conn)
    assert cohort(db_dsn, "advance", "pilot", "--to", "cloud", "--dry-run", "--json") == \
        cli.EXIT_OK
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["dry_run"] is True and got["counts"] == {"would_move": 1}
    assert got["next"][0].startswith("nothing changed (dry run)")
    assert snapshot(conn) == before
    assert cohort(db_dsn, "advance", "pilot", "--to", "cloud") == cli.EXIT_OK
    capsys.readouterr()
    before = snapshot(conn)
    for sub in ("reverse", "cancel", "complete"):
        assert cohort(db_dsn, sub, "pilot", "--dry-run") == cli.EXIT_OK, sub
        out = capsys.readouterr().out
        assert "would" in out or "dry run" in out, out
        assert snapshot(conn) == before, sub


def test_reverse_out_of_cloud_only_backfills_then_cancel_ends_it(conn, db_dsn, capsys):
    """A cohort advanced to cloud-only and reversed: messages posted while every member was
    cloud-only are queued for legacy by the reverse (the dry run counts them first), each
    member is back in its phase before the advance; a second reverse has nothing to undo;
    complete refuses a cohort that moved nobody; cancel ends it."""
    healthy(conn, now=now_ms())
    ann = make_account(conn, "ann", linked=False)  # cloud-native: no login server needed
    ben = make_account(conn, "ben", "dual", linked=False)
    talk = uuid.uuid4()
    tx(conn, conversations_store.create_conversation, talk, [ann, ben])
    assert cohort(db_dsn, "create", "pilot", "--handles", "ann", "ben") == cli.EXIT_OK
    assert cohort(db_dsn, "advance", "pilot", "--to", "cloud-only") == cli.EXIT_OK
    capsys.readouterr()
    for i in range(2):
        tx(conn, messages_store.post_message, talk, ann, f"c{i}", f"m{i}", now_ms() - 1000)
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy").fetchone() == (0,)
    assert cohort(db_dsn, "reverse", "pilot", "--dry-run") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "would queue 2 messages for legacy from 1 conversation" in out
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy").fetchone() == (0,)
    assert cohort(db_dsn, "reverse", "pilot", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["action"] == "reverse" and got["advance"] == 1
    assert got["queued_for_legacy"] == 2 and got["counts"] == {"moved": 2}
    assert phases_of(conn) == {"ann": "legacy", "ben": "dual"}
    assert conn.execute("SELECT count(*) FROM outbox_to_legacy "
                        "WHERE state = 'pending'").fetchone() == (2,)
    assert cohort(db_dsn, "reverse", "pilot") == cli.EXIT_USAGE
    assert "every advance that moved someone is reversed already" in capsys.readouterr().err
    assert cohort(db_dsn, "complete", "pilot") == cli.EXIT_USAGE
    assert "cohort cancel pilot` ends it" in capsys.readouterr().err
    assert cohort(db_dsn, "cancel", "pilot") == cli.EXIT_OK
    assert next_lines(capsys.readouterr().out)[0].startswith("cohort pilot is cancelled")
    actions = [r[1] for r in audit_rows(conn) if r[1].startswith("cohort_")]
    assert actions == ["cohort_created", "cohort_advanced", "cohort_reversed",
                       "cohort_cancelled"]
    assert cohort(db_dsn, "advance", "pilot", "--to", "dual") == cli.EXIT_USAGE
    assert "cohort 'pilot' is cancelled" in capsys.readouterr().err


def test_complete_makes_a_cohort_final(conn, db_dsn, capsys):
    """complete ends a cohort that moved members (saying who stayed behind): it no longer
    advances or reverses, list shows it completed, its members may join a new cohort."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    bob = make_account(conn, "bob")
    add_finding(conn, "gap", account_id=bob)
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice", "bob") == cli.EXIT_OK
    assert cohort(db_dsn, "advance", "pilot", "--to", "dual") == cli.EXIT_GATED
    capsys.readouterr()
    assert cohort(db_dsn, "complete", "pilot", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["completed"] is True and got["cohort"]["state"] == "completed"
    assert got["behind_last_advance"] == 1
    assert got["next"][0] == ("1 member did not reach dual (held): it stays where it is; a "
                              "new cohort can move them")
    for argv in (["advance", "pilot", "--to", "cloud"], ["reverse", "pilot"],
                 ["complete", "pilot"], ["cancel", "pilot"]):
        assert cohort(db_dsn, *argv) == cli.EXIT_USAGE
        assert "cohort 'pilot' is completed" in capsys.readouterr().err
    assert phases_of(conn) == {"alice": "dual", "bob": "legacy"}
    assert cohort(db_dsn, "list") == cli.EXIT_OK
    assert re.search(r"^pilot\s+completed\s+2\s", capsys.readouterr().out, re.M)
    assert cohort(db_dsn, "create", "wave", "--handles", "bob") == cli.EXIT_OK


def test_the_freeze_holds_cohort_advance_but_not_reverse(conn, db_dsn, capsys):
    """Frozen: an advance holds every member with the gate frozen and its reason, exit 3,
    --force included; a reverse still moves members back."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice") == cli.EXIT_OK
    assert cohort(db_dsn, "advance", "pilot", "--to", "dual") == cli.EXIT_OK
    assert cli.main(["freeze", "on", "--reason", "incident 42", "--dsn", db_dsn,
                     "--actor", "ops-dana"]) == cli.EXIT_OK
    capsys.readouterr()
    for force in ([], ["--force"]):
        assert cohort(db_dsn, "advance", "pilot", "--to", "cloud", *force) == cli.EXIT_GATED
        out = capsys.readouterr().out
        held = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("held by")]
        assert held[0].startswith("held by frozen: promotions frozen by ops-dana at ")
        assert held[0].endswith(": incident 42") and held[1] == "held by frozen: 1 account"
    assert phases_of(conn) == {"alice": "dual"}
    assert cohort(db_dsn, "reverse", "pilot") == cli.EXIT_OK
    assert "reverse of advance 1" in capsys.readouterr().out
    assert phases_of(conn) == {"alice": "legacy"}


def test_a_cohort_another_command_is_changing_is_refused(conn, db_dsn, capsys):
    """While another connection holds the cohort's lock, advance exits 1 saying so and
    changes nothing."""
    healthy(conn, now=now_ms())
    make_account(conn, "alice")
    assert cohort(db_dsn, "create", "pilot", "--handles", "alice") == cli.EXIT_OK
    capsys.readouterr()
    pilot = tx(conn, cohorts_store.get_cohort, "pilot")
    before = snapshot(conn)
    with psycopg.connect(db_dsn, autocommit=True) as other:
        assert cohorts_store.try_lock(other, pilot.cohort_id)
        assert cohort(db_dsn, "advance", "pilot", "--to", "dual") == cli.EXIT_FAILURE
    assert "another bridgectl cohort command is changing cohort 'pilot'" in \
        capsys.readouterr().err
    assert snapshot(conn) == before
