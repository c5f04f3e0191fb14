"""The presence reconciler on the deterministic legacy network and a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from twisted.internet import defer

from bridge import ids
from bridge.discovery import SupernodeLinks
from cloud.db import InlineDatabase
from cloud.model import Presence
from cloud.presence import effective_status
from cloud.store import accounts as accounts_store
from cloud.store import presence as presence_store
from reconcilers import runner
from reconcilers.presence import PresenceConfig, PresenceReconciler
from tests.bridge.test_follower import Bridge
from tests.legacy.netfixture import PEER_SECRET, LegacyNet


class Scene:
    def __init__(self, conn, db_dsn, seed: int) -> None:
        self.net = LegacyNet(3, seed=seed).start()
        self.conn, self.db = conn, InlineDatabase(conn)
        self.lock_conn = psycopg.connect(db_dsn, autocommit=True)
        self.links = SupernodeLinks(self.net.net, list(self.net.directory.values()),
                                    name="reconciler", secret=PEER_SECRET)

    def now_ms(self) -> int:
        return int(self.net.clock.seconds() * 1000)

    def reconcile(self, *, dry_run: bool = False, max_seconds: float | None = None,
                  config: PresenceConfig = PresenceConfig(confirm_after_s=0.5),
                  stop: bool = False) -> runner.Report:
        """One run; *stop* asks it to stop at its first check (as Ctrl-C would)."""
        d = defer.Deferred.fromCoroutine(runner.run_one(
            PresenceReconciler(self.links, config), clock=self.net.clock, db=self.db,
            lock_conn=self.lock_conn, dry_run=dry_run, max_seconds=max_seconds,
            stop_requested=lambda: stop))
        return self.net.wait(d, timeout=600)

    def effective(self, handle: str) -> str:
        aid = ids.account_id(handle)
        live = presence_store.read_presence(self.conn, [aid], self.now_ms()).get(aid, [])
        return effective_status(live, self.now_ms())

    def set_presence(self, handle: str, source: str, status: str, expires_in_ms: int,
                     phase: str | None = None) -> None:
        aid = ids.account_id(handle)
        with self.conn.transaction():
            accounts_store.ensure_linked_accounts(self.conn, {handle: aid})
            if phase is not None:
                accounts_store.set_phase(self.conn, aid, phase)
            presence_store.set_presence(self.conn, Presence(aid, source, status,
                                                            self.now_ms() * 1000,
                                                            self.now_ms() + expires_in_ms))

    def legacy_rows(self) -> list[tuple]:
        return self.conn.execute("SELECT source, status FROM presence "
                                 "WHERE source LIKE 'legacy:%' ORDER BY source").fetchall()


@pytest.fixture
def scene(conn, db_dsn):
    s = Scene(conn, db_dsn, seed=11)
    yield s
    s.links.close()
    s.lock_conn.close()


def findings(conn) -> list[tuple]:
    return conn.execute("SELECT kind, state, detail->>'side', detail->>'reason' "
                        "FROM reconcile_findings ORDER BY finding_id").fetchall()


def test_a_row_from_before_an_unread_supernode_restart_is_expired(scene):
    """A legacy row from a restarted supernode the bridge has not read yet is set offline."""
    net = scene.net
    alice = net.add_user("alice")
    device = net.device(alice, at="sn1")
    net.online(device)
    bridge = Bridge(net, scene.db).start()
    net.run(2.0)
    bridge.stop(net)
    assert scene.legacy_rows() == [("legacy:sn1", "online")]
    device.stop()  # her offline goes into sn1's feed, which nobody reads before the crash
    net.run(0.5)
    net.wait(net.supernodes["sn1"].crash())
    net.wait(net.supernodes["sn1"].restart())
    assert scene.effective("alice") == "online"  # stale: for up to the presence TTL
    report = scene.reconcile()
    assert scene.effective("alice") == "offline"
    assert scene.legacy_rows() == [("legacy:sn1", "offline")]
    assert (report.confirmed, report.repaired) == (1, 1) and report.clean
    assert report.detail["restarted_unread"] == ["sn1"]
    assert findings(scene.conn) == [("presence_corrected", "repaired", "cloud", "sn_restarted")]
    assert scene.conn.execute("SELECT action FROM audit_log").fetchall() == [
        ("presence_corrected",)]


def test_expired_and_vanished_supernode_rows_are_corrected_and_dry_run_changes_none(scene):
    """Expired and gone-supernode rows: dry run changes nothing, the real run sets offline."""
    scene.set_presence("alice", "legacy:sn0", "online", -60_000)     # expired, grace past
    scene.set_presence("bob", "legacy:sn9", "away", 120_000)         # sn9 is not a supernode
    scene.set_presence("carol", "legacy:sn2", "online", 120_000)     # fine
    before = scene.conn.execute("SELECT * FROM presence ORDER BY account_id").fetchall()
    dry = scene.reconcile(dry_run=True)
    assert (dry.suspects, dry.confirmed, dry.repaired) == (2, 2, 0)
    assert dry.exit_code() == runner.EXIT_DIFFERENCES and dry.compared == 3
    assert scene.conn.execute("SELECT * FROM presence ORDER BY account_id").fetchall() == before
    assert findings(scene.conn) == []
    report = scene.reconcile()
    assert (report.confirmed, report.repaired) == (2, 2) and report.clean
    assert report.detail["confirmed"] == {"expired": 1, "supernode_gone": 1}
    assert scene.legacy_rows() == [("legacy:sn0", "offline"), ("legacy:sn2", "online"),
                                   ("legacy:sn9", "offline")]
    assert scene.effective("bob") == "offline" and scene.effective("carol") == "online"


def test_cloud_presence_missing_on_legacy_is_reinjected_and_watchers_see_it(scene):
    """Cloud presence legacy never got, or lost with its hub, is re-injected; watchers see it."""
    net = scene.net
    alice = net.add_user("alice", contacts=("bob",))
    net.add_user("bob")
    watcher = net.device(alice)
    net.online(watcher)
    scene.set_presence("bob", "cloud", "busy", 600_000, phase="dual")
    net.run(1.0)
    assert watcher.presence.get("bob") is None  # no presence mirror runs in this test
    first = scene.reconcile()
    net.run(1.0)
    assert watcher.presence.get("bob") == "busy"
    assert (first.confirmed, first.repaired) == (1, 1) and first.clean
    assert first.detail["confirmed"] == {"no_baseline": 1}
    quiet = scene.reconcile()  # the hub kept it: nothing to do
    assert quiet.clean and quiet.suspects == 0 and quiet.compared == 1
    hub = net.ring.index_owner("bob")
    net.wait(net.supernodes[hub].crash())
    net.wait(net.supernodes[hub].restart())
    carol = net.add_user("carol", contacts=("bob",))
    late_watcher = net.device(carol)
    net.online(late_watcher)
    net.run(2.0)
    assert late_watcher.presence.get("bob") is None  # the restarted hub forgot it
    again = scene.reconcile()
    net.run(1.0)
    assert late_watcher.presence.get("bob") == "busy"
    assert again.detail["confirmed"] == {"hub_restarted": 1} and again.repaired == 1
    assert [f[3] for f in findings(scene.conn)] == ["no_baseline", "hub_restarted"]


def test_a_stopped_run_is_partial_and_the_next_run_resumes(scene):
    """A run stopped after one page is partial (exit 3); the next run resumes and finishes
    the pass."""
    for i in range(3):
        scene.set_presence(f"user{i}", "legacy:sn9", "online", 120_000)
    config = PresenceConfig(confirm_after_s=0.5, batch=1)
    first = scene.reconcile(stop=True, config=config)
    assert not first.completed and first.repaired == 1
    assert first.exit_code() == runner.EXIT_DIFFERENCES
    second = scene.reconcile(config=config)
    assert second.completed and second.resumed and second.repaired == 2
    assert {r[1] for r in scene.legacy_rows()} == {"offline"}
    assert [r[0] for r in scene.conn.execute(
        "SELECT state FROM reconcile_runs ORDER BY run_id")] == ["failed", "finished"]


def test_a_failed_injection_names_its_accounts_and_a_clean_pass_at_its_hub_closes_it(scene):
    """An injection that failed at a hub is a failed finding naming every account it failed
    for (so the migration gates hold them); the next complete pass that re-injects at that
    hub without a failure repairs it."""
    from cloud.store import findings as findings_store
    from reconcilers.presence import CloudPresence, record_injections

    scene.net.add_user("bob")
    scene.set_presence("bob", "cloud", "busy", 600_000, phase="dual")
    bob = ids.account_id("bob")
    hub = scene.net.ring.index_owner("bob")
    failure = CloudPresence(bob, "bob", "busy", scene.now_ms() + 600_000, hub, "no_baseline")
    with scene.conn.transaction():
        record_injections(scene.conn, [], [(failure, "ConnectionDone: gone")],
                          scene.now_ms(), None, 10)
    held = findings_store.holding_findings_for_accounts(scene.conn, [bob])
    assert held[bob].counts == {("presence_corrected", "failed"): 1}
    scene.net.run(1.0)
    report = scene.reconcile()
    assert report.clean and report.repaired == 1 and report.detail["failures_closed"] == 1
    assert scene.conn.execute(
        "SELECT state, detail->'account_ids' FROM reconcile_findings WHERE detail ? 'error'"
    ).fetchall() == [("repaired", [str(bob)])]
    assert findings_store.holding_findings_for_accounts(scene.conn, [bob]) == {}
