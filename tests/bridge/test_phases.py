"""Migration phases against real PostgreSQL and the deterministic legacy login server: the
gates, the direction rules, the audit log, cohorts, and the cloud-only login refusal."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from bridge import ids, migration_report, phases
from bridge.phases import GateConfig, Selection
from cloud import admin
from cloud.db import InlineDatabase
from cloud.model import Account
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from legacy import wire
from tests.dbfixture import tx
from tests.legacy.netfixture import LegacyNet

NOW = 1_700_000_000_000
ACTOR = "ops-alice"


# ---------------------------------------------------------------- helpers (used by the other
# migration tests too)

def make_account(conn, handle: str, phase: str = "legacy", *, linked: bool = True,
                 password_hash: str | None = None) -> uuid.UUID:
    """A linked account (id derived from the handle) or a cloud-native one (random id)."""
    account_id = ids.account_id(handle) if linked else uuid.uuid4()
    tx(conn, accounts_store.create_account,
       Account(account_id, handle, phase, handle if linked else None), password_hash)
    return account_id


def add_worker(conn, worker_id: str = "w1", *, age_ms: int = 1_000, lag_cloud: int | None = 100,
               lag_legacy: int | None = 200, state: str = "ready", now: int = NOW) -> None:
    conn.execute(
        "INSERT INTO bridge_workers (worker_id, started_ms, heartbeat_ms, state, "
        "lag_to_cloud_ms, lag_to_legacy_ms) VALUES (%s, %s, %s, %s, %s, %s)",
        (worker_id, now - 600_000, now - age_ms, state, lag_cloud, lag_legacy))


def add_run(conn, kind: str = "gaps", *, state: str = "finished", age_ms: int = 60_000,
            clean: bool | None = True, now: int = NOW) -> int:
    report = None if clean is None else psycopg.types.json.Jsonb({"clean": clean})
    return conn.execute(
        "INSERT INTO reconcile_runs (kind, state, started_ms, finished_ms, report) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING run_id",
        (kind, state, now - age_ms - 5_000, None if state == "running" else now - age_ms,
         report)).fetchone()[0]


def add_finding(conn, kind: str = "gap", *, account_id=None, conversation_id=None,
                state: str = "open") -> None:
    conn.execute("INSERT INTO reconcile_findings (kind, state, account_id, conversation_id, "
                 "created_ms) VALUES (%s, %s, %s, %s, %s)",
                 (kind, state, account_id, conversation_id, NOW - 1000))


def healthy(conn, now: int = NOW) -> None:
    """Every gate passes: a live worker with small lags and a recent clean reconcile."""
    add_worker(conn, now=now)
    add_run(conn, now=now)


def plan(conn, refs, to: str, *, force: bool = False, config: GateConfig | None = None,
         now: int = NOW, allow_rollback: bool = False) -> phases.MigrationPlan:
    return tx(conn, phases.load_plan, Selection(refs=tuple(refs)), to, config or GateConfig(),
              now, force=force, allow_rollback=allow_rollback)


def apply(conn, the_plan, *, login=None, net: LegacyNet | None = None, db=None,
          actor: str = ACTOR) -> phases.MigrationOutcome:
    d = defer.Deferred.fromCoroutine(phases.apply_plan(
        the_plan, db or InlineDatabase(conn), login, actor=actor, now_ms=NOW,
        clock=net.clock if net else None))
    if net is not None:
        return net.wait(d)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "apply_plan waited on something without a network"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def phase_of(conn, account_id) -> str:
    return conn.execute("SELECT phase FROM accounts WHERE account_id = %s",
                        (account_id,)).fetchone()[0]


def audit_rows(conn) -> list[tuple]:
    return conn.execute("SELECT actor, action, subject, detail, "
                        "(extract(epoch FROM at) * 1000)::bigint FROM audit_log "
                        "ORDER BY audit_id").fetchall()


def only(the_plan) -> phases.PlannedMove:
    assert len(the_plan.moves) == 1
    return the_plan.moves[0]


# ---------------------------------------------------------------- gates

def test_promotion_with_every_gate_passing_moves_and_writes_one_audit_row(conn):
    """All gates pass: the account moves and the audit row says who, when, from, to, gates."""
    healthy(conn)
    alice = make_account(conn, "alice")
    move = only(plan(conn, ["alice"], "dual"))
    assert move.outcome == phases.MOVE and all(g.passed for g in move.gates)
    assert [g.name for g in move.gates] == list(phases.GATES)
    outcome = apply(conn, plan(conn, ["alice"], "dual"))
    assert [c.account_id for c in outcome.moved] == [alice] and outcome.failed == ()
    assert phase_of(conn, alice) == "dual"
    [(actor, action, subject, detail, at_ms)] = audit_rows(conn)
    assert (actor, action, subject, at_ms) == (ACTOR, "phase_change", str(alice), NOW)
    assert detail["from"] == "legacy" and detail["to"] == "dual"
    assert detail["handle"] == "alice" and detail["forced"] is False
    assert [g["passed"] for g in detail["gates"]] == [True] * len(phases.GATES)


def test_open_finding_for_the_account_holds_it_back_with_the_reason(conn):
    """An open finding about the account fails no_open_findings; nothing moves, no audit."""
    healthy(conn)
    alice = make_account(conn, "alice")
    add_finding(conn, "notification_failed", account_id=alice)
    add_finding(conn, "gap", account_id=alice, state="repaired")  # resolved: does not count
    move = only(plan(conn, ["alice"], "cloud"))
    assert move.outcome == phases.HELD
    gate = move.gates[0]
    assert gate.name == "no_open_findings" and not gate.passed
    assert gate.reason == ("1 open finding for the account or its conversations "
                           "(notification_failed: 1); finding 1")
    outcome = apply(conn, plan(conn, ["alice"], "cloud"))
    assert outcome.moved == () and phase_of(conn, alice) == "legacy" and audit_rows(conn) == []


def test_open_finding_in_a_conversation_holds_back_its_members_only(conn):
    """A finding on a conversation holds back every member of it, and nobody else."""
    healthy(conn)
    a, b, c = (make_account(conn, h) for h in ("a", "b", "c"))
    cid = uuid.uuid4()
    tx(conn, conversations_store.create_conversation, cid, [a, b])
    add_finding(conn, "gap", conversation_id=cid)
    add_finding(conn, "gap", conversation_id=cid)
    the_plan = plan(conn, ["a", "b", "c"], "dual")
    outcomes = {m.change.handle: m for m in the_plan.moves}
    assert outcomes["a"].outcome == outcomes["b"].outcome == phases.HELD
    assert "2 open findings" in outcomes["a"].reason and "gap: 2" in outcomes["a"].reason
    assert outcomes["c"].outcome == phases.MOVE
    apply(conn, the_plan)
    assert [phase_of(conn, x) for x in (a, b, c)] == ["legacy", "legacy", "dual"]
    assert [r[2] for r in audit_rows(conn)] == [str(c)]


@pytest.mark.parametrize("workers,passed,needle", [
    ([], False, "no live bridge worker"),
    ([dict(age_ms=31_000)], False, "no live bridge worker"),  # heartbeat too old
    ([dict(state="stopped")], False, "no live bridge worker"),
    ([dict(lag_cloud=6_000)], False, "worker w1 lags 6000 ms to cloud (bound 5000 ms)"),
    ([dict(lag_legacy=5_000)], False, "worker w1 lags 5000 ms to legacy"),
    ([dict(state="degraded")], False, "worker w1 is degraded"),
    ([dict(), dict(worker_id="w2", lag_cloud=9_000)], False, "worker w2 lags 9000 ms"),
    ([dict(), dict(worker_id="w2", lag_cloud=9_000, age_ms=60_000)], True, "1 live worker"),
    ([dict(lag_cloud=4_999, lag_legacy=None)], True, "worst lag 4999 ms"),
    ([dict(lag_cloud=None, lag_legacy=None, state="starting")], True, "no lag measured"),
])
def test_mirror_lag_gate(conn, workers, passed, needle):
    """mirror_lag needs a live worker, none degraded, every measured lag under the bound."""
    add_run(conn)
    for w in workers:
        add_worker(conn, **w)
    make_account(conn, "alice")
    move = only(plan(conn, ["alice"], "dual"))
    gate = move.gates[1]
    assert gate.name == "mirror_lag" and gate.passed is passed and needle in gate.reason
    assert move.outcome == (phases.MOVE if passed else phases.HELD)


@pytest.mark.parametrize("runs,window_s,passed,needle", [
    ([], 3600, False, "no clean reconcile run (kind gaps or all) has finished"),
    ([dict(clean=False)], 3600, False, "no clean reconcile run"),
    ([dict(clean=None)], 3600, False, "no clean reconcile run"),
    ([dict(state="running")], 3600, False, "no clean reconcile run"),
    ([dict(state="failed")], 3600, False, "no clean reconcile run"),
    ([dict(kind="notifications")], 3600, False, "no clean reconcile run"),
    ([dict(age_ms=2 * 3600_000)], 3600, False, "finished 2 h 0 min ago; the window is 60 min"),
    ([dict(age_ms=2 * 3600_000)], 3 * 3600, True, "finished 2 h 0 min ago"),
    ([dict(kind="all", age_ms=600_000)], 3600, True, "clean all run 1 finished 10 min ago"),
    ([dict(age_ms=600_000), dict(clean=False, age_ms=1_000)], 3600, True, "10 min ago"),
])
def test_recent_clean_reconcile_gate(conn, runs, window_s, passed, needle):
    """recent_clean_reconcile needs a finished, clean gaps/all run within the window."""
    add_worker(conn)
    for r in runs:
        add_run(conn, **r)
    make_account(conn, "alice")
    config = GateConfig(reconcile_window_ms=window_s * 1000)
    [gate] = [g for g in only(plan(conn, ["alice"], "dual", config=config)).gates
              if g.name == "recent_clean_reconcile"]
    assert gate.name == "recent_clean_reconcile" and gate.passed is passed
    assert needle in gate.reason


def test_lag_bound_is_configurable(conn):
    """A tighter --lag-bound-ms holds back what the default bound lets through."""
    healthy(conn)
    make_account(conn, "alice")
    assert only(plan(conn, ["alice"], "dual")).outcome == phases.MOVE
    tight = only(plan(conn, ["alice"], "dual", config=GateConfig(lag_bound_ms=150)))
    assert tight.outcome == phases.HELD and "lags 200 ms to legacy" in tight.reason



def stuck_outbox_row(conn, waited_ms: int, state: str = "pending") -> None:
    """An outbox row to legacy written *waited_ms* before NOW (no message needed: the gate
    reads only the pending rows' ages)."""
    conn.execute(
        "INSERT INTO outbox_to_legacy (conversation_id, seq, message_id, state, created_ms) "
        "VALUES (%s, 1, %s, %s, %s)", (uuid.uuid4(), uuid.uuid4(), state, NOW - waited_ms))


@pytest.mark.parametrize("waited_s,state,passed,needle", [
    (None, None, True, "no outbox row waits for legacy"),
    (30, "pending", True, "has waited 30 s"),
    (600, "pending", False, "has waited 10 min (bound 5 min)"),
    (600, "done", True, "no outbox row waits for legacy"),
    (600, "failed", True, "no outbox row waits for legacy"),
])
def test_a_stuck_outbox_holds_promotions(conn, waited_s, state, passed, needle):
    """outbox_flowing: a cloud -> legacy row waiting past the bound holds every promotion,
    though no worker reports any lag (the stuck leg completes nothing); rows no longer
    pending do not count."""
    healthy(conn)
    if waited_s is not None:
        stuck_outbox_row(conn, waited_s * 1000, state)
    make_account(conn, "alice")
    move = only(plan(conn, ["alice"], "dual"))
    [gate] = [g for g in move.gates if g.name == "outbox_flowing"]
    assert gate.passed is passed and needle in gate.reason
    assert move.outcome == (phases.MOVE if passed else phases.HELD)


def test_the_outbox_bound_is_configurable(conn):
    """A tighter --outbox-age-bound holds back what the default bound lets through."""
    healthy(conn)
    stuck_outbox_row(conn, 30_000)
    make_account(conn, "alice")
    assert only(plan(conn, ["alice"], "dual")).outcome == phases.MOVE
    tight = only(plan(conn, ["alice"], "dual", config=GateConfig(outbox_age_bound_ms=10_000)))
    assert tight.outcome == phases.HELD and "outbox_flowing" in tight.reason


# ---------------------------------------------------------------- directions and force

def test_forward_by_several_steps_is_one_gated_move(conn):
    """legacy -> cloud-only in one go (cloud-native account) is gated and audited once."""
    healthy(conn)
    bob = make_account(conn, "bob", linked=False)
    the_plan = plan(conn, ["bob"], "cloud-only")
    assert not the_plan.needs_login_server  # no legacy handle: nothing to tell
    apply(conn, the_plan)
    [(_, _, _, detail, _)] = audit_rows(conn)
    assert phase_of(conn, bob) == "cloud-only"
    assert (detail["from"], detail["to"]) == ("legacy", "cloud-only")


def test_backward_moves_are_not_gated(conn):
    """Moving back needs no gate: it goes through with every gate failing, gates not run."""
    alice = make_account(conn, "alice", "cloud")
    add_finding(conn, "gap", account_id=alice)
    move = only(plan(conn, ["alice"], "legacy"))
    assert move.outcome == phases.MOVE and move.gates == () and not move.forced
    apply(conn, plan(conn, ["alice"], "legacy"))
    assert phase_of(conn, alice) == "legacy"
    [(_, _, _, detail, _)] = audit_rows(conn)
    assert detail == {"from": "cloud", "to": "legacy", "handle": "alice", "forced": False,
                      "gates": []}


def test_leaving_cloud_only_needs_allow_rollback_not_force(conn):
    """cloud-only -> cloud is held without allow_rollback, force or not (force only
    overrides failed gates); with it, it moves, audited as a move not forced."""
    bob = make_account(conn, "bob", "cloud-only", linked=False)
    for force in (False, True):
        held = only(plan(conn, ["bob"], "cloud", force=force))
        assert held.outcome == phases.HELD and held.reason == phases.ROLLBACK_NEEDED
        assert "--allow-rollback" in held.reason
        assert apply(conn, plan(conn, ["bob"], "cloud", force=force)).moved == ()
    assert audit_rows(conn) == []
    apply(conn, plan(conn, ["bob"], "cloud", allow_rollback=True))
    assert phase_of(conn, bob) == "cloud"
    [(_, _, _, detail, _)] = audit_rows(conn)
    assert detail["forced"] is False and (detail["from"], detail["to"]) == ("cloud-only",
                                                                            "cloud")


def test_force_overrides_failed_gates_and_records_them(conn):
    """--force moves a promotion whose gates fail; the audit row keeps the failed gates."""
    alice = make_account(conn, "alice")
    move = only(plan(conn, ["alice"], "dual", force=True))
    assert move.outcome == phases.MOVE and move.forced
    apply(conn, plan(conn, ["alice"], "dual", force=True))
    assert phase_of(conn, alice) == "dual"
    [(_, _, _, detail, _)] = audit_rows(conn)
    assert detail["forced"] is True
    assert {g["name"]: g["passed"] for g in detail["gates"]} == {
        "no_open_findings": True, "mirror_lag": False, "outbox_flowing": True,
        "recent_clean_reconcile": False, "frozen": True}


def test_account_already_in_the_target_phase_is_unchanged_without_audit(conn):
    """Selecting an account already at the target does nothing and writes nothing."""
    make_account(conn, "alice", "dual")
    move = only(plan(conn, ["alice"], "dual"))
    assert move.outcome == phases.UNCHANGED
    assert apply(conn, plan(conn, ["alice"], "dual")).moved == () and audit_rows(conn) == []


def test_phase_changed_since_planning_is_refused(conn):
    """If someone moves the account between plan and apply, the planned move is refused."""
    healthy(conn)
    alice = make_account(conn, "alice")
    the_plan = plan(conn, ["alice"], "cloud")
    tx(conn, accounts_store.set_phase, alice, "dual")
    outcome = apply(conn, the_plan)
    [(change, why)] = outcome.failed
    assert change.account_id == alice and "is in phase 'dual' now, not 'legacy'" in why
    assert phase_of(conn, alice) == "dual" and audit_rows(conn) == []


def test_an_account_moved_to_the_target_meanwhile_is_nothing_to_do(conn):
    """If someone moved the account to the target between plan and apply, it is reported
    as already there: not a failure, and no second audit row."""
    healthy(conn)
    alice = make_account(conn, "alice")
    the_plan = plan(conn, ["alice"], "dual")
    tx(conn, accounts_store.set_phase, alice, "dual")
    outcome = apply(conn, the_plan)
    assert outcome.moved == () and outcome.failed == ()
    assert [c.account_id for c in outcome.already] == [alice] and audit_rows(conn) == []
    report = migration_report.plan_to_json(the_plan, outcome)
    assert report["accounts"][0]["result"] == "unchanged"


def test_unknown_accounts_are_named(conn):
    """A selection naming a missing handle or id raises UnknownAccounts naming it."""
    make_account(conn, "alice")
    missing = str(uuid.uuid4())
    with pytest.raises(phases.UnknownAccounts) as e:
        plan(conn, ["alice", "nobody", missing], "dual")
    assert e.value.refs == ("nobody", missing)


def test_accounts_are_found_by_handle_or_id_once_each(conn):
    """Handles and account ids both select; naming one account twice selects it once."""
    alice = make_account(conn, "alice")
    make_account(conn, "bob")
    the_plan = plan(conn, [str(alice), "bob", "alice"], "dual", force=True)
    assert [m.change.handle for m in the_plan.moves] == ["alice", "bob"]


# ---------------------------------------------------------------- cohorts

def cohort(conn, percent: int) -> set[str]:
    return {a.handle for a in tx(conn, admin.cohort_accounts, percent)}


def test_percent_cohorts_are_stable_and_grow_monotonically(conn):
    """A cohort is the same every time, raising N only adds accounts, 100% is every linked
    account, cloud-native accounts are never in one, and SQL agrees with cohort_bucket."""
    handles = [f"user-{i}" for i in range(300)]
    for h in handles:
        make_account(conn, h)
    make_account(conn, "native", "cloud-only", linked=False)
    sizes = []
    previous: set[str] = set()
    for percent in (0, 1, 10, 25, 50, 99, 100):
        members = cohort(conn, percent)
        assert members == cohort(conn, percent)  # stable
        assert previous <= members  # monotonic
        expected = {h for h in handles if admin.cohort_bucket(ids.account_id(h)) < percent}
        assert members == expected
        sizes.append(len(members))
        previous = members
    assert sizes[0] == 0 and sizes[-1] == 300 and 10 <= sizes[2] <= 60  # ~30 of 300


def test_a_cohort_only_promotes(conn):
    """Re-running an earlier, wider cohort step never demotes accounts that went further."""
    healthy(conn)
    for i in range(40):
        make_account(conn, f"user-{i}")
    first = tx(conn, phases.load_plan, Selection(percent=100), "cloud", GateConfig(), NOW)
    apply(conn, first)
    again = tx(conn, phases.load_plan, Selection(percent=100), "dual", GateConfig(), NOW)
    assert {m.outcome for m in again.moves} == {phases.UNCHANGED}
    assert all("only promotes" in m.reason for m in again.moves)


# ---------------------------------------------------------------- the legacy login server

def legacy_login(net: LegacyNet, handle: str) -> Any:
    """A real wire login at the login server: the Credential, or the Error frame."""
    raw = net.raw(net.login_port)
    raw.send(wire.LoginRequest(handle=handle, password=f"pw-{handle}"))
    net.run(1.0)
    return next(f for f in raw.frames if isinstance(f, wire.Credential | wire.Error))


@pytest.fixture
def net() -> LegacyNet:
    return LegacyNet(1).start()


def test_cloud_only_makes_the_login_server_refuse_the_handle_and_back_clears_it(conn, net):
    """Entering cloud-only sets moved on the login server (legacy login refused as moved);
    leaving it (with allow_rollback) clears it, and both moves are audited."""
    net.add_user("alice")
    assert isinstance(legacy_login(net, "alice"), wire.Credential)
    healthy(conn)
    alice = make_account(conn, "alice", "cloud")
    peer = net.login_peer()
    to_cloud_only = plan(conn, ["alice"], "cloud-only")
    assert to_cloud_only.needs_login_server
    assert apply(conn, to_cloud_only, login=peer, net=net).moved
    assert phase_of(conn, alice) == "cloud-only" and net.login.accounts["alice"][1] is True
    refused = legacy_login(net, "alice")
    assert isinstance(refused, wire.Error) and refused.code == "moved"
    assert "moved to the cloud service" in refused.reason

    assert apply(conn, plan(conn, ["alice"], "dual", allow_rollback=True), login=peer,
                 net=net).moved
    assert phase_of(conn, alice) == "dual" and net.login.accounts["alice"][1] is False
    assert isinstance(legacy_login(net, "alice"), wire.Credential)
    assert [(r[3]["from"], r[3]["to"]) for r in audit_rows(conn)] == [
        ("cloud", "cloud-only"), ("cloud-only", "dual")]


class FailingStore:
    """A TransactionRunner whose phase change fails as if the process died before commit;
    its other transactions (the gates' re-check) run on *conn* when one is given."""

    def __init__(self, conn=None) -> None:
        self.inner = InlineDatabase(conn) if conn is not None else None

    def run(self, desc, fn, *args, **kwargs) -> defer.Deferred:
        if desc != "apply_phase_change" and self.inner is not None:
            return self.inner.run(desc, fn, *args, **kwargs)
        return defer.fail(RuntimeError("killed before the store committed"))


def test_a_crash_between_login_server_and_store_is_completed_by_a_rerun(conn, net):
    """Login server told, store write lost: the store still shows the old phase, so the same
    command run again completes the move (and the audit has it once)."""
    net.add_user("alice")
    healthy(conn)
    alice = make_account(conn, "alice", "cloud")
    peer = net.login_peer()
    outcome = apply(conn, plan(conn, ["alice"], "cloud-only"), login=peer, net=net,
                    db=FailingStore(conn))
    [(_, why)] = outcome.failed
    assert "run the same command again" in why
    assert net.login.accounts["alice"][1] is True and phase_of(conn, alice) == "cloud"
    assert apply(conn, plan(conn, ["alice"], "cloud-only"), login=peer, net=net).moved
    assert phase_of(conn, alice) == "cloud-only" and len(audit_rows(conn)) == 1


def test_a_refused_store_write_sets_the_login_server_back(conn, net):
    """If the phase changed under the plan after the login server was told, the login
    server is set back to match the phase the store really has."""
    net.add_user("alice")
    healthy(conn)
    alice = make_account(conn, "alice", "cloud")
    the_plan = plan(conn, ["alice"], "cloud-only")
    tx(conn, accounts_store.set_phase, alice, "dual")
    outcome = apply(conn, the_plan, login=net.login_peer(), net=net)
    assert outcome.moved == () and "is in phase 'dual' now" in outcome.failed[0][1]
    assert net.login.accounts["alice"][1] is False and audit_rows(conn) == []


def test_login_server_failures_leave_the_store_alone(conn, net):
    """An unknown handle at the login server, or a dead link (timeout), fails the move with
    the reason and changes no phase."""
    healthy(conn)
    ghost = make_account(conn, "ghost", "cloud")  # the login server has no such account
    net.add_user("alice")
    alice = make_account(conn, "alice", "cloud")
    outcome = apply(conn, plan(conn, ["ghost"], "cloud-only"), login=net.login_peer(), net=net)
    assert "refused: no account 'ghost'" in outcome.failed[0][1]
    peer = net.login_peer()
    peer.disconnect()
    net.run(1.0)
    outcome = apply(conn, plan(conn, ["alice"], "cloud-only"), login=peer, net=net)
    assert outcome.moved == () and "legacy login server" in outcome.failed[0][1]
    assert phase_of(conn, ghost) == phase_of(conn, alice) == "cloud" and audit_rows(conn) == []
