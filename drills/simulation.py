"""A months-long migration in minutes: the whole system on one simulated clock.

``Simulation`` runs, in one process and one thread, on one ``SimClock``:

- the in-memory legacy network (``legacy.sim.LegacyDeployment``) with its users' devices,
  whose sessions follow a working-day cycle;
- the bridge workers (``bridge.worker.BridgeWorker``, the injector included);
- the cloud stack's side: cloud devices posting through the store's post path (the API's
  own), the notification dispatcher through a simulated push gateway, devices acknowledging;
- the reconcilers (gaps, notifications, presence) on their cron schedule;
- cohort moves from a plan (``drills.simplan``) through named cohorts, as ``bridgectl
  cohort advance`` and ``reverse`` make them (``drills.simcohorts``): gated forward moves,
  rollbacks with their back-fill to legacy;
- legacy client versions from a spread, and minimum versions set mid-run as ``bridgectl
  legacy min-version`` sets them (``drills.simversions``), old clients refused;
- faults from a profile: supernode crashes and client-hosted supernode lifetimes, link
  drops, windows of per-hop loss, push loss, and the 2010 outage.

Every database call runs at once on one connection (``InlineDatabase``), in the order the
clock's events ask for it, and every decision takes its time from the clock and its chance
from streams of one seed, so a seed replays the run: ``outcome_hash`` (the final stores'
contents and the legacy event trace) is the same each time.

At the end the faults heal, the traffic stops, the reconcilers run a pass, and
``drills.convergence`` checks the invariants from both stacks' own records.

The module is long because it is where the simulated system is put together and driven:
the composition, the working-day sessions, the message and cloud-post traffic, the cron,
the plan's steps and the report; the parts it drives live in the ``drills.sim*`` modules.
"""

from __future__ import annotations

import gc
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import psycopg
from twisted.internet import defer

from bridge import ids
from bridge.discovery import SupernodeLinks
from bridge.follower import FollowerConfig
from bridge.gates import GateConfig
from bridge.outbox import InjectorConfig, OutboxInjector
from bridge.worker import BridgeWorker, WorkerConfig
from cloud.db import InlineDatabase, run_transaction
from cloud.dispatcher import DispatcherConfig, NotificationDispatcher
from cloud.gateway import SimulatedPushGateway
from cloud.model import PHASES
from cloud.store import messages as messages_store
from cloud.store.errors import StoreError
from drills import convergence, simcheck, simtraffic
from drills.simcohorts import SimCohorts, cohort_name
from drills.simfaults import SimFaults
from drills.simplan import DAY_S, PlanStep, SimConfig
from drills.simversions import SimVersions
from drills.simwork import Work
from legacy.client import Device
from legacy.faults import PRESETS, HopFaults
from legacy.network import MemoryNetwork
from legacy.peer import connect_peer
from legacy.sim import LegacyDeployment, RunConfig
from legacy.simclock import SimClock
from reconcilers import runner
from reconcilers.gaps import LEGACY_RETENTION_MS, GapsConfig, GapsReconciler
from reconcilers.notifications import NotificationsReconciler
from reconcilers.presence import PresenceReconciler
from servicekit.retry import RetryPolicy

#: Day 0 of every simulation: 2010-12-01 00:00 UTC (the clock's epoch seconds).
START_S = 1_291_161_600.0
PEER_SECRET = b"simulate-peer-secret-0123456789"
LOGIN_SECRET = b"simulate-login-secret-0123456789"

@attrs.define
class _Counts:
    legacy_sent: int = 0
    cloud_posted: int = 0
    cloud_refused: int = 0
    skipped_offline: int = 0


