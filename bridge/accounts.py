"""Bulk import of legacy accounts: every login-server handle gets a linked cloud account.

Pages through the login server's accounts over a privileged peer link (sorted by handle,
``after`` the last one seen) and upserts each page in one store transaction
(``cloud.store.accounts.upsert_linked_accounts``), so an interrupted import keeps what it
wrote and a second run creates nothing. Password hashes are copied as they are: both stacks
use the same ``pbkdf2_sha256$...`` form, so the legacy password logs in on the cloud API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
from twisted.internet import defer

from bridge import ids
from cloud.db import TransactionRunner
from cloud.store import accounts as accounts_store

#: Accounts asked for per page (the login server sends at most 200).
PAGE_SIZE = 200
#: Conflicting handles kept for the report; all of them are counted.
MAX_CONFLICTS_LISTED = 100


class AccountSource(Protocol):
    """What the import needs from the login server (``legacy.peer.PeerConnection``):
    ``accounts(after, limit)`` fires with an ``AccountsPage`` (``.accounts``, ``.done``)."""

    def accounts(self, after: str = "", limit: int = PAGE_SIZE) -> defer.Deferred: ...


@attrs.frozen
class ImportCounts:
    seen: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    #: handles owned by a cloud-native account (another id): left alone, reported
    conflicts: int = 0
    conflict_handles: tuple[str, ...] = ()

    def add(self, batch: accounts_store.ImportBatchResult, seen: int) -> ImportCounts:
        listed = (self.conflict_handles + batch.conflicts)[:MAX_CONFLICTS_LISTED]
        return ImportCounts(self.seen + seen, self.created + batch.created,
                            self.updated + batch.updated, self.unchanged + batch.unchanged,
                            self.conflicts + len(batch.conflicts), listed)

    def to_json(self) -> dict:
        return attrs.asdict(self, value_serializer=lambda _i, _a, v:
                            list(v) if isinstance(v, tuple) else v)


async def import_accounts(peer: AccountSource, db: TransactionRunner, now_ms: int, *,
                          page_size: int = PAGE_SIZE,
                          progress: Callable[[ImportCounts], None] | None = None,
                          should_stop: Callable[[], bool] = lambda: False) -> ImportCounts:
    """Import every account of the login server behind *peer*; returns the counts.

    *progress* is called after each page; *should_stop* is asked before each page (the
    pages done so far stay imported; a re-run continues where it matters, by upserting).
    """
    counts = ImportCounts()
    after = ""
    while not should_stop():
        page = await peer.accounts(after, page_size)
        records = [accounts_store.LegacyAccountRecord(a.handle, ids.account_id(a.handle),
                                                      a.password_hash) for a in page.accounts]
        if records:
            batch = await db.run("upsert_linked_accounts", accounts_store.upsert_linked_accounts,
                                 records, now_ms)
            counts = counts.add(batch, len(records))
            after = max(r.handle for r in records)
            if progress is not None:
                progress(counts)
        if page.done or not records:
            break
    return counts
