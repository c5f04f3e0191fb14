"""``bridgectl demo``: a short real run converges, bad flags change nothing, and the outside
convergence check (``drills.convergence.judge``) counts what it should."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from drills import convergence


def _bridgectl(args: list[str], home: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "BRIDGE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("BRIDGE_DSN", None)
    return subprocess.run([sys.executable, "-m", "bridgectl.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _with_password(dsn: str) -> tuple[str, str]:
    """*dsn* with a password in it (a random one when it has none: the test servers trust
    local connections and ignore it), and that password."""
    params = conninfo.conninfo_to_dict(dsn)
    params.setdefault("password", f"pw-{secrets.token_hex(8)}")
    return conninfo.make_conninfo(**params), params["password"]


@pytest.mark.db
@pytest.mark.processes
def test_a_short_demo_converges(db_server, tmp_path):
    """Small sizes, light faults (one bridge SIGKILL, push loss): the JSON says converged,
    nothing lost or duplicated, both directions mirrored, every notification settled; and
    neither the DSN's password nor any secret appears in any process's log or the output."""
    name = f"bridge_demo_test_{secrets.token_hex(4)}"
    dsn, password = _with_password(db_server)
    try:
        done = _bridgectl(["demo", "--json", "--duration", "20", "--supernodes", "3",
                           "--legacy-users", "24", "--cloud-users", "4", "--rate", "8",
                           "--faults", "light", "--seed", "5", "--reconcile-every", "5",
                           "--client-versions", "7.4:1,8.0:1",
                           "--dsn", dsn, "--database", name], tmp_path, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
    finally:
        with psycopg.connect(db_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert out["converged"] is True
    assert out["lost"] == 0 and out["duplicates"] == 0
    assert out["check"]["acked_legacy"] > 0 and out["check"]["acked_cloud"] > 0
    assert out["mirrored_to_cloud"] > 0
    assert out["mirrored"] == out["mirrored_to_cloud"] + out["mirrored_to_legacy"]
    assert out["messages_cloud"] >= out["mirrored_to_cloud"]
    assert out["notifications_owed"] == out["notifications_acked"] + out["notifications_failed"]
    assert out["notifications_owed"] > 0
    assert sum(out["accounts_by_phase"].values()) == 24 + 4
    assert out["accounts_by_phase"]["cloud-only"] >= 4  # the cloud-native users
    assert out["faults"]["bridge_kills"] == 1
    assert out["final_reconcile_exit"] == 0
    # the legacy clients reported versions from the spread given, none refused
    versions = out["client_versions"]
    assert versions["spread"] == "7.4:1,8.0:1"
    assert {v["version"] for v in versions["versions"]} <= {"7.4", "8.0"}
    assert sum(v["handles"] for v in versions["versions"]) > 0 and versions["rules"] == []
    assert any(c["exit_code"] == 0 and c["moved"] > 0 for c in out["cohorts"]), out["cohorts"]
    # the lag the workers reported under traffic, and how much of it was the faults'
    lag = out["lag_under_traffic"]["last"]
    assert lag["to_cloud"]["p99_ms"] is not None and lag["to_cloud"]["samples"] > 0
    assert lag["to_cloud"]["met_faults"] <= lag["to_cloud"]["samples"]
    assert "p99_outside_faults_ms" in lag["to_cloud"]  # beside the p99 of all, not over it
    assert set(out["lag_under_traffic"]["worst_outside_faults_ms"]) == {"to_cloud",
                                                                         "to_legacy"}
    for key in ("messages_legacy", "findings_repaired", "findings_unrecoverable",
                "notifications_failed"):
        assert isinstance(out[key], int)
    logs = tmp_path / "demo"
    assert {"legacy.log", "cloud.log", "bridge-1.log", "bridge-2.log"} <= {
        p.name for p in logs.iterdir()}
    assert "status page http://127.0.0.1:" in done.stderr
    secret_values = [password] + [p.read_text().strip() for p in tmp_path.glob("*.secret")]
    assert len(secret_values) >= 3  # the password, the peer and the cloud token secrets
    texts = {"stdout": done.stdout, "stderr": done.stderr,
             **{p.name: p.read_text(errors="replace") for p in logs.iterdir() if p.is_file()}}
    for where, text in texts.items():
        for value in secret_values:
            assert value not in text, f"a secret appears in {where}"


@pytest.mark.parametrize("args, message", [
    (["--database", "production"], "--database must start with bridge_demo"),
    (["--duration", "2"], "--duration must be 0"),
    (["--supernodes", "0"], "--supernodes must be between"),
    (["--rate", "0"], "--rate must be above 0"),
    (["--workers", "9"], "--workers must be between"),
    (["--reconcile-every", "1"], "--reconcile-every must be between"),
    (["--faults", "extreme"], "invalid choice"),
    (["--client-versions", "7.1:x"], "--client-versions: bad weight"),
])
def test_bad_demo_flags_are_refused_before_anything_starts(tmp_path, args, message):
    done = _bridgectl(["demo", *args], tmp_path, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "demo").exists() and not (tmp_path / "pg").exists()


def test_judge_counts_divergence_both_ways_and_attributes_legacy_crash_losses():
    legacy = {"c1": ["a", "b", "x"], "c2": ["d"]}
    cloud = {"c1": ["a", "b", "y"], "c2": ["d"], "c3": []}
    record = {"acked": [["a", "c1", "sn0", 1.0],
                        ["gone", "c2", "sn1", 5.0],     # home sn1 crashed at 6 s: its loss
                        ["lost", "c2", "sn1", 7.0],     # acked after that crash: ours
                        ["z", "c1", "sn0", 2.0]],       # sn0 never crashed: ours
              "crashes": [[6.0, "sn1"]]}
    v = convergence.judge(legacy, cloud, legacy_record=record, cloud_posts_missing=["p1"],
                          acked_cloud=3, cloud_duplicates=0)
    assert v.missing_in_cloud == ("c1/x", "c1/z", "c2/lost")
    assert v.missing_in_legacy == ("c1/y",)
    assert v.lost_by_legacy_network == ("c2/gone",)
    assert v.lost == 3 + 1 + 1 and not v.converged
    assert (v.messages_legacy, v.messages_cloud, v.acked_legacy) == (4, 4, 4)


def test_judge_converged_needs_no_duplicates():
    same = {"c1": ["a", "b"]}
    assert convergence.judge(same, same, legacy_record=None).converged
    assert not convergence.judge({"c1": ["a", "a", "b"]}, same, legacy_record=None).converged
    assert not convergence.judge(same, same, legacy_record=None, cloud_duplicates=1).converged


@pytest.mark.db
def test_cloud_inventory_leaves_out_only_what_legacy_was_never_owed(conn):
    """A cloud post made while every member was cloud-only (by the audit log's phase
    history) is not expected in legacy; the same post, unqueued, while a member still had
    legacy clients is, so the check would count it lost."""
    from cloud import admin
    from cloud.store import messages as messages_store
    from tests.dbfixture import make_account, make_conversation, tx

    a, b = make_account(conn, "ann", "legacy"), make_account(conn, "ben", "legacy")
    cid = make_conversation(conn, a, b, chat="chat-ab")
    t0 = 1_800_000_000_000

    def move(account, frm, to, at):
        tx(conn, admin.apply_phase_change, account, frm, to, actor="test", now_ms=at)

    def unqueued_post(client_id, at):
        message, _ = tx(conn, messages_store.post_message, cid, a, client_id, "hi", at)
        # as if the store had not queued it (no outbox row, no legacy GUID)
        conn.execute("DELETE FROM outbox_to_legacy WHERE message_id = %s",
                     (message.message_id,))
        conn.execute("UPDATE messages SET legacy_guid = NULL WHERE message_id = %s",
                     (message.message_id,))
        return f"cloud:{message.message_id}"

    for account in (a, b):
        move(account, "legacy", "dual", t0)
    early = unqueued_post("early", t0 + 10_000)        # both dual: owed to legacy
    move(a, "dual", "cloud-only", t0 + 20_000)
    half = unqueued_post("half", t0 + 30_000)          # ben still dual: owed
    move(b, "dual", "cloud-only", t0 + 40_000)
    late = unqueued_post("late", t0 + 50_000)          # both cloud-only: not owed
    inventory = convergence.cloud_inventory(conn, ["chat-ab"],
                                            convergence.cloud_not_owed_to_legacy(conn))
    assert sorted(inventory["chat-ab"]) == sorted([early, half])
    assert {f"cloud:{mid}" for _cid, mid in convergence.cloud_not_owed_to_legacy(conn)} == {
        late}


@pytest.mark.db
def test_not_owed_to_legacy_allows_the_clock_slack_and_always_counts_queued_posts(conn):
    """Around a move to cloud-only, a post within PHASE_SLACK_MS before it may be either;
    one further before is owed; one the store queued for legacy is owed whatever the
    phases; a member with no phase change at all counts by their current phase."""
    from cloud import admin
    from cloud.store import conversations as conversations_store
    from cloud.store import messages as messages_store
    from tests.dbfixture import make_account, make_conversation, tx

    a, b = make_account(conn, "ann", "dual"), make_account(conn, "ben", "dual")
    cid = make_conversation(conn, a, b, chat="chat-ab")
    t = 1_800_000_000_000
    slack = convergence.PHASE_SLACK_MS

    def post(client_id, at, keep_queued=False):
        message, _ = tx(conn, messages_store.post_message, cid, a, client_id, "hi", at)
        if not keep_queued:  # as the store writes a post nobody on legacy is owed
            conn.execute("DELETE FROM outbox_to_legacy WHERE message_id = %s",
                         (message.message_id,))
            conn.execute("UPDATE messages SET legacy_guid = NULL WHERE message_id = %s",
                         (message.message_id,))
        return message.message_id

    before = post("2s-before", t - 2 * slack)
    just_before = post("half-slack-before", t - slack // 2)
    for account in (a, b):
        tx(conn, admin.apply_phase_change, account, "dual", "cloud-only", actor="test",
           now_ms=t)
    after = post("after", t + 5000)
    queued = post("queued", t + 6000)
    conn.execute("INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, created_ms) "
                 "SELECT conversation_id, seq, message_id, %s FROM messages "
                 "WHERE message_id = %s", (t + 6000, queued))
    not_owed = {mid for _cid, mid in convergence.cloud_not_owed_to_legacy(conn)}
    assert not_owed == {just_before, after}
    assert before not in not_owed and queued not in not_owed
    # no phase change recorded for a new member: their current phase (legacy) decides
    carl = make_account(conn, "carl", "legacy")
    tx(conn, conversations_store.add_members, cid, [carl])
    assert convergence.cloud_not_owed_to_legacy(conn) == set()


def test_the_summary_shows_the_client_versions_and_the_minimums():
    """One line: each version's share of the legacy handles, then the rules (or none)."""
    from drills.demo import _versions_line

    seen = [{"version": "7.1", "logins": 3, "handles": 1},
            {"version": "8.0", "logins": 9, "handles": 3}]
    assert _versions_line({"versions": seen, "rules": []}) == (
        "client versions:      7.1 25%, 8.0 75% of legacy handles; no minimum")
    assert _versions_line({"versions": seen, "rules": [
        {"cohort": None, "version": "7.4"}, {"cohort": "pilot", "version": "8.0"}]}).endswith(
        "; minimum 7.4 for everyone; minimum 8.0 for pilot")
    assert "none reported" in _versions_line({})
