"""Minimum client versions survive a login server restart without the operator: the bridge
worker's ``MinVersionSync`` gives the stored rules back (in-memory legacy network, real
PostgreSQL), leaves alone a change the command is half-way through, and costs nothing (not
even a connection) while no rule is stored."""

from __future__ import annotations

import random

from prometheus_client import REGISTRY
from twisted.internet import defer

from bridge import cohorts
from bridge.accounts import import_accounts
from bridge.follower import FollowerConfig
from bridge.min_versions import MinVersionSync, Rule, cohort_handles, differing, stored_rules
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import InlineDatabase
from cloud.store import controls as controls_store
from legacy import wire
from legacy.login import LoginServer
from legacy.peer import connect_peer
from tests.dbfixture import tx
from tests.legacy.netfixture import HOST, PEER_SECRET, LegacyNet

OLD, NEWER, NEWEST = "7.4", "8.5", "9.1"


def now_ms(net: LegacyNet) -> int:
    return int(net.clock.seconds() * 1000)


def login_result(net: LegacyNet, handle: str, version: str) -> str:
    result = net.login.login(handle, f"pw-{handle}", client_version=version)
    return "ok" if isinstance(result, wire.Credential) else result[0]


def restart_login_server(net: LegacyNet) -> None:
    """The login server process restarts: its accounts are back (its own database), its
    minimum-version rules (memory only) are not."""
    old = net.login
    net.wait(old.stopService())
    net.login = LoginServer(network=net.net, host=HOST, port=net.login_port,
                            secrets=net.secrets, directory=net.directory,
                            rng=random.Random(2))
    net.login.accounts = {h: list(a) for h, a in old.accounts.items()}
    net.wait(net.login.startService())


def store_rule(conn, net: LegacyNet, cohort: str, version: str, *, tell: bool = True) -> None:
    """What ``bridgectl legacy min-version`` does: the login server first, then the store."""
    if tell:
        handles = tx(conn, cohort_handles, cohort) if cohort else ()
        net.login.set_min_version(cohort, version, handles)
    tx(conn, controls_store.set_min_version, cohort, version, actor="ops",
       now_ms=now_ms(net))


def two_users_and_a_pilot(conn) -> LegacyNet:
    """alice and bob on a legacy network, imported; cohort ``pilot`` is bob."""
    net = LegacyNet(2).start()
    net.add_user("alice")
    net.add_user("bob")
    net.wait(defer.Deferred.fromCoroutine(import_accounts(
        net.login_peer(), InlineDatabase(conn), now_ms(net))))
    tx(conn, cohorts.create, "pilot", cohorts.CohortSelection(refs=("bob",)), actor="ops",
       now_ms=now_ms(net))
    return net


def sync_loop(net: LegacyNet, conn, connects: list | None = None) -> MinVersionSync:
    def connect() -> defer.Deferred:
        if connects is not None:
            connects.append(net.clock.seconds())
        return connect_peer(net.net, HOST, net.login_port, name="bridge", secret=PEER_SECRET,
                            timeout=2.0, request_timeout=2.0)
    return MinVersionSync(net.clock, InlineDatabase(conn), connect, "w-test",
                          poll_interval_s=10.0, confirm_s=1.0)


def test_a_restarted_login_server_refuses_old_clients_again_without_the_operator(conn):
    """Rules for everyone and for a cohort, stored and applied; the login server restarts
    and forgets them (an old client gets in); within two intervals of the worker's check
    it holds them again, so the old client is refused once more: audited, counted."""
    net = two_users_and_a_pilot(conn)
    store_rule(conn, net, "", "8.0")
    store_rule(conn, net, "pilot", "9.0")
    assert login_result(net, "alice", OLD) == "upgrade_required"
    assert login_result(net, "bob", NEWER) == "upgrade_required"
    config = WorkerConfig(worker_id="w1", bootstrap_host=HOST, bootstrap_port=net.login_port,
                          heartbeat_s=1.0, min_versions_s=5.0,
                          follower=FollowerConfig(linger_s=0.01))
    worker = BridgeWorker(net.clock, net.net, InlineDatabase(conn), PEER_SECRET,
                          random.Random(1), config)
    sent_before = REGISTRY.get_sample_value("bridge_min_version_rules_sent_total") or 0.0
    worker.startService()
    net.run(12)
    assert worker.min_versions is not None and worker.min_versions.sent == 0  # held already

    restart_login_server(net)
    assert login_result(net, "alice", OLD) == "ok"  # the restart forgot the rules
    net.run(12)
    assert login_result(net, "alice", OLD) == "upgrade_required"
    assert login_result(net, "alice", NEWER) == "ok"
    assert login_result(net, "bob", NEWER) == "upgrade_required"  # the cohort's rule too
    assert login_result(net, "bob", NEWEST) == "ok"
    held = {(r.cohort, r.version, r.handles) for r in net.login.versions_reply(0).rules}
    assert held == {("", "8.0", 0), ("pilot", "9.0", 1)}
    assert worker.min_versions.sent == 2
    assert REGISTRY.get_sample_value("bridge_min_version_rules_sent_total") == sent_before + 2
    audit = conn.execute("SELECT actor, detail FROM audit_log WHERE action = "
                         "'legacy_min_version_reapplied'").fetchall()
    assert audit == [("w1", {"cohort": None, "rules": {"": "8.0", "pilot": "9.0"},
                             "cleared": [], "automatic": True})]
    net.wait(worker.stopService())