class Simulation:
    """One run of *config* against the (empty, migrated) database of *conn*.

    *lock_conn* is a second connection for the reconcilers' advisory locks; *progress*
    gets one line per simulated day.
    """

    def __init__(self, config: SimConfig, conn: psycopg.Connection,
                 lock_conn: psycopg.Connection, *,
                 progress: Callable[[str], None] = lambda _line: None) -> None:
        self.config = config
        self.conn, self.lock_conn = conn, lock_conn
        # The run's database is thrown away after it and the simulated faults never crash
        # PostgreSQL, so a commit need not wait for its WAL flush: the same statements in the
        # same order, without a disk sync each (the run's biggest cost on a real disk).
        conn.execute("SET synchronous_commit = off")
        self.progress = progress
        self.db = InlineDatabase(conn)
        self.clock = SimClock()
        self.clock.rightNow = START_S
        self.network = MemoryNetwork(self.clock)
        root = random.Random(config.seed)
        self.rng_traffic = random.Random(root.getrandbits(64))
        self.rng_sessions = random.Random(root.getrandbits(64))
        self.rng_faults = random.Random(root.getrandbits(64))
        self.rng_cloud = random.Random(root.getrandbits(64))
        self.rng_bridge = random.Random(root.getrandbits(64))
        profile = config.profile
        self.legacy = LegacyDeployment(
            RunConfig(supernodes=config.supernodes, users=config.users, rate=0.0,
                      faults="none", seed=config.seed, duration=None, presence_ttl=5400.0,
                      refresh_interval=1800.0, sweep_interval=600.0,
                      password_iterations=1, client_versions=config.client_versions),
            self.network, peer_secret=PEER_SECRET, login_secret=LOGIN_SECRET)
        # the profile's hop faults, off until a fault window opens
        hops = HopFaults(PRESETS[profile.hop_preset], self.rng_faults)
        hops.enabled = False  # until a fault window opens
        for node in self.legacy.supernodes.values():
            node.faults = hops
        self.legacy.hop_faults = hops
        self.faults = SimFaults(self.clock, self.legacy, hops, profile, self.rng_faults,
                                dedicated=config.dedicated_supernodes,
                                kill_worker=self._kill_worker)
        self.login_port = self.legacy.login.port
        self.host = self.legacy.config.host
        self.channel = simtraffic.AckingChannel(self.clock, self.conn, self.rng_cloud)
        self.gateway = SimulatedPushGateway(
            self.clock, random.Random(self.rng_cloud.getrandbits(64)), self.channel,
            loss=profile.push_loss, error_rate=profile.push_errors, latency_s=0.05)
        self.dispatcher = NotificationDispatcher(
            self.clock, self.db, self.gateway, random.Random(self.rng_cloud.getrandbits(64)),
            DispatcherConfig(poll_interval_s=60.0, resend_after_s=600.0))
        self.workers = [self._worker(f"sim-w{i}") for i in range(config.workers)]
        self._restarts = 0
        self.counts = _Counts()
        #: client message id -> (conversation id, seq) of every post the store accepted
        self.posted: dict[str, tuple[str, int]] = {}
        self.phase_of: dict[str, str] = {}  # handle -> phase, refreshed after each move
        self.reconcile_runs: list[dict[str, Any]] = []
        #: chat id -> the GUIDs its home supernode held at the final check
        self.legacy_histories: dict[str, list[str]] = {}
        self.accounts_by_phase: list[dict[str, Any]] = []
        self.cohorts = SimCohorts(self.conn, self.db, self.clock, GateConfig(
            reconcile_window_ms=int(config.reconcile_every_h * 3 * 3600e3),
            live_within_ms=600_000))
        self.versions = SimVersions(self.conn, self.legacy, self._now_ms, self._day,
                                    lambda: self._login_link)
        self._calls: list[Any] = []
        self._busy: dict[str, defer.Deferred] = {}  # what runs in the background, by name
        self._login_link: Any = None
        self._traffic_on = False
        self._wall0 = 0.0
        self._work0 = self._work_day = Work(0, 0, 0.0)  # set when the run starts

    # -- composition -------------------------------------------------------------------------

    def _worker(self, worker_id: str) -> BridgeWorker:
        config = WorkerConfig(
            worker_id=worker_id, bootstrap_host=self.host, bootstrap_port=self.login_port,
            heartbeat_s=120.0, discovery_s=600.0, lease_ttl_s=900.0, accounts_sync_s=3600.0,
            credentials_s=60.0, min_versions_s=600.0, lag_window_s=600.0,
            store_metrics_s=3600.0,
            follower=FollowerConfig(linger_s=0.05, presence_linger_s=300.0))
        rng = random.Random(self.rng_bridge.getrandbits(64))
        worker = BridgeWorker(
            self.clock, self.network, self.db, PEER_SECRET, rng, config,
            injector_factory=lambda w: OutboxInjector(
                self.clock, self.db, w, random.Random(rng.getrandbits(64)),
                InjectorConfig(poll_interval_s=60.0, backlog_every_s=300.0,
                               retry=RetryPolicy(initial_s=1.0, factor=2.0, cap_s=300.0,
                                                 jitter=0.2))))
        worker.presence.poll_s = 60.0
        return worker

    def _kill_worker(self, rng: random.Random) -> bool:
        """A bridge worker dies as by SIGKILL; its process comes back (a new worker id)
        after the profile's restart delay. False when no worker is running."""
        alive = [i for i, w in enumerate(self.workers) if w.running]
        if not alive:
            return False
        i = alive[rng.randrange(len(alive))]
        self.workers[i].crash()
        self._later(self.config.profile.worker_restart_s, self._restart_worker, i)
        return True

    def _restart_worker(self, i: int) -> None:
        if self.workers[i].running:
            return
        self._restarts += 1
        worker = self._worker(f"sim-w{i}-r{self._restarts}")
        self.workers[i] = worker
        worker.startService()

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _day(self) -> float:
        return (self.clock.seconds() - START_S) / DAY_S

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append(self.clock.callLater(delay, fn, *args))

    def _background(self, name: str, coro: Any) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(coro)
        self._busy[name] = d

        def done(result: Any) -> Any:
            if self._busy.get(name) is d:
                del self._busy[name]
            return result
        return d.addBoth(done)

    def wait(self, d: defer.Deferred, timeout_s: float = 86_400.0) -> Any:
        """Run the clock until *d* has a result (at most *timeout_s* simulated seconds)."""
        return self.clock.result_of(d, timeout_s)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """The whole run; returns the report (``to_json`` shape). The cyclic GC runs at the
        top of each simulated hour only (young generations; all once a day), never when
        allocation counts say: finalizing an abandoned coroutine runs its ``finally``."""
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            gc.unfreeze()
            if gc_enabled:
                gc.enable()

    def _run(self) -> dict[str, Any]:
        self._wall0 = time.perf_counter()
        self._work0 = self._work_day = Work.now()
        cfg = self.config
        self.legacy.startService()
        self.clock.run_until(self.clock.seconds())
        self.legacy.started_at = self.clock.seconds()
        self.dispatcher.startService()
        for w in self.workers:
            w.startService()
        self._login_link = self.wait(connect_peer(
            self.network, self.host, self.login_port, name="simulate", secret=PEER_SECRET,
            timeout=30.0))
        self._start_sessions()
        self._traffic_on = True
        self._schedule_message()
        self.faults.schedule(cfg.days)
        name = ""  # the cohort of the latest forward step: what a reverse step undoes
        for i, step in enumerate(cfg.steps, 1):
            if not step.reverse:
                name = cohort_name(i, step)
            if step.day < cfg.days:
                self._later(step.day * DAY_S, self._plan_step, name, step)
        for day, version in cfg.min_versions:
            if day < cfg.days:
                self._later(day * DAY_S, self.versions.set_min_version, version)
        every = cfg.reconcile_every_h * 3600.0
        self._later(every, self._cron)
        end = START_S + cfg.days * DAY_S
        gc.collect()
        gc.freeze()
        hour = 0
        while self.clock.seconds() < end:
            hour += 1
            self.clock.run_until(min(end, START_S + hour * 3600.0))
            day_done = hour % 24 == 0 or self.clock.seconds() >= end
            gc.collect(2 if day_done else 1)  # the whole heap once a day, else the young
            if day_done:
                self._day_done()
        return self._finish()

    def _day_done(self) -> None:
        counts = self._phase_counts()
        day = round(self._day(), 3)
        self.accounts_by_phase.append({"day": day, **counts})
        findings = self.conn.execute(
            "SELECT count(*) FROM reconcile_findings WHERE state IN ('open', 'failed')"
        ).fetchone()[0]
        c, back = self.counts, self.cohorts.rollbacks
        work = Work.now()
        today, self._work_day = work.since(self._work_day), work
        self.progress(
            f"day {day:g}/{self.config.days:g}: {c.legacy_sent + c.cloud_posted:,} messages "
            f"({c.legacy_sent:,} legacy, {c.cloud_posted:,} cloud), {findings} open findings, "
            + ", ".join(f"{p} {n}" for p, n in counts.items())
            + (f", rolled back {back.moved_back} ({back.backfilled} back-filled)"
               if back.steps else "")
            + f"; today {today.frames:,} frames, {today.transactions:,} transactions "
              f"({today.seconds:.1f} s); {time.perf_counter() - self._wall0:.0f} s wall")

    # -- sessions: a working-day cycle ---------------------------------------------------------

    def _start_sessions(self) -> None:
        for handle in sorted(self.legacy.devices):
            for dev in self.legacy.devices[handle]:
                self._plan_device_day(dev, 0)

    def _plan_device_day(self, dev: Device, day: int) -> None:
        """Schedule *dev*'s sessions of *day*: a working-day session most days, an evening
        one sometimes; then plan the next day."""
        base = START_S + day * DAY_S
        now = self.clock.seconds()
        for on_h, off_h in simtraffic.day_sessions(self.rng_sessions, day):
            on_s, off_s = base + on_h * 3600.0, base + off_h * 3600.0
            if off_s > now:
                self._later(max(0.0, on_s - now), self._device_on, dev)
                self._later(off_s - now, self._device_off, dev)
        self._later(max(0.0, base + DAY_S - now), self._plan_device_day, dev, day + 1)

    def _device_on(self, dev: Device) -> None:
        if self._traffic_on and self.phase_of.get(dev.user.handle, "legacy") != "cloud-only":
            dev.start()

    def _device_off(self, dev: Device) -> None:
        if self._traffic_on:
            dev.stop()

    # -- messages ----------------------------------------------------------------------------

    def _schedule_message(self) -> None:
        """The next candidate of a Poisson process at the peak rate, thinned by the hour's
        weight (``simtraffic.weight``): messages follow the working day."""
        peak = self.config.users * self.config.rate / DAY_S * simtraffic.PEAK
        if peak <= 0:
            return
        self._later(self.rng_traffic.expovariate(peak), self._maybe_send)

    def _maybe_send(self) -> None:
        if not self._traffic_on:
            return
        weight = simtraffic.weight(self.clock.seconds() - START_S)
        if self.rng_traffic.random() * simtraffic.PEAK < weight:
            self._send_one()
        self._schedule_message()

    def _send_one(self) -> None:
        rng = self.rng_traffic
        chats = self.legacy.chats
        chat = chats[rng.randrange(len(chats))]
        sender = chat.members[rng.randrange(len(chat.members))]
        phase = self.phase_of.get(sender, "legacy")
        n = self.counts.legacy_sent + self.counts.cloud_posted + self.counts.cloud_refused + 1
        body = f"m{n} " + "x" * rng.randint(5, 60)
        if rng.random() < simtraffic.CLOUD_SHARE[phase]:
            self._post(chat.chat_id, sender, f"sim-{self.config.seed}-{n}", body)
            return
        online = [d for d in self.legacy.devices[sender] if d.state == "online"]
        if not online:
            self.counts.skipped_offline += 1
            return
        online[rng.randrange(len(online))].send(chat.chat_id, chat.members, body)
        self.counts.legacy_sent += 1

    def _post(self, chat_id: str, handle: str, client_id: str, body: str) -> None:
        """A cloud device's post, through the store's post path (what the API calls)."""
        cid = ids.conversation_id(chat_id)
        message_id = uuid.UUID(int=self.rng_cloud.getrandbits(128), version=4)
        try:
            message, _ = run_transaction(
                self.conn, "post_message", messages_store.post_message, cid,
                ids.account_id(handle), client_id, body, self._now_ms(),
                message_id=message_id)
        except StoreError:  # the conversation or membership is not mirrored yet
            self.counts.cloud_refused += 1
            return
        self.counts.cloud_posted += 1
        self.posted[client_id] = (str(cid), message.seq)
        for w in self.workers:  # what NOTIFY does in a deployment
            if w.injector is not None:
                w.injector.notified(str(cid))
        self.dispatcher.wake()

    # -- cohort moves ------------------------------------------------------------------------

    def _plan_step(self, name: str, step: PlanStep) -> None:
        if "migrate" in self._busy:  # the last step is still applying: this one follows it
            self._busy["migrate"].addBoth(lambda _r: self._plan_step(name, step))
            return
        self._background("migrate", self._migrate(name, step))

    async def _migrate(self, name: str, step: PlanStep) -> None:
        """One plan step through cohort *name*: forward (its own cohort) or reverse (the
        forward step's before it); each move's report entry gets the phases after it."""
        move = self.cohorts.reverse if step.reverse else self.cohorts.forward
        await move(name, step, self._login_link, self._now_ms(), round(self._day(), 3))
        self._refresh_phases()
        self.cohorts.moves[-1]["accounts_by_phase"] = self._phase_counts()

    def _refresh_phases(self) -> None:
        self.phase_of = {h: p for h, p in self.conn.execute(
            "SELECT legacy_handle, phase FROM accounts WHERE legacy_handle IS NOT NULL "
            "ORDER BY legacy_handle")}
        for handle, phase in self.phase_of.items():
            if phase == "cloud-only":  # the user left legacy: their legacy clients go quiet
                for dev in self.legacy.devices.get(handle, ()):
                    if dev.want_online:
                        dev.stop()

    def _phase_counts(self) -> dict[str, int]:
        rows = dict(self.conn.execute(
            "SELECT phase, count(*) FROM accounts WHERE legacy_handle IS NOT NULL "
            "GROUP BY phase").fetchall())
        return {p: int(rows.get(p, 0)) for p in PHASES}

    # -- reconcilers on cron -----------------------------------------------------------------

    def _cron(self) -> None:
        self._later(self.config.reconcile_every_h * 3600.0, self._cron)
        if "reconcile" not in self._busy:
            self._background("reconcile", self._reconcile_all(max_seconds=1800.0))

    async def _reconcile_all(self, *, max_seconds: float) -> list[runner.Report]:
        links = SupernodeLinks(self.network, list(self.legacy.directory.values()),
                               name="reconciler",
                               secret=PEER_SECRET)
        reports = []
        try:
            for kind in ("notifications", "presence", "gaps"):
                reconciler: Any
                if kind == "gaps":
                    reconciler = GapsReconciler(links, GapsConfig(confirm_after_s=5.0))
                elif kind == "notifications":
                    reconciler = NotificationsReconciler.for_cli(since_ms=None)
                else:
                    reconciler = PresenceReconciler.for_cli(links)
                report = await runner.run_one(
                    reconciler, clock=self.clock, db=self.db, lock_conn=self.lock_conn,
                    dry_run=False, max_seconds=max_seconds)
                reports.append(report)
                self.reconcile_runs.append({
                    "day": round(self._day(), 3), "kind": kind,
                    "exit_code": report.exit_code(), "clean": report.clean,
                    "during_faults": self.faults.active()})
        finally:
            links.close()
        return reports

    # -- the end -----------------------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        """Heal, drain, reconcile once, drain again; check and report."""
        self._traffic_on = False
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        self.faults.cancel()
        self.legacy.heal()
        for i in range(len(self.workers)):  # a worker killed and not back yet comes back
            self._restart_worker(i)
        for name in ("migrate", "reconcile"):
            if name in self._busy:
                self.wait(self._busy[name], timeout_s=4 * 3600.0)
        self.clock.run_until(self.clock.seconds() + 900.0)
        gc.collect()
        final = self.wait(self._background("reconcile", self._reconcile_all(
            max_seconds=4 * 3600.0)), timeout_s=5 * 3600.0)
        self.clock.run_until(self.clock.seconds() + 1800.0)
        gc.collect()
        # what the home supernodes hold at the check (their memory goes when they stop)
        self.legacy_histories = simcheck.legacy_inventory(self.legacy)
        verdict = simcheck.verdict(self.conn, self.legacy, self.posted, self._now_ms(),
                                   LEGACY_RETENTION_MS, self.legacy_histories)
        report = self._report(verdict, final)
        for w in self.workers:
            if w.running:
                w.stopService()
        self.dispatcher.stopService()
        if self._login_link is not None:
            self._login_link.disconnect()
        self.legacy.stopService()
        self.clock.run_until(self.clock.seconds() + 5.0)
        report["wall_seconds"] = round(time.perf_counter() - self._wall0, 1)
        report["work"] = Work.now().since(self._work0).to_json()
        return report

    def _report(self, verdict: convergence.Verdict, final: list[runner.Report]
                ) -> dict[str, Any]:
        c = self.counts
        return {
            "converged": verdict.converged,
            "lost": verdict.lost,
            "duplicates": verdict.duplicates,
            "lost_in_legacy": len(verdict.lost_by_legacy_network),
            "messages": {"legacy_sent": c.legacy_sent, "cloud_posted": c.cloud_posted,
                         "cloud_refused": c.cloud_refused,
                         "skipped_offline": c.skipped_offline,
                         "in_cloud": verdict.messages_cloud,
                         "in_legacy": verdict.messages_legacy},
            "verdict": verdict.to_json(),
            **simcheck.store_summary(self.conn),
            "reconcile_runs": self.reconcile_runs,
            "final_reconcile_clean": all(r.clean for r in final),
            "moves": self.cohorts.moves,
            "rollbacks": attrs.asdict(self.cohorts.rollbacks),
            "accounts_by_phase": self.accounts_by_phase,
            "faults": self.faults.report(),
            "client_versions": self.versions.report(self.config.client_versions),
            "outcome_hash": simcheck.outcome_hash(self.conn, self.legacy),
            "trace_hash": self.legacy.trace.hexdigest(),
            "simulated_days": self.config.days,
            "seed": self.config.seed,
        }
