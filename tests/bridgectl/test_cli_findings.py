"""bridgectl findings list and dismiss: what holds an account, and letting a finding go
(audited); bad input is one usage line and changes nothing."""

from __future__ import annotations

import json

import pytest

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
    """No such finding, one already dismissed, an empty --reason, an unknown account: one
    usage line, exit 2, nothing written."""
    f = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW)
    conn.execute("UPDATE reconcile_findings SET state = 'repaired'")
    for argv, needle in [
            (["dismiss", "999999", "--why", "x", "--actor", "a"], "no finding 999999"),
            (["dismiss", str(f), "--why", "x", "--actor", "a"], "is repaired, not open or failed"),
            (["dismiss", str(f), "--reason", "  ", "--actor", "a"], "--reason must say why"),
            (["list", "--account", "nobody"], "unknown account: 'nobody'")]:
        assert findings(db_dsn, *argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert states(conn) == {f: "repaired"} and audit_rows(conn) == []


def test_list_filters_by_kind_state_and_conversation(conn, db_dsn, home, capsys):  # noqa: F811
    """--kind, --state and --conversation narrow the list and combine; --conversation takes
    in a feed gap of its home supernode; without --state only open and failed are listed."""
    alice = make_account(conn, "alice")
    chat = "chat-1"
    ring = ("sn-0", "sn-1", "sn-2")
    cid = ids.conversation_id(chat)
    tx(conn, conversations_store.create_conversation, cid, [alice], legacy_chat_id=chat)
    inj = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW, conversation_id=cid)
    gap = tx(conn, findings_store.record_finding, "feed_gap", {"ring": list(ring)}, NOW + 1,
             source=HashRing(ring).home_of(chat))
    other = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW + 2,
               account_id=alice)
    done = tx(conn, findings_store.record_finding, "inject_refused", {}, NOW + 3,
              conversation_id=cid)
    conn.execute("UPDATE reconcile_findings SET state = 'dismissed' WHERE finding_id = %s",
                 (done,))

    def listed(*argv: str) -> list[int]:
        assert findings(db_dsn, "list", "--json", *argv) == cli.EXIT_OK
        return [r["finding_id"] for r in json.loads(capsys.readouterr().out)["findings"]]

    assert listed() == [other, gap, inj]
    assert listed("--kind", "inject_failed") == [other, inj]
    assert listed("--state", "dismissed") == [done]
    assert listed("--conversation", str(cid)) == [gap, inj]
    assert listed("--conversation", str(cid), "--kind", "inject_failed") == [inj]
    assert listed("--conversation", str(cid), "--state", "dismissed") == [done]
    assert listed("--account", "alice", "--kind", "feed_gap") == [gap]
    assert findings(db_dsn, "list", "--kind", "inject_failed") == cli.EXIT_OK
    assert "2 findings open or failed, kind inject_failed" in capsys.readouterr().out


def test_show_prints_a_finding_in_full_with_its_history(conn, db_dsn, home, capsys):  # noqa: F811
    """show --json has every field and the operator's audit rows; the text names them."""
    f = tx(conn, findings_store.record_finding, "inject_failed",
           {"message_id": "m-1", "last_error": "timeout"}, NOW,
           conversation_id=ids.conversation_id("c"))
    assert findings(db_dsn, "resolve", str(f), "--note", "re-sent by hand",
                    "--actor", "ops-dana") == cli.EXIT_OK
    capsys.readouterr()
    assert findings(db_dsn, "show", str(f), "--json") == cli.EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert got["finding_id"] == f and got["kind"] == "inject_failed"
    assert got["state"] == "repaired" and got["resolved_ms"] is not None
    assert got["conversation_id"] == str(ids.conversation_id("c")) and got["run_id"] is None
    assert got["detail"] == {"message_id": "m-1", "last_error": "timeout",
                             "resolved_by": "ops-dana", "note": "re-sent by hand",
                             "was": "open"}
    [h] = got["history"]
    assert (h["actor"], h["action"]) == ("ops-dana", "finding_resolved")
    assert h["detail"] == {"note": "re-sent by hand", "was": "open"}
    assert findings(db_dsn, "show", str(f)) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"finding {f}: inject_failed, repaired" in out and "finding_resolved" in out


