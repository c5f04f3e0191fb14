"""One bridge worker: discovers the supernodes, follows every feed, drains the outbox.

    bootstrap (login server) --host cache sample--> one supernode --full directory-->
        FeedFollower per supernode   (legacy -> cloud, bridge/follower.py)
        OutboxInjector               (cloud -> legacy, bridge/outbox.py), woken by NOTIFY
        PresenceMirror               (cloud -> legacy presence, bridge/presence.py)
        CredentialDelivery           (recovered passwords -> login server, bridge/credentials.py)
        MinVersionSync               (stored minimum client versions -> a restarted login
                                      server, bridge/min_versions.py)
        heartbeat into bridge_workers (status, migration gates); reads the operator's
        runtime controls first (bridgectl control: pause injection, injector concurrency)

The worker is a ``MultiService``; stopping it drains in-flight batches before it returns.
``ready`` is what ``/readyz`` reports: the database answered the last heartbeat and at least
one feed is streaming.

This module is long because the worker is where the parts meet: discovery, the leases that
share the feeds, the heartbeat (with the operator's controls and the store's gauges it
applies) and the account sync all act on the same followers and injector.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.accounts import import_accounts
from bridge.credentials import CredentialDelivery
from bridge.discovery import discover
from bridge.faults import p99_ms, percentile_ms, recent_samples, split_p99_ms
from bridge.follower import FeedFollower, FollowerConfig
from bridge.min_versions import MinVersionSync
from bridge.mirror import KnownIds
from bridge.ops import metrics as m
from bridge.ops import store_metrics
from bridge.presence import PresenceMirror
from cloud import admin
from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.store import controls as controls_store
from cloud.store import coordination as coordination_store
from legacy import wire
from legacy.network import Network
from legacy.peer import PeerConnection, connect_peer
from legacy.ring import HashRing
from servicekit.retry import RetryPolicy

log = Logger()


@attrs.frozen
class WorkerConfig:
    worker_id: str
    bootstrap_host: str
    bootstrap_port: int
    heartbeat_s: float = 5.0
    #: heartbeat intervals without a finished heartbeat after which the worker is stalled
    #: (a heartbeat ends within about two even while the store is down: its connect timeout)
    stalled_after_heartbeats: float = 6.0
    discovery_s: float = 60.0
    lease_ttl_s: float = 15.0   # a dead worker's feeds move to others within this
    accounts_sync_s: float = 300.0  # copy the login server's accounts (passwords); 0: never
    #: how often to look for passwords recovered on the cloud that the login server still
    #: lacks (bridge/credentials.py); 0: never
    credentials_s: float = 2.0
    #: how often to check that the login server holds the stored minimum-version rules
    #: (bridge/min_versions.py; it forgets them when it restarts); 0: never
    min_versions_s: float = 10.0
    lag_window_s: float = 60.0
    #: how often a heartbeat also reads the store's migration gauges (phases, findings,
    #: reconcile progress: bridge/ops/store_metrics.py); 0: every heartbeat. A simulation,
    #: where nobody scrapes them, reads them hourly (seven reads of 2.4 ms every heartbeat
    #: of every worker were 3% of its time)
    store_metrics_s: float = 0.0
    follower: FollowerConfig = FollowerConfig()
    retry: RetryPolicy = RetryPolicy(initial_s=0.5, factor=2.0, cap_s=15.0, jitter=0.3)


class BridgeWorker(MultiService):
    """All of one worker's mirroring, started and stopped as one Service."""

    def __init__(self, clock: IReactorTime, network: Network, db: TransactionRunner,
                 secret: bytes, rng: random.Random, config: WorkerConfig,
                 injector_factory: Any = None) -> None:
        super().__init__()
        self.clock, self.network, self.db = clock, network, db
        self._secret, self._rng, self.config = secret, rng, config
        self.followers: dict[str, FeedFollower] = {}
        self.ring: HashRing | None = None
        self.started_ms = int(clock.seconds() * 1000)
        self.db_ok = False
        #: when the last heartbeat finished, well or not (the start, before the first)
        self.heartbeat_done_s = clock.seconds()
        #: when a heartbeat last read the store's gauges (None: never)
        self._store_metrics_at: float | None = None
        self.injector: Any = None
        if injector_factory is not None:
            self.injector = injector_factory(self)
            self.injector.setServiceParent(self)
            # it claims nothing until the first heartbeat has read the operator's controls:
            # a worker started while injection is paused must not inject a batch first
            self.injector.set_paused(True)
        #: the operator's runtime controls as the last heartbeat read them (None: not yet)
        self.controls: controls_store.RuntimeControls | None = None
        self.presence = PresenceMirror(clock, db, self)
        self.presence.setServiceParent(self)
        self.credentials: CredentialDelivery | None = None
        if config.credentials_s > 0:
            self.credentials = CredentialDelivery(clock, db, self._login_link,
                                                  random.Random(config.worker_id),
                                                  config.credentials_s)
            self.credentials.setServiceParent(self)
        self.min_versions: MinVersionSync | None = None
        if config.min_versions_s > 0:
            self.min_versions = MinVersionSync(clock, db, self._login_link, config.worker_id,
                                               config.min_versions_s)
            self.min_versions.setServiceParent(self)
        self._calls: list[Any] = []
        self._discovering: defer.Deferred | None = None
        self._discovery_failures = 0
        self.directory: dict[str, wire.SupernodeAddress] = {}
        self._leasing: defer.Deferred | None = None
        self._lease_call: Any = None
        self._lease_expiry: dict[str, float] = {}
        self.known = KnownIds()
        #: the state the last report wrote (or is writing) to ``bridge_workers``
        self._reported_state: str | None = None
        self.accounts_synced: Any = None
        #: links to supernodes this worker does not follow (for injections), by sn id
        self._links: dict[str, PeerConnection] = {}
        self._linking: set[str] = set()
        #: when injection starts even if some home has no link yet (None: no directory yet)
        self._links_deadline: float | None = None

    # -- LegacyPeers, for the outbox injector ---------------------------------------------

    def for_chat(self, chat_id: str) -> PeerConnection | None:
        """A ready connection to the chat's home supernode, or None while there is none.

        Injections have links of their own, one per supernode, opened on first need (any
        worker may claim any outbox row, so every worker must be able to reach every home):
        never the feed connections, where a window of injections would queue behind feed
        frames and the feed behind their Acks. None means "not yet": the caller retries.
        """
        if self.ring is None:
            return None
        return self._peer_for(self.ring.home_of(chat_id))

    def any(self) -> PeerConnection | None:
        for follower in self.followers.values():
            if follower.connected:
                return follower.peer
        return next(iter(self._links.values()), None) if self._links else None

    def _peer_for(self, sn: str) -> PeerConnection | None:
        link = self._links.get(sn)
        if link is not None and link.transport is not None and not link.closed.called:
            return link
        self._links.pop(sn, None)
        addr = self.directory.get(sn)
        if addr is not None and sn not in self._linking and self.running:
            self._linking.add(sn)
            d = connect_peer(self.network, addr.host, addr.port, name=self.config.worker_id,
                             secret=self._secret,
                             timeout=self.config.follower.connect_timeout_s)

            def linked(peer: PeerConnection) -> None:
                if self.running:
                    self._links[sn] = peer
                    self._gate_injection()  # the last link up: injection starts now
                else:
                    peer.disconnect()

            d.addCallbacks(linked, lambda _f: None)
            d.addBoth(lambda _: self._linking.discard(sn))
        return None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.db_ok and any(f.connected for f in self.followers.values())

    def stalled(self) -> str | None:
        """Why this worker is stuck (its heartbeats stopped finishing), or None: what the
        systemd watchdog asks. A store outage is not a stall: heartbeats then fail, in time."""
        since = self.clock.seconds() - self.heartbeat_done_s
        if since > self.config.heartbeat_s * self.config.stalled_after_heartbeats:
            return f"no heartbeat has finished for {since:.0f} s"
        return None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self.heartbeat_done_s = self.clock.seconds()
        store_metrics.PHASE_CHANGES.reset()  # this worker counts its store's audit log anew
        self._discover_soon(0)
        self._heartbeat_soon(0)
        if self.config.accounts_sync_s > 0:
            self._later(0, self._sync_accounts)

    # -- credentials -----------------------------------------------------------------------

    def _sync_accounts(self) -> None:
        """Copy the login server's accounts, password hashes included, into the store, so a
        legacy user's password works on the cloud API (handles first seen on a feed have an
        account at once, and their password within one sync interval)."""
        if not self.running:
            return
        d = defer.Deferred.fromCoroutine(self._sync_accounts_once())
        d.addErrback(lambda f: log.warn("account sync failed ({e}); next try in {s} s",
                                        e=f.getErrorMessage(), s=self.config.accounts_sync_s))
        d.addBoth(lambda _: self._later(self.config.accounts_sync_s, self._sync_accounts))

    def _login_link(self) -> defer.Deferred:
        """A privileged link to the login server (the bootstrap)."""
        return connect_peer(self.network, self.config.bootstrap_host,
                            self.config.bootstrap_port, name=self.config.worker_id,
                            secret=self._secret, timeout=self.config.follower.connect_timeout_s)

    async def _sync_accounts_once(self) -> None:
        peer = await self._login_link()
        try:
            counts = await import_accounts(peer, self.db, int(self.clock.seconds() * 1000),
                                           should_stop=lambda: not self.running)
        finally:
            peer.disconnect()
        self.accounts_synced = counts
        if counts.created or counts.updated:
            log.info("account sync: {c} created, {u} updated of {n}", c=counts.created,
                     u=counts.updated, n=counts.seen)

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        held = [(f.lease, f.fence) for f in self.followers.values() if f.lease is not None]
        for link in self._links.values():
            link.disconnect()
        self._links.clear()
        d = super().stopService()

        def release_leases(result: Any) -> Any:
            # drained: hand the feeds over at once instead of after the lease time
            releases = [self.db.run("release_lease", coordination_store.release_lease, name,
                                    self.config.worker_id, fence)
                        .addErrback(lambda _f: None) for name, fence in held]
            return defer.gatherResults(releases).addCallback(lambda _: result)

        d.addCallback(release_leases)

        def final_heartbeat(result: Any) -> Any:
            hb = self._report("stopped")
            hb.addErrback(lambda _f: None)  # the store may be the reason we stop
            return hb.addCallback(lambda _: result)

        return d.addCallback(final_heartbeat)

    def crash(self) -> None:
        """Die as a SIGKILL would: no drain, no lease release, no last heartbeat. Its feeds
        move to the other workers when the leases run out, its outbox claims when they do.
        For simulations and tests of invariant 4 (the process-level kill is the chaos
        suite's)."""
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        self.running = False
        for follower in self.followers.values():
            follower.crash()
        self.followers = {}
        for link in self._links.values():
            link.disconnect()
        self._links.clear()
        for child in (self.injector, self.presence, self.credentials,
                      self.min_versions):  # loops: no writes
            if child is not None and child.running:
                child.stopService()

    def _later(self, seconds: float, fn: Any) -> Any:
        self._calls = [c for c in self._calls if c.active()]
        call = self.clock.callLater(seconds, fn)
        self._calls.append(call)
        return call

    # -- discovery -------------------------------------------------------------------------

    def _discover_soon(self, seconds: float) -> None:
        self._later(seconds, self._discover)

    def _discover(self) -> None:
        if not self.running or self._discovering is not None:
            return
        self._discovering = defer.Deferred.fromCoroutine(self._discover_once())
        self._discovering.addErrback(lambda f: log.failure("discovery failed", f))
        self._discovering.addBoth(lambda _: setattr(self, "_discovering", None))

    async def _discover_once(self) -> None:
        """Login server -> a sample of supernodes -> the first that answers -> all of them."""
        try:
            directory = await discover(
                self.network, self.config.bootstrap_host, self.config.bootstrap_port,
                name=self.config.worker_id, secret=self._secret,
                timeout=self.config.follower.connect_timeout_s)
        except Exception as e:
            self._discovery_failures += 1
            if self._discovery_failures == 1:
                log.warn("discovery through {h}:{p} failed ({e}); retrying with backoff",
                         h=self.config.bootstrap_host, p=self.config.bootstrap_port, e=e)
            self._discover_soon(self.config.retry.delay(self._discovery_failures, self._rng))
            return
        self._discovery_failures = 0
        self._adopt(directory)
        self._discover_soon(self.config.discovery_s)

    def _adopt(self, directory: list[wire.SupernodeAddress]) -> None:
        before, self.directory = self.directory, {a.sn_id: a for a in directory}
        ids = tuple(sorted(self.directory))
        if self.ring is None or self.ring.sn_ids != ids:
            self.ring = HashRing(ids)
            log.info("{n} supernodes in the directory", n=len(ids))
        if self.directory != before:  # else the lease timer's own pace is soon enough
            self._lease_soon(0)
        if self.injector is not None:
            # Injection links are opened ahead of need, and again at each discovery when
            # one was lost: a first injection otherwise finds none and waits a retry.
            for sn in ids:
                self._peer_for(sn)
            if self._links_deadline is None:
                wait = self.config.follower.connect_timeout_s
                self._links_deadline = self.clock.seconds() + wait
                self._later(wait, self._gate_injection)

    def _injection_ready(self) -> bool:
        """May the injector claim? Once every home in the directory has its link, or once
        the connect timeout has passed since the directory was first known (a supernode
        that does not answer then holds back only its own chats' rows, which retry): rows
        claimed before would find no link, go back and wait a retry with an attempt spent."""
        if self.ring is None or self._links_deadline is None:
            return False
        return (self.clock.seconds() >= self._links_deadline
                or all(sn in self._links for sn in self.directory))

    def _gate_injection(self) -> None:
        """Let the injector claim when the operator has not paused it and its links are
        ready (``_injection_ready``); a no-op before the first heartbeat read the controls."""
        if self.injector is None or self.controls is None or not self.running:
            return
        self.injector.set_paused(self.controls.paused("injection") is not None
                                 or not self._injection_ready())

    # -- leases: which feeds this worker follows --------------------------------------------

    def _lease_soon(self, seconds: float) -> None:
        """Balance the leases within *seconds*. There is one lease timer: a request for
        sooner moves it, one for later leaves it (each discovery asks for one; as separate
        timers they added a balancing chain a discovery, without end)."""
        call = self._lease_call
        if call is not None and call.active():
            if call.getTime() <= self.clock.seconds() + seconds:
                return
            call.cancel()
        self._lease_call = self._later(seconds, self._lease_tick)

    def _lease_tick(self) -> None:
        if not self.running or self._leasing is not None:
            return
        d = defer.Deferred.fromCoroutine(self._balance())
        if not d.called:
            self._leasing = d
        d.addErrback(lambda f: log.failure("lease balancing failed", f))

        def again(_: Any) -> None:
            self._leasing = None
            if self.running:
                self._lease_soon(self.config.lease_ttl_s / 3)

        d.addBoth(again)

    async def _balance(self) -> None:
        """Renew what we hold, then take or give feeds so every live worker has its share.

        Each feed has a lease ``feed:<sn>`` in PostgreSQL; whoever holds it follows the feed
        and commits under its fencing token. A worker that dies stops renewing, its leases
        expire within ``lease_ttl_s`` and the others take the feeds over.
        """
        cfg, wid = self.config, self.config.worker_id
        now = self.clock.seconds()
        ttl_ms = round(cfg.lease_ttl_s * 1000)
        held = {sn: f for sn, f in self.followers.items() if f.state.value != "stopped"}
        renewed: set[str] | None
        try:  # every lease in one statement
            renewed = await self.db.run(
                "renew_leases", coordination_store.renew_leases,
                {f.lease: f.fence for f in held.values()}, wid,
                int(self.clock.seconds() * 1000), ttl_ms) if held else set()
        except Exception:
            renewed = None  # store unreachable: we can not renew
        for sn, follower in list(self.followers.items()):
            if renewed is None:
                # we must not go on past expiry
                ok = sn in held and self.clock.seconds() < self._lease_expiry.get(sn, 0)
            else:
                ok = sn in held and follower.lease in renewed
                if ok:
                    self._lease_expiry[sn] = now + cfg.lease_ttl_s
            if not ok:
                log.info("lease on feed {sn} lost; another worker follows it now", sn=sn)
                await self._drop(sn, release=False)
        if not self.directory:
            return
        try:
            live = [w.worker_id for w in await self.db.run(
                "live_workers", admin.live_workers, int(now * 1000),
                round(3 * cfg.heartbeat_s * 1000))]
        except Exception:
            return
        workers = max(1, len(set(live) | {wid}))
        share = -(-len(self.directory) // workers)  # ceiling
        if len(self.followers) < share:
            free = [sn for sn in sorted(self.directory) if sn not in self.followers]
            self._rng.shuffle(free)
            for sn in free:
                if len(self.followers) >= share or not self.running:
                    break
                try:
                    fence = await self.db.run("acquire_lease", coordination_store.acquire_lease,
                                              f"feed:{sn}", wid,
                                              int(self.clock.seconds() * 1000), ttl_ms)
                except Exception:
                    return
                if fence is not None:
                    self._lease_expiry[sn] = self.clock.seconds() + cfg.lease_ttl_s
                    self._follow(self.directory[sn], fence)
        elif len(self.followers) > share:
            for sn in sorted(self.followers)[share:]:
                await self._drop(sn, release=True)

    def _follow(self, addr: wire.SupernodeAddress, fence: int) -> None:
        follower = FeedFollower(self.clock, self.network, addr, self.db,
                                worker_id=self.config.worker_id, secret=self._secret,
                                rng=random.Random(self._rng.random()),
                                config=self.config.follower, fence=fence,
                                lease=f"feed:{addr.sn_id}", known=self.known,
                                on_streaming=self._feed_streaming,
                                supernodes=lambda: tuple(self.directory))
        self.followers[addr.sn_id] = follower
        follower.setServiceParent(self)
        log.info("following feed {sn} (fence {f})", sn=addr.sn_id, f=fence)

    async def _drop(self, sn: str, *, release: bool) -> None:
        follower = self.followers.pop(sn)
        self._lease_expiry.pop(sn, None)
        await follower.disownServiceParent()
        if release:
            try:
                await self.db.run("release_lease", coordination_store.release_lease, follower.lease,
                                  self.config.worker_id, follower.fence)
            except Exception:
                pass  # it expires by itself

    # -- heartbeat -------------------------------------------------------------------------

    def _heartbeat_soon(self, seconds: float) -> None:
        self._later(seconds, self._heartbeat)

    def _feed_streaming(self) -> None:
        """A feed came up. If the last heartbeat said ``degraded``, say ``ready`` now rather
        than up to ``heartbeat_s`` later: the migration gates hold cohorts on that state."""
        if self.running and self._reported_state == "degraded":
            d = self._report("ready")
            d.addCallback(lambda _: setattr(self, "db_ok", True))
            d.addErrback(lambda _: None)  # the next heartbeat writes the state again

    def _report(self, state: str) -> defer.Deferred:
        """Write this worker's row of ``bridge_workers``: state, lags over the last window,
        counts (for ``bridgectl status`` and the migration gates)."""
        self._reported_state = state
        now = self.clock.seconds()
        since = now - self.config.lag_window_s
        cloud_samples = [s for f in self.followers.values()
                         for s in recent_samples(f.recent_lags, since)]
        injector = self.injector
        legacy_samples = []
        if injector is not None and hasattr(injector, "recent_lags"):
            legacy_samples = recent_samples(injector.recent_lags, since)
        lags = [lag for lag, _met in cloud_samples]
        legacy_lags = [lag for lag, _met in legacy_samples]
        detail = {"feeds": {sn: f.state.value for sn, f in sorted(self.followers.items())},
                  "lag_p50_to_cloud_ms": percentile_ms(lags, 0.50),
                  "lag_p50_to_legacy_ms": percentile_ms(legacy_lags, 0.50),
                  # how much of the lag is the faults': the p99 of the messages that met
                  # none, and how many did (bridge.faults)
                  "lag_to_cloud": split_p99_ms(cloud_samples),
                  "lag_to_legacy": split_p99_ms(legacy_samples)}
        backlog = getattr(injector, "backlog", None)
        if backlog is not None:  # the outbox as this worker's injector last read it
            detail["outbox_pending"], detail["outbox_oldest_age_ms"] = backlog
        if injector is not None:  # the runtime controls as this worker applies them
            detail["injection"] = {"paused": injector.paused, "window": injector.window}
        return self.db.run(
            "heartbeat_worker", coordination_store.heartbeat_worker, self.config.worker_id, state,
            int(now * 1000), self.started_ms, lag_to_cloud_ms=p99_ms(lags),
            lag_to_legacy_ms=p99_ms(legacy_lags),
            mirrored_to_cloud=sum(f.mirrored for f in self.followers.values()),
            mirrored_to_legacy=getattr(injector, "injected", 0) if injector else 0,
            feeds=sum(1 for f in self.followers.values() if f.connected), detail=detail)

    def _obey(self, controls: controls_store.RuntimeControls) -> None:
        """Apply the operator's runtime controls (``bridgectl control``) this heartbeat
        read, so every live worker follows a change within one heartbeat: the injector
        claims nothing while injection is paused, and keeps at most the concurrency set
        (else its configured window) in flight."""
        before, self.controls = self.controls, controls
        injector = self.injector
        if injector is None:
            store_metrics.publish_controls(controls, None)
            return
        paused = controls.paused("injection") is not None
        if paused != (before is not None and before.paused("injection") is not None):
            log.info("outbox injection {what} by the operator's control", what=(
                "paused" if paused else "resumed"))
        injector.set_paused(paused or not self._injection_ready())
        window = injector.window
        setting = controls.injector_concurrency
        injector.set_window(None if setting is None else setting.value)
        if injector.window != window:
            log.info("outbox injector window {old} -> {new} (the operator's control)",
                     old=window, new=injector.window)
        store_metrics.publish_controls(controls, injector.window)

    def _heartbeat(self) -> None:
        if not self.running:
            return
        d = self.db.run("read_runtime_controls", controls_store.read_runtime_controls)
        d.addCallback(self._obey)

        def controls_failed(f: Any) -> None:
            if self.db_ok and not f.check(DatabaseUnavailable):  # the report logs an outage
                log.warn("reading the operator's controls failed: {e}", e=f.getErrorMessage())

        d.addErrback(controls_failed)
        d.addCallback(lambda _: self._report(
            "ready" if any(f.connected for f in self.followers.values()) else "degraded"))

        def ok(_: Any) -> Any:
            self.db_ok = True
            m.LEASES_HELD.set(len(self.followers))
            now = self.clock.seconds()
            if (self._store_metrics_at is not None
                    and now - self._store_metrics_at < self.config.store_metrics_s):
                return None
            self._store_metrics_at = now
            # the migration as the store has it (bridge.ops.store_metrics): bounded reads
            return self.db.run("read_store_metrics", store_metrics.read_store,
                               int(now * 1000),
                               store_metrics.PHASE_CHANGES.low_id()
                               ).addCallbacks(store_metrics.publish, metrics_failed)

        def metrics_failed(f: Any) -> None:
            self._store_metrics_at = None  # read again at the next beat
            log.warn("reading the store's metrics failed: {e}", e=f.getErrorMessage())

        def failed(f: Any) -> None:
            if self.db_ok:
                log.warn("heartbeat failed: {e}", e=f.getErrorMessage())
            self.db_ok = False

        def finished(_: Any) -> None:
            self.heartbeat_done_s = self.clock.seconds()
            self._heartbeat_soon(self.config.heartbeat_s)

        d.addCallbacks(ok, failed)
        d.addBoth(finished)
