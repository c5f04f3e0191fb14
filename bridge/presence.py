"""cloud -> legacy presence: what cloud devices say reaches the users' legacy contacts.

Every ``poll_s`` the mirror reads the cloud-source presence rows set since its watermark
(for accounts that still have legacy clients) and injects each into the legacy network with
origin ``cloud`` and the row's remaining time to live. The legacy presence hub keeps one
entry per source and merges them, so a cloud ``offline`` never hides a legacy device that is
online, and the bridge's own injections come back on the feeds with origin ``cloud`` and are
not mirrored again. legacy -> cloud presence is written by the feed followers (source
``legacy:<supernode>``); ``cloud.presence.effective_status`` merges the sources.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.ops import metrics as m
from cloud.db import TransactionRunner
from cloud.store import presence as presence_store
from legacy import wire

log = Logger()


class PresenceMirror(Service):
    def __init__(self, clock: IReactorTime, db: TransactionRunner, peers: Any, *,
                 poll_s: float = 1.0, batch: int = 500, lookback_s: float = 3600.0) -> None:
        self.setName("presence-to-legacy")
        self.clock, self.db, self.peers = clock, db, peers
        self.poll_s, self.batch = poll_s, batch
        self._after: tuple[int, uuid.UUID] = (
            int((clock.seconds() - lookback_s) * 1000), uuid.UUID(int=0))
        self._call: Any = None
        self._tick: defer.Deferred | None = None
        self.injected = 0

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._call = self.clock.callLater(0, self._run)

    def stopService(self) -> defer.Deferred:  # noqa: N802 - Twisted's name
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        return self._tick if self._tick is not None else defer.succeed(None)

    def _run(self) -> None:
        d = defer.Deferred.fromCoroutine(self._once())
        if not d.called:
            self._tick = d

        def done(result: Any) -> None:
            self._tick = None
            if self.running:
                self._call = self.clock.callLater(self.poll_s if not result else 0, self._run)

        def failed(f: Any) -> bool:
            log.failure("presence mirror tick failed; trying again", f)
            return False

        d.addErrback(failed).addCallback(done)

    async def _once(self) -> bool:
        """One pass; True when the batch was full (more to do at once)."""
        try:
            rows = await self.db.run("cloud_presence_changes",
                                     presence_store.cloud_presence_changes, self._after, self.batch)
        except Exception as e:
            log.debug("presence mirror: store unavailable ({e})", e=e)
            return False
        now_ms = int(self.clock.seconds() * 1000)
        for version, account_id, handle, status, expires_ms in rows:
            ttl = min(expires_ms - now_ms, wire.MAX_PRESENCE_TTL_MS)
            if ttl > 0:
                peer = self.peers.any()
                if peer is None:
                    return False  # no supernode reachable: resume from here next time
                try:
                    await peer.inject_presence(handle, status, ttl, "cloud")
                except Exception as e:
                    m.RETRIES.labels(what="presence").inc()
                    log.debug("presence inject for {h} failed ({e})", h=handle, e=e)
                    return False
                self.injected += 1
                m.PRESENCE.labels(direction="to_legacy").inc()
            self._after = (version, account_id)
        return len(rows) == self.batch
