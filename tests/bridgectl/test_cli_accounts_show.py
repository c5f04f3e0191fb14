"""bridgectl accounts show: one account's phase history, open findings, the gates' verdict
now, cohorts and latest mirrored messages either way; an unknown account or a bad flag is a
usage error; it writes nothing."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from bridgectl import main as cli
from cloud.model import MirrorBatch
from cloud.store import messages as messages_store
from cloud.store import mirror as mirror_store
from tests.bridge.test_phases import add_finding, audit_rows, healthy, make_account
from tests.bridgectl.test_cli_migrate import home  # noqa: F401 (fixture)
from tests.cloud.store.storefixture import mirrored
from tests.dbfixture import make_conversation, tx


def show(db_dsn: str, *argv: str) -> int:
    return cli.main(["accounts", "show", *argv, "--dsn", db_dsn])


def setup_alice(conn, db_dsn: str) -> uuid.UUID:
    """alice moved legacy -> dual by cohort pilot; in a conversation with bob (legacy) that
    has 3 messages mirrored from legacy, 2 cloud messages queued for legacy (one done), and
    an open finding."""
    now = int(time.time() * 1000)  # the commands plan at the real time
    healthy(conn, now=now)
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    cid = make_conversation(conn, alice, bob)
    for argv in (["create", "pilot", "--handles", "alice"], ["advance", "pilot", "--to", "dual"]):
        assert cli.main(["cohort", *argv, "--dsn", db_dsn, "--actor", "ops-erin"]) == 0
    tx(conn, mirror_store.write_mirrored_batch, MirrorBatch(tuple(
        mirrored(cid, bob, "bob", f"guid-{i}", now - 10_000 + i) for i in range(3))), now)
    for i in range(2):
        tx(conn, messages_store.post_message, cid, alice, f"c{i}", f"to legacy {i}", now + i)
    conn.execute("UPDATE outbox_to_legacy SET state = 'done', done_ms = %s WHERE seq = 4",
                 (now,))
    add_finding(conn, "inject_failed", conversation_id=cid)
    return cid


def test_show_tells_the_accounts_history_holds_cohorts_and_mirrored_messages(
        conn, db_dsn, home, capsys):  # noqa: F811
    """Everything in one JSON object: the cohort's move in the history, the open finding
    holding the next phase (force would move it), the cohort, the newest messages each way
    within --limit; nothing written."""
    cid = setup_alice(conn, db_dsn)
    capsys.readouterr()
    audit_before = len(audit_rows(conn))
    assert show(db_dsn, "alice", "--limit", "2", "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["account"]["handle"] == "alice" and got["account"]["phase"] == "dual"
    assert [(h["from"], h["to"], h["cohort"], h["actor"], h["forced"])
            for h in got["phase_history"]] == [("legacy", "dual", "pilot", "ops-erin", False)]
    assert [(f["kind"], f["conversation_id"]) for f in got["findings"]] == [
        ("inject_failed", str(cid))]
    v = got["gates"]
    assert v["next_phase"] == "cloud" and v["result"] == "held"
    assert [g["name"] for g in v["gates"] if not g["passed"]] == ["no_open_findings"]
    assert v["force_would_move"] is True and "inject_failed" in v["reason"]
    assert [(c["name"], c["state"], c["active"], c["last_advance"]["to"],
             c["last_advance"]["before"]) for c in got["cohorts"]] == [
        ("pilot", "active", True, "dual", "legacy")]
    to_cloud = got["mirrored"]["to_cloud"]
    assert [(m["seq"], m["legacy_guid"], m["sender"]) for m in to_cloud] == [
        (3, "guid-2", "bob"), (2, "guid-1", "bob")]
    to_legacy = got["mirrored"]["to_legacy"]
    assert [(m["seq"], m["state"], m["sender"]) for m in to_legacy] == [
        (5, "pending", "alice"), (4, "done", "alice")]
    assert "body" not in json.dumps(got)
    assert len(audit_rows(conn)) == audit_before  # read-only


def test_show_as_text_names_the_gate_and_the_freeze(conn, db_dsn, home, capsys):  # noqa: F811
    """The text shows the verdict and each gate; under a freeze, --force would not help."""
    setup_alice(conn, db_dsn)
    capsys.readouterr()
    assert show(db_dsn, "alice") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "account alice (" in out and "phase dual, legacy handle alice" in out
    assert "legacy -> dual  (cohort pilot)" in out
    assert "gates now, for cloud: HELD; --force would move it" in out
    assert "FAIL  no_open_findings: 1 open finding" in out
    assert "pilot  (active, member): advance 1 to dual from legacy" in out
    assert "mirrored legacy -> cloud, latest 3:" in out and "guid guid-2" in out
    assert "mirrored cloud -> legacy, latest 2:" in out and "pending, attempts 0" in out
    assert "next: `bridgectl findings list --account alice`" in out
    assert "next: its cohort: `bridgectl cohort show pilot`" in out
    assert cli.main(["freeze", "on", "--reason", "incident 7", "--dsn", db_dsn,
                     "--actor", "ops-erin"]) == cli.EXIT_OK
    capsys.readouterr()
    assert show(db_dsn, "alice") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "HELD; --force would not (the freeze)" in out and "incident 7" in out


def test_an_account_with_nothing_yet_and_a_cloud_only_one(conn, db_dsn, home,  # noqa: F811
                                                          capsys):
    """A fresh legacy account: no history, no cohort, nothing mirrored, held only by the
    store-wide gates (no worker, no clean run); a cloud-only one has no next phase. Found
    by id as well as by handle."""
    dave = make_account(conn, "dave")
    assert show(db_dsn, str(dave), "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["account"]["handle"] == "dave" and got["phase_history"] == []
    assert got["cohorts"] == [] and got["findings"] == []
    assert got["mirrored"] == {"to_cloud": [], "to_legacy": []}
    assert got["gates"]["next_phase"] == "dual" and got["gates"]["result"] == "held"
    make_account(conn, "erin", "cloud-only")
    assert show(db_dsn, "erin") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "no next phase: cloud-only is the last" in out and "phase history: never" in out


def test_an_unknown_account_and_bad_flags_are_usage_errors(conn, db_dsn, home, capsys):  # noqa: F811
    """Unknown handle: one line, exit 2 (as findings show for an unknown id); a negative
    --limit or a zero gate bound: exit 2."""
    assert show(db_dsn, "nobody") == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bridgectl: error: unknown account: 'nobody'"]
    make_account(conn, "alice")
    assert show(db_dsn, "alice", "--lag-bound-ms", "0") == cli.EXIT_USAGE
    assert "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        show(db_dsn, "alice", "--limit", "-1")
    assert exc.value.code == cli.EXIT_USAGE and "--limit" in capsys.readouterr().err
