"""bridgectl findings list and dismiss: what holds an account, and letting a finding go
(audited); bad input is one usage line and changes nothing."""

from __future__ import annotations

import json

from bridge import ids
from bridgectl import main as cli
from cloud.store import conversations as conversations_store
from cloud.store import findings as findings_store
from legacy.ring import HashRing
from tests.bridge.test_phases import NOW, audit_rows, make_account
from tests.bridgectl.test_cli_migrate import home  # noqa: F401 (fixture)
from tests.dbfixture import tx


def findings(db_dsn: str, *argv: str) -> int:
    return cli.main(["findings", *argv, "--dsn", db_dsn])


def states(conn) -> dict[int, str]:
    return dict(conn.execute("SELECT finding_id, state FROM reconcile_findings").fetchall())


def test_list_shows_what_holds_an_account_and_dismiss_releases_it(conn, db_dsn, home,  # noqa: F811
                                                                    capsys):
    """--account lists the findings in the account's scope (its conversation's, and a feed
    gap of that conversation's home supernode), not others; dismiss is audited and the
    finding no longer listed."""
    alice, bob = make_account(conn, "alice"), make_account(conn, "bob")
    chat = "chat-1"
    ring = ("sn-0", "sn-1", "sn-2")
    home_sn = HashRing(ring).home_of(chat)
    other_sn = next(sn for sn in ring if sn != home_sn)
    tx(conn, conversations_store.create_conversation, ids.conversation_id(chat), [alice],
       legacy_chat_id=chat)
    conv_f = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW,
                conversation_id=ids.conversation_id(chat))
    gap_f = tx(conn, findings_store.record_finding, "feed_gap", {"ring": list(ring)}, NOW + 1,
               source=home_sn)
    tx(conn, findings_store.record_finding, "feed_gap", {"ring": list(ring)}, NOW + 2,
       source=other_sn)
    bob_f = tx(conn, findings_store.record_finding, "notification_failed", {}, NOW + 3,
               account_id=bob)

    assert findings(db_dsn, "list", "--account", "alice", "--json") == cli.EXIT_OK
    listed = [r["finding_id"] for r in json.loads(capsys.readouterr().out)["findings"]]
    assert listed == [gap_f, conv_f]
    assert findings(db_dsn, "list") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "4 findings open or failed" in out and f"supernode {other_sn}" in out

    assert findings(db_dsn, "dismiss", str(conv_f), "--why", "sender retired",
                    "--actor", "ops-dana") == cli.EXIT_OK
    assert f"finding {conv_f} dismissed (was open) by ops-dana" in capsys.readouterr().out
    assert states(conn)[conv_f] == "dismissed" and states(conn)[bob_f] == "open"
    [row] = audit_rows(conn)
    assert row[:3] == ("ops-dana", "finding_dismissed", str(conv_f))
    assert row[3] == {"why": "sender retired", "was": "open"}
    assert findings(db_dsn, "list", "--account", "alice", "--json") == cli.EXIT_OK
    assert [r["finding_id"] for r in json.loads(capsys.readouterr().out)["findings"]] == [gap_f]


def test_bad_dismissals_exit_2_and_change_nothing(conn, db_dsn, home, capsys):  # noqa: F811
    """No such finding, one already dismissed, an empty --why, an unknown account: one
    usage line, exit 2, nothing written."""
    f = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW)
    conn.execute("UPDATE reconcile_findings SET state = 'repaired'")
    for argv, needle in [
            (["dismiss", "999999", "--why", "x", "--actor", "a"], "no finding 999999"),
            (["dismiss", str(f), "--why", "x", "--actor", "a"], "is repaired, not open or failed"),
            (["dismiss", str(f), "--why", "  ", "--actor", "a"], "--why must say why"),
            (["list", "--account", "nobody"], "unknown account: 'nobody'")]:
        assert findings(db_dsn, *argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert states(conn) == {f: "repaired"} and audit_rows(conn) == []
