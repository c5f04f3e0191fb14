"""The notification dispatcher, the simulated push gateway and devices that acknowledge.

Everything runs on a ``Clock`` against the real store through ``InlineDatabase``: a tick,
its pushes and their outcomes all happen inside ``clock.advance``, and a seed fixes every
random fate, so each scenario is exact and repeatable.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import attrs
import psycopg
import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer
from twisted.internet.task import Clock

from cloud.db import DatabaseUnavailable, InlineDatabase, TransactionRunner
from cloud.dispatcher import DispatcherConfig, NotificationDispatcher
from cloud.gateway import SimulatedPushGateway
from cloud.model import Account
from cloud.push import NotificationChannel, PushMessage, PushRejected
from cloud.store import accounts as accounts_store
from cloud.store import conversations as conversations_store
from cloud.store import messages as messages_store
from cloud.store import notifications as notifications_store
from servicekit.loop import LoopState
from servicekit.retry import RetryPolicy
from tests.dbfixture import ScriptedDatabase, tx

T0 = 1_700_000_000.0  # seconds; the clock starts here so stored times look real
CHEAP_RETRY = RetryPolicy(initial_s=0.5, factor=2, cap_s=2, jitter=0.5)
FAST = DispatcherConfig(poll_interval_s=0.5, batch=200, resend_after_s=2.0, max_attempts=5,
                        retry=CHEAP_RETRY, push_timeout_s=1.0)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class MetricDelta:
    """How much some counters moved since this object was made."""

    def __init__(self, *names: str) -> None:
        self._start = {n: metric(n) for n in names}

    def __getitem__(self, name: str) -> float:
        return metric(name) - self._start[name]


def owe_notifications(conn, recipients: int, messages: int) -> list[uuid.UUID]:
    """One sender posts *messages* to *recipients* cloud-only members: one row each."""
    now_ms = round(T0 * 1000)
    with conn.transaction():
        sender = uuid.uuid4()
        accounts_store.create_account(conn, Account(sender, "sender", "cloud-only"), None)
        accounts = [uuid.uuid4() for _ in range(recipients)]
        for i, a in enumerate(accounts):
            accounts_store.create_account(conn, Account(a, f"device{i}", "cloud-only"), None)
        cid = uuid.uuid4()
        conversations_store.create_conversation(conn, cid, [sender, *accounts])
        for i in range(messages):
            messages_store.post_message(conn, cid, sender, f"client-{i}", f"message {i}", now_ms)
    return accounts


@attrs.define
class Devices:
    """Simulated cloud devices: after each clock step they acknowledge their mailbox."""

    conn: psycopg.Connection
    clock: Clock
    channel: NotificationChannel
    accounts: list[uuid.UUID]
    acking: bool = True
    acks: int = 0

    def step(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.acking:
            self.ack_all()

    def run(self, seconds: float, step: float = 0.5) -> None:
        for _ in range(round(seconds / step)):
            self.step(step)

    def ack_all(self) -> None:
        now_ms = round(self.clock.seconds() * 1000)
        for account in self.accounts:
            for message in self.channel.pending(account):
                assert tx(self.conn, notifications_store.ack_notification, account,
                          message.notification_id, now_ms)
                self.channel.ack(account, message.notification_id)
                self.acks += 1

    def mailbox_sizes(self) -> int:
        return sum(len(self.channel.pending(a)) for a in self.accounts)


@attrs.define
class Scene:
    clock: Clock
    channel: NotificationChannel
    gateway: SimulatedPushGateway
    dispatcher: NotificationDispatcher
    devices: Devices


def scene(conn, accounts: list[uuid.UUID], *, seed: int = 0,
          config: DispatcherConfig = FAST, db: TransactionRunner | None = None,
          clock: Clock | None = None, wrap_gateway: Callable | None = None,
          **gateway_kwargs: float) -> Scene:
    """A started dispatcher on a Clock at T0, with a simulated gateway and devices."""
    if clock is None:
        clock = Clock()
        clock.advance(T0)
    channel = NotificationChannel(clock)
    gateway = SimulatedPushGateway(clock, random.Random(seed), channel, **gateway_kwargs)
    pushes_through = gateway if wrap_gateway is None else wrap_gateway(gateway)
    dispatcher = NotificationDispatcher(clock, db or InlineDatabase(conn), pushes_through,
                                        random.Random(seed + 1), config)
    dispatcher.startService()
    return Scene(clock, channel, gateway, dispatcher, Devices(conn, clock, channel, accounts))


def rows(conn) -> list[tuple]:
    return conn.execute("SELECT notification_id, state, attempts, next_attempt_ms, last_error, "
                        "acked_ms FROM notifications ORDER BY notification_id").fetchall()


def open_failure_findings(conn) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT detail->>'notification_id' FROM reconcile_findings "
        "WHERE kind = 'notification_failed' AND state = 'open'")}


def result_of(d: defer.Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


# ---------------------------------------------------------------- the simulated gateway

def test_gateway_refuses_out_of_range_parameters():
    """Loss and error rates are fractions and latency is not negative: a clear ValueError."""
    clock, channel = Clock(), NotificationChannel(Clock())
    for kwargs, name in (({"loss": 1.5}, "loss"), ({"error_rate": -0.1}, "error_rate"),
                         ({"loss": float("nan")}, "loss"), ({"latency_s": -1}, "latency_s")):
        with pytest.raises(ValueError, match=name):
            SimulatedPushGateway(clock, random.Random(0), channel, **kwargs)


def test_gateway_answers_after_latency_with_each_fate_counted():
    """Delivered, lost and rejected pushes all answer after the latency, each one counted."""
    clock = Clock()
    channel = NotificationChannel(clock)
    account = uuid.uuid4()
    delta = MetricDelta("cloud_push_accepted_total", "cloud_push_rejected_total",
                        "cloud_push_lost_total")

    def push(**kwargs: float) -> defer.Deferred:
        gateway = SimulatedPushGateway(clock, random.Random(0), channel, latency_s=2.0,
                                       **kwargs)
        message = PushMessage(account, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 1)
        return gateway.push(message)

    delivered, lost, refused = push(), push(loss=1.0), push(error_rate=1.0, loss=1.0)
    clock.advance(1.9)
    assert not (delivered.called or lost.called or refused.called)
    assert channel.pending(account) == []
    clock.advance(0.1)
    assert result_of(delivered) is None and result_of(lost) is None
    assert result_of(refused).check(PushRejected)
    assert len(channel.pending(account)) == 1
    assert (delta["cloud_push_accepted_total"], delta["cloud_push_lost_total"],
            delta["cloud_push_rejected_total"]) == (2, 1, 1)


def test_dispatcher_config_is_validated():
    """A nonsensical dispatcher configuration fails when it is built, naming the field."""
    for kwargs, name in (({"batch": 0}, "batch"), ({"poll_interval_s": 0}, "poll_interval_s"),
                         ({"max_attempts": 0}, "max_attempts"),
                         ({"resend_after_s": -1}, "resend_after_s")):
        with pytest.raises(ValueError, match=name):
            DispatcherConfig(**kwargs)
    with pytest.raises(TypeError, match="retry"):
        DispatcherConfig(retry=5)


# ---------------------------------------------------------------- delivery end to end

def test_without_loss_every_notification_is_acked_after_one_push(conn):
    """A healthy gateway: each notification is pushed once, delivered and acknowledged."""
    accounts = owe_notifications(conn, recipients=5, messages=20)
    delta = MetricDelta("cloud_notifications_pushed_total", "cloud_notifications_failed_total")
    s = scene(conn, accounts, latency_s=0.1)
    s.devices.run(10)
    assert tx(conn, notifications_store.notification_counts) == {
        "pending": 0, "sent": 0, "acked": 100, "failed": 0}
    assert {r[2] for r in rows(conn)} == {1}
    assert s.devices.acks == 100 and s.devices.mailbox_sizes() == 0
    assert delta["cloud_notifications_pushed_total"] == 100
    assert delta["cloud_notifications_failed_total"] == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_loss_and_errors_every_notification_ends_acked_or_visibly_failed(conn, seed):
    """Invariant 3: lost and refused pushes are retried; none is left pending or silent."""
    accounts = owe_notifications(conn, recipients=10, messages=30)
    total = 300
    config = attrs.evolve(FAST, max_attempts=8)
    delta = MetricDelta("cloud_push_lost_total", "cloud_push_rejected_total",
                        "cloud_notifications_failed_total")
    s = scene(conn, accounts, seed=seed, config=config, loss=0.3, error_rate=0.2)
    # Each attempt ends within max(resend_after, retry cap) plus a poll interval, and
    # the row is failed one such period after its last attempt: 9 * 2.5 s at most.
    s.devices.run(30)
    counts = tx(conn, notifications_store.notification_counts)
    assert counts["pending"] == counts["sent"] == 0
    assert counts["acked"] + counts["failed"] == total
    failed_ids = {str(r[0]) for r in rows(conn) if r[1] == "failed"}
    assert open_failure_findings(conn) == failed_ids
    assert delta["cloud_notifications_failed_total"] == len(failed_ids)
    assert max(r[2] for r in rows(conn)) <= config.max_attempts
    # Per attempt a push reaches the device with p = 0.8 * 0.7; eight attempts leave about
    # 0.1 % undelivered, so nearly everything is acked, and the faults really happened.
    assert counts["acked"] >= 0.98 * total
    assert delta["cloud_push_lost_total"] > 0 and delta["cloud_push_rejected_total"] > 0
    assert s.devices.acks == counts["acked"] and s.devices.mailbox_sizes() == 0


def test_total_loss_fails_every_notification_after_exactly_max_attempts(conn):
    """With every push lost, each row is pushed max_attempts times, then failed visibly."""
    accounts = owe_notifications(conn, recipients=4, messages=5)
    config = attrs.evolve(FAST, max_attempts=3)
    delta = MetricDelta("cloud_push_lost_total", "cloud_notifications_pushed_total",
                        "cloud_notifications_failed_total")
    s = scene(conn, accounts, config=config, loss=1.0)
    s.devices.run(15)
    assert tx(conn, notifications_store.notification_counts) == {
        "pending": 0, "sent": 0, "acked": 0, "failed": 20}
    assert {r[2] for r in rows(conn)} == {3}
    assert delta["cloud_push_lost_total"] == delta["cloud_notifications_pushed_total"] == 60
    assert delta["cloud_notifications_failed_total"] == 20
    assert open_failure_findings(conn) == {str(r[0]) for r in rows(conn)}
    assert {r[0] for r in conn.execute("SELECT (detail->>'attempts')::int "
                                       "FROM reconcile_findings")} == {3}


def test_duplicate_deliveries_are_held_once_and_acked_idempotently(conn):
    """A resend of the same id is one mailbox entry; a delivery after the ack is harmless."""
    [device] = owe_notifications(conn, recipients=1, messages=1)
    s = scene(conn, [device], latency_s=1.0)  # resend_after 2 s
    s.devices.acking = False
    # The ack window runs from acceptance: pushed at T0 (accepted and delivered at T0+1),
    # again at T0+3 (accepted at T0+4), again at T0+6 (accepted at T0+7).
    s.devices.run(4.5)  # both earlier pushes delivered, not acknowledged
    [pending] = s.channel.pending(device)
    assert rows(conn)[0][1:3] == ("sent", 2)
    s.devices.run(2.0)  # T0+6.5: the third push (claimed at T0+6) is in flight
    assert rows(conn)[0][1:3] == ("sent", 3)
    s.devices.ack_all()
    first_ack_ms = round((T0 + 6.5) * 1000)
    assert rows(conn)[0][1] == "acked" and s.devices.mailbox_sizes() == 0
    s.devices.acking = True
    s.devices.run(1.0)  # the third push lands after the ack: delivered again ...
    assert s.devices.acks == 2 and s.devices.mailbox_sizes() == 0
    s.devices.run(20)
    nid, state, attempts, _, _, acked_ms = rows(conn)[0]
    # ... and changes nothing: still acked, first ack time kept, never pushed again
    assert (nid, state, attempts, acked_ms) == (pending.notification_id, "acked", 3,
                                                first_ack_ms)


def test_backlog_is_drained_without_waiting_between_full_batches(conn):
    """A tick that fills its batch is followed at once by another one, not a poll later."""
    accounts = owe_notifications(conn, recipients=5, messages=9)
    config = attrs.evolve(FAST, batch=20, poll_interval_s=5.0)
    s = scene(conn, accounts, config=config)
    s.clock.advance(0)
    assert s.dispatcher.ticks == 3  # 20 + 20 + 5
    assert {r[2] for r in rows(conn)} == {1}
    s.clock.advance(4.9)
    assert s.dispatcher.ticks == 3


# ---------------------------------------------------------------- stopping and crashing

class GatedDatabase:
    """A TransactionRunner whose claims wait until the test releases them."""

    def __init__(self, inner: TransactionRunner) -> None:
        self.inner = inner
        self.held: list[defer.Deferred] = []

    def run(self, desc: str, fn: Callable, *args, **kwargs) -> defer.Deferred:
        if fn is not notifications_store.claim_due_notifications:
            return self.inner.run(desc, fn, *args, **kwargs)
        gate: defer.Deferred = defer.Deferred()
        self.held.append(gate)
        return gate.addCallback(lambda _: self.inner.run(desc, fn, *args, **kwargs))


def test_one_tick_in_flight_and_stop_waits_for_it(conn):
    """A slow tick is never overlapped by the next; stopService fires when it is done."""
    accounts = owe_notifications(conn, recipients=2, messages=1)
    db = GatedDatabase(InlineDatabase(conn))
    s = scene(conn, accounts, db=db)
    s.devices.run(5)
    assert len(db.held) == 1 and s.dispatcher.state is LoopState.TICKING
    stopped = s.dispatcher.stopService()
    assert not stopped.called
    db.held[0].callback(None)  # the claim returns; pushes answer on the next clock turn
    assert not stopped.called
    s.devices.step(0)
    assert result_of(stopped) is None and s.dispatcher.state is LoopState.IDLE
    assert s.devices.acks == 2
    s.devices.run(30)
    assert len(db.held) == 1 and s.dispatcher.ticks == 1


def test_a_dispatcher_that_dies_mid_tick_loses_nothing(conn):
    """Rows claimed by a crashed dispatcher come due again and its successor delivers them."""
    accounts = owe_notifications(conn, recipients=3, messages=4)
    dead = scene(conn, accounts, latency_s=1.0)
    dead.clock.advance(0)  # claimed and pushed; the gateway has not answered
    assert not dead.dispatcher.stopService().called
    # The crash: that process's clock never moves again, so nothing of it runs any more.
    assert {r[1:3] for r in rows(conn)} == {("pending", 1)}
    heir = scene(conn, accounts)
    heir.devices.run(FAST.resend_after_s - 0.5)
    assert heir.devices.acks == 0 and {r[1:3] for r in rows(conn)} == {("pending", 1)}
    heir.devices.run(1.0)
    assert tx(conn, notifications_store.notification_counts)["acked"] == 12
    assert {r[2] for r in rows(conn)} == {2}


# ---------------------------------------------------------------- errors and recovery

def test_gateway_errors_are_retried_with_the_policys_backoff(conn):
    """A refused push is retried at now + policy.delay(attempt), drawn from the seeded rng."""
    [device] = owe_notifications(conn, recipients=1, messages=1)
    config = attrs.evolve(FAST, max_attempts=3, resend_after_s=10.0)
    delta = MetricDelta("cloud_notifications_push_errors_total")
    s = scene(conn, [device], seed=40, config=config, error_rate=1.0)
    replica = random.Random(41)  # the dispatcher's rng: seed + 1
    s.clock.advance(0)
    expected = round(T0 * 1000) + round(CHEAP_RETRY.delay(1, replica) * 1000)
    _, state, attempts, next_ms, error, _ = rows(conn)[0]
    assert (state, attempts, next_ms) == ("pending", 1, expected)
    assert "simulated gateway error" in error
    while rows(conn)[0][2] == 1:  # the retry is due well before the 10 s ack timeout
        s.devices.step(0.5)
    claimed_ms = round(s.clock.seconds() * 1000)
    assert claimed_ms - round(T0 * 1000) <= CHEAP_RETRY.cap_s * 1000 + 500
    assert rows(conn)[0][3] == claimed_ms + round(CHEAP_RETRY.delay(2, replica) * 1000)
    s.devices.run(10)
    assert rows(conn)[0][1:3] == ("failed", 3)
    assert delta["cloud_notifications_push_errors_total"] == 3
    assert open_failure_findings(conn) == {str(rows(conn)[0][0])}


class SilentGateway:
    """Accepts pushes and never answers, like a gateway stuck behind a dead connection."""

    def __init__(self, inner: SimulatedPushGateway) -> None:
        self.pushed: list[PushMessage] = []

    def push(self, message: PushMessage) -> defer.Deferred:
        self.pushed.append(message)
        return defer.Deferred()


def test_a_gateway_that_never_answers_times_out_into_a_retry(conn):
    """A push with no answer within push_timeout_s is retried like a refusal, not waited on."""
    [device] = owe_notifications(conn, recipients=1, messages=1)
    config = attrs.evolve(FAST, resend_after_s=10.0, push_timeout_s=1.0)
    s = scene(conn, [device], seed=7, config=config, wrap_gateway=SilentGateway)
    replica = random.Random(8)
    s.clock.advance(0)
    assert s.dispatcher.state is LoopState.TICKING
    s.clock.advance(1.0)
    _, state, attempts, next_ms, error, _ = rows(conn)[0]
    assert (state, attempts) == ("pending", 1)
    assert error == "no answer from the push gateway within 1.0s"
    assert next_ms == round((T0 + 1.0) * 1000) + round(CHEAP_RETRY.delay(1, replica) * 1000)
    assert s.dispatcher.state is LoopState.WAITING


@pytest.fixture
def dispatcher_log(log_events):
    return log_events("cloud.dispatcher")


def test_loop_survives_database_outages_and_unexpected_errors(conn, dispatcher_log):
    """Failed ticks are counted and retried; an outage is logged once, a bug with traceback."""
    accounts = owe_notifications(conn, recipients=2, messages=2)
    down = DatabaseUnavailable("connection refused")
    faults = [down, down, down, None, down, down, RuntimeError("bug in a tick"), None]
    before = {r: metric("cloud_dispatcher_loop_failures_total", reason=r)
              for r in ("database_unavailable", "error")}
    db = ScriptedDatabase(InlineDatabase(conn), notifications_store.claim_due_notifications, faults)
    s = scene(conn, accounts, db=db)
    s.devices.run(5)
    assert tx(conn, notifications_store.notification_counts)["acked"] == 4
    assert s.dispatcher.state is LoopState.WAITING and s.dispatcher.ticks >= len(faults)
    after = {r: metric("cloud_dispatcher_loop_failures_total", reason=r) - before[r]
             for r in before}
    assert after == {"database_unavailable": 5, "error": 1}
    formats = [e["log_format"] for e in dispatcher_log]
    assert sum(f.startswith("database unavailable") for f in formats) == 2  # two outages
    assert sum(f.startswith("database reachable again") for f in formats) == 2
    [bug] = [e for e in dispatcher_log if "log_failure" in e]
    assert bug["log_failure"].check(RuntimeError)


class BrokenOnceGateway:
    """Raises a plain exception on its first push (a bug), then delegates."""

    def __init__(self, inner: SimulatedPushGateway) -> None:
        self.inner = inner
        self.broken = True

    def push(self, message: PushMessage) -> defer.Deferred:
        if self.broken:
            self.broken = False
            raise TypeError("gateway bug")
        return self.inner.push(message)


def test_an_unexpected_push_error_is_counted_and_the_row_comes_due_again(conn):
    """A gateway bug on one push does not stop the others; that row is pushed again later."""
    [device] = owe_notifications(conn, recipients=1, messages=2)
    before = metric("cloud_dispatcher_loop_failures_total", reason="error")
    s = scene(conn, [device], wrap_gateway=BrokenOnceGateway)
    s.devices.run(1)
    assert sorted(r[1] for r in rows(conn)) == ["acked", "pending"]
    s.devices.run(FAST.resend_after_s)
    assert [r[1:3] for r in rows(conn) if r[2] == 2] == [("acked", 2)]
    assert tx(conn, notifications_store.notification_counts)["acked"] == 2
    assert metric("cloud_dispatcher_loop_failures_total", reason="error") - before == 1
