"""cloud -> legacy credentials: hand a password recovered on the cloud to the login server.

A recovery (``POST /v1/recover``, ``cloud.recovery``) sets the new hash on the cloud
account and, for a linked account, queues it in ``credential_changes`` in the same
transaction. This loop delivers the queue::

    pending rows due  --connect (only when there are some)-->  SetPasswordHash per row
        Ack                     -> delivered (the old password stops working on legacy)
        unknown_handle          -> skipped (the login server has no such account: nothing
                                   to change; the cloud password is the only one)
        anything else, timeout  -> attempts + 1, next try after a backoff (retried for ever;
                                   the row's last_error says why)

Durable: the queue is in the store, so a worker that dies loses nothing (the row stays
pending) and a delivery repeated after a crash sets the same hash again (idempotent). Until
a row is delivered, the account import keeps the cloud's newer hash (``cloud.admin``).
Every worker runs the loop; two delivering the same row set the same hash twice.
Accounts in phase cloud-only get the new hash on legacy too: their legacy logins are refused
as moved anyway, and a move back must not bring the old password back.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from bridge.ops import metrics as m
from cloud.db import TransactionRunner
from cloud.store import recovery as store
from legacy.peer import PeerRequestFailed
from servicekit.loop import PollingLoop, failure_counter
from servicekit.retry import RetryPolicy

#: Rows delivered per tick (a full batch: the next tick follows at once).
BATCH = 100
RETRY = RetryPolicy(initial_s=2.0, factor=2.0, cap_s=300.0, jitter=0.2)


class PasswordLink(Protocol):
    """What delivery needs of the login server (``legacy.peer.PeerConnection``)."""

    def set_password_hash(self, handle: str, password_hash: str) -> defer.Deferred: ...

    def disconnect(self) -> None: ...


async def deliver_once(link: PasswordLink, db: TransactionRunner, now_ms: int,
                       rng: random.Random, limit: int = BATCH) -> dict[str, int]:
    """Deliver the due credentials through *link*; counts by outcome (delivered, skipped,
    failed)."""
    counts = {"delivered": 0, "skipped": 0, "failed": 0}
    for change in await db.run("pending_credentials", store.pending_credentials, now_ms, limit):
        try:
            await link.set_password_hash(change.legacy_handle, change.password_hash)
        except PeerRequestFailed as e:
            if e.code != "unknown_handle":
                await _failed(db, change, f"{e.code}: {e.reason}", now_ms, rng)
                counts["failed"] += 1
                continue
            await db.run("credential_skipped", store.credential_delivered, change, "skipped",
                         now_ms, "the login server has no such handle")
            counts["skipped"] += 1
        except Exception as e:  # a timeout, a lost connection: the next try will do
            await _failed(db, change, f"{type(e).__name__}: {e}", now_ms, rng)
            counts["failed"] += 1
        else:
            await db.run("credential_delivered", store.credential_delivered, change,
                         "delivered", now_ms)
            counts["delivered"] += 1
    for outcome, n in counts.items():
        m.CREDENTIALS.labels(outcome=outcome).inc(n)
    return counts


async def _failed(db: TransactionRunner, change: store.PendingCredential, error: str,
                  now_ms: int, rng: random.Random) -> None:
    delay_ms = int(RETRY.delay(change.attempts + 1, rng) * 1000)
    await db.run("credential_failed", store.credential_failed, change, error,
                 now_ms + delay_ms)


class CredentialDelivery(PollingLoop):
    """The worker's loop over ``credential_changes``; connects only when a row is due."""

    description = "credential delivery"
    failure_counter = failure_counter(
        "bridge_credential_delivery_failures_total",
        "Credential delivery ticks that failed, by reason.")

    def __init__(self, clock: IReactorTime, db: TransactionRunner,
                 connect: Callable[[], defer.Deferred], rng: random.Random,
                 poll_interval_s: float = 2.0) -> None:
        super().__init__(clock, poll_interval_s, "credentials")
        self._db, self._connect, self._rng = db, connect, rng

    async def _tick(self) -> bool:
        now_ms = int(self._clock.seconds() * 1000)
        due = await self._db.run("pending_credentials", store.pending_credentials, now_ms, 1)
        if not due:
            return False
        link = await self._connect()
        try:
            counts = await deliver_once(link, self._db, now_ms, self._rng)
        finally:
            link.disconnect()
        return sum(counts.values()) >= BATCH