def test_a_change_half_way_through_the_command_is_not_undone(conn):
    """The command tells the login server 9.0 and only then writes the store: a check that
    falls between the two sees them differ, looks again, and sends nothing."""
    net = two_users_and_a_pilot(conn)
    store_rule(conn, net, "", "8.0")
    net.login.set_min_version("", "9.0")  # the command's first half
    loop = sync_loop(net, conn)
    loop.startService()  # ticks at once: store 8.0, login server 9.0
    net.run(0.5)
    tx(conn, controls_store.set_min_version, "", "9.0", actor="ops", now_ms=now_ms(net))
    net.run(3)
    assert loop.sent == 0
    assert [(r.cohort, r.version) for r in net.login.versions_reply(0).rules] == [("", "9.0")]
    net.wait(loop.stopService())


def test_without_stored_rules_it_does_not_connect_and_leaves_the_login_server_alone(conn):
    """No stored rule: no connection at all; a rule only the login server holds stays (only
    ``--reapply`` clears such rules)."""
    net = two_users_and_a_pilot(conn)
    net.login.set_min_version("", "8.0")
    connects: list = []
    loop = sync_loop(net, conn, connects)
    loop.startService()
    net.run(35)
    assert loop.ticks >= 3 and connects == [] and loop.sent == 0
    assert login_result(net, "alice", OLD) == "upgrade_required"
    net.wait(loop.stopService())


def test_a_cohort_that_changed_size_is_sent_again_with_its_members_now(conn):
    """A stored cohort rule the login server holds with another number of handles is sent
    again, with the cohort's members as they are now."""
    net = two_users_and_a_pilot(conn)
    store_rule(conn, net, "pilot", "9.0", tell=False)
    net.login.set_min_version("pilot", "9.0", ("bob", "carol"))  # an older membership
    assert differing(tx(conn, stored_rules), net.login.versions_reply(0).rules) == [
        Rule("pilot", "9.0", ("bob",))]
    loop = sync_loop(net, conn)
    loop.startService()
    net.run(3)
    assert loop.sent == 1
    assert net.login.min_versions["pilot"] == ("9.0", {"bob"})
    net.wait(loop.stopService())


def test_a_stored_rule_of_a_cohort_that_is_gone_is_left_out(conn):
    """There is nobody to hold to it: no rule, and no error."""
    net = two_users_and_a_pilot(conn)
    tx(conn, controls_store.set_min_version, "ghosts", "9.0", actor="ops", now_ms=now_ms(net))
    tx(conn, controls_store.set_min_version, "", "8.0", actor="ops", now_ms=now_ms(net))
    assert tx(conn, stored_rules) == [Rule("", "8.0", ())]


def test_a_login_server_that_is_down_is_logged_once_and_served_when_back(conn, log_events,
                                                                         failures):
    """While the login server does not answer, each check fails quietly (counted, one
    warning for the outage, no traceback); once it is back the stored rule is sent."""
    events = log_events("bridge.min_versions")
    net = two_users_and_a_pilot(conn)
    store_rule(conn, net, "", "8.0")
    net.wait(net.login.stopService())
    loop = sync_loop(net, conn)
    loop.startService()
    net.run(35)
    assert loop.loop_failures >= 3 and loop.sent == 0 and loop.running
    warnings = [e for e in events if "does not answer" in e.get("log_format", "")]
    assert len(warnings) == 1 and failures == []
    restart_login_server(net)
    net.run(12)
    assert loop.sent == 1 and login_result(net, "alice", OLD) == "upgrade_required"
    assert any("answers again" in e.get("log_format", "") for e in events)
    net.wait(loop.stopService())