def test_resolve_marks_repaired_releases_the_account_and_is_audited(conn, db_dsn, home,  # noqa: F811
                                                                    capsys):
    """resolve turns an open (or failed) finding repaired, audited; the account is no longer
    held by it; a dry run changes nothing."""
    alice = make_account(conn, "alice")
    f = tx(conn, findings_store.record_finding, "notification_failed", {}, NOW, account_id=alice)
    conn.execute("UPDATE reconcile_findings SET state = 'failed'")
    assert findings(db_dsn, "resolve", str(f), "--note", "x", "--actor", "a",
                    "--dry-run") == cli.EXIT_OK
    assert f"finding {f} would be resolved (was failed)" in capsys.readouterr().out
    assert states(conn) == {f: "failed"} and audit_rows(conn) == []
    assert findings(db_dsn, "resolve", str(f), "--note", "device re-registered",
                    "--actor", "ops-dana", "--json") == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out) == {
        "finding_id": f, "was": "failed", "state": "repaired", "actor": "ops-dana",
        "dry_run": False, "changed": True}
    assert states(conn) == {f: "repaired"}
    [row] = audit_rows(conn)
    assert row[:4] == ("ops-dana", "finding_resolved", str(f),
                       {"note": "device re-registered", "was": "failed"})
    assert findings(db_dsn, "list", "--account", "alice", "--json") == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["findings"] == []


def test_bad_findings_input_exits_2_and_changes_nothing(conn, db_dsn, home, capsys):  # noqa: F811
    """Unknown ids, wrong states, bad kind and state names, a non-UUID or unknown
    conversation, an empty note, a dismissal without a reason: exit 2, nothing written."""
    f = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW)
    g = tx(conn, findings_store.record_finding, "inject_failed", {}, NOW)
    conn.execute("UPDATE reconcile_findings SET state = 'dismissed' WHERE finding_id = %s", (g,))
    for argv, needle in [
            (["show", "999999"], "no finding 999999"),
            (["resolve", "999999", "--note", "x", "--actor", "a"], "no finding 999999"),
            (["resolve", "999999", "--note", "x", "--actor", "a", "--dry-run"], "no finding"),
            (["resolve", str(g), "--note", "x", "--actor", "a"], "is dismissed, not open"),
            (["resolve", str(g), "--note", "x", "--actor", "a", "--dry-run"], "is dismissed"),
            (["resolve", str(f), "--note", " ", "--actor", "a"], "--note must say what was"),
            (["list", "--kind", "gapz"], "unknown finding kind 'gapz': use one of feed_gap"),
            (["list", "--state", "closed"], "unknown finding state 'closed': use one of open"),
            (["list", "--conversation", "not-a-uuid"], "--conversation must be a UUID"),
            (["list", "--conversation", str(ids.conversation_id("nope"))],
             "unknown conversation")]:
        assert findings(db_dsn, *argv) == cli.EXIT_USAGE, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    with pytest.raises(SystemExit) as exc:
        findings(db_dsn, "dismiss", str(f), "--actor", "a")
    assert exc.value.code == cli.EXIT_USAGE and "--reason" in capsys.readouterr().err
    assert states(conn) == {f: "open", g: "dismissed"} and audit_rows(conn) == []


def test_every_kind_the_code_records_is_a_known_kind():
    """--kind checks names against FINDING_KINDS: the kinds the bridge, the store and the
    reconcilers record are all in it."""
    from cloud.store import outbox as outbox_store
    from reconcilers import gaps, presence

    recorded = {outbox_store.INJECT_REFUSED, outbox_store.INJECT_FAILED, presence.KIND,
                *gaps.REPAIR_KINDS, "feed_gap", "mirror_refused", "notification_failed",
                "notification_missing", "notification_resent"}
    assert recorded == set(findings_store.FINDING_KINDS)
