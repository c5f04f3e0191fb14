"""cloud -> legacy minimum client versions: the login server holds the rules the store has.

The legacy login server keeps its minimum-version rules in memory only, so a restart forgets
them. ``bridgectl legacy min-version`` keeps the durable copy in the cloud store
(``operator_controls`` row ``legacy_min_versions``); this loop, in every bridge worker, puts
it back without the operator's ``--reapply``::

    every interval, when the store has rules:
        stored rules (a cohort's members read afresh)   vs   the login server's (Versions)
        each held as stored (version; a cohort's handle count)  -> nothing to do
        some missing or different                                -> look again after
                                                                    ``confirm_s``; still so
                                                                    -> send them, audited

Why a second look: the command tells the login server first and writes the store after it
(so the store never claims a rule the login server refused); between the two they differ by
design, and acting at once could undo the operator's change until the next interval.
Rules the login server holds that are not stored are left alone: only ``--reapply`` clears
them. Two workers that both send the same rules set the same thing twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import psycopg
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from bridge.ops import metrics as m
from cloud.db import DatabaseUnavailable, TransactionRunner
from cloud.store import cohorts as cohorts_store
from cloud.store import controls as controls_store
from legacy import wire
from servicekit.loop import PollingLoop, failure_counter
from servicekit.sleep import sleep


@attrs.frozen
class Rule:
    """A stored minimum *version* for everyone (*cohort* "") or a cohort's *handles*."""

    cohort: str
    version: str
    handles: tuple[str, ...] = ()


class RuleLink(Protocol):
    """What the loop needs of the login server (``legacy.peer.PeerConnection``)."""

    def versions(self) -> defer.Deferred: ...

    def set_min_version(self, cohort: str, version: str, handles: tuple = (),
                        append: bool = False) -> defer.Deferred: ...

    def disconnect(self) -> None: ...


def cohort_handles(conn: psycopg.Connection, cohort: str) -> tuple[str, ...] | None:
    """The legacy handles of *cohort*'s members now, or None when there is no such cohort."""
    found = cohorts_store.get_cohort(conn, cohort)
    if found is None:
        return None
    return tuple(a.legacy_handle for a in cohorts_store.member_accounts(conn, found.cohort_id)
                 if a.legacy_handle)


def stored_rules(conn: psycopg.Connection) -> list[Rule]:
    """Every stored rule with its cohort's handles; a rule of a cohort that no longer
    exists is left out (there is nobody to hold to it)."""
    rules = []
    for r in controls_store.read_min_versions(conn):
        handles = cohort_handles(conn, r.cohort) if r.cohort else ()
        if handles is not None:
            rules.append(Rule(r.cohort, r.version, handles))
    return rules


def differing(stored: Sequence[Rule], held: Sequence[wire.MinVersionRule]) -> list[Rule]:
    """The stored rules the login server does not hold as stored: missing, another
    version, or (a cohort's) another number of handles."""
    have = {r.cohort: (r.version, r.handles) for r in held}
    return [r for r in stored if have.get(r.cohort) != (r.version, len(r.handles))]


async def send_rules(peer: Any, rules: Sequence[tuple[str, str, tuple]], *,
                     clear_others: bool = False) -> list[str]:
    """Send each (cohort, version or "", handles) rule over the login server link *peer*, a
    cohort's handles in frames of at most ``MAX_RULE_HANDLES`` (the first replaces, the
    rest add); with *clear_others*, first clear the rules it holds that are not among them.
    Returns the cohorts cleared that way."""
    cleared: list[str] = []
    if clear_others:
        keep = {c for c, _v, _h in rules}
        held = await peer.versions()
        for r in held.rules:
            if r.cohort not in keep:
                await peer.set_min_version(r.cohort, "")
                cleared.append(r.cohort)
    step = wire.MAX_RULE_HANDLES
    for cohort, version, handles in rules:
        await peer.set_min_version(cohort, version, handles[:step])
        for i in range(step, len(handles), step):
            await peer.set_min_version(cohort, version, handles[i:i + step], append=True)
    return cleared


def _audit_sent(conn: psycopg.Connection, rules: Sequence[Rule], actor: str,
                now_ms: int) -> None:
    controls_store.audit_min_version(
        conn, "legacy_min_version_reapplied", "", actor, now_ms,
        {"rules": {r.cohort: r.version for r in rules}, "cleared": [], "automatic": True})


class MinVersionSync(PollingLoop):
    """The worker's loop that gives a (restarted) login server the stored rules back."""

    description = "minimum-version sync"
    failure_counter = failure_counter(
        "bridge_min_version_sync_failures_total",
        "Minimum-version sync passes that failed (the login server or the store "
        "unreachable), by reason; the loop carries on.")

    def __init__(self, clock: IReactorTime, db: TransactionRunner,
                 connect: Callable[[], defer.Deferred], actor: str,
                 poll_interval_s: float = 10.0, confirm_s: float = 1.0) -> None:
        super().__init__(clock, poll_interval_s, "min-versions")
        self._db, self._connect, self._actor = db, connect, actor
        self._confirm_s = confirm_s
        #: when the login server stopped answering (None: it answers), to log an outage once
        self._unreachable_since: float | None = None
        #: rules sent over the loop's life (for tests and status)
        self.sent = 0

    async def _link(self) -> RuleLink | None:
        """A link to the login server, or None while it does not answer (counted; logged
        once per outage, not a traceback every interval)."""
        try:
            link = await self._connect()
        except Exception as e:
            self.loop_failures += 1
            self.failure_counter.labels(reason="error").inc()
            if self._unreachable_since is None:
                self._unreachable_since = self._clock.seconds()
                self._log.warn("the login server does not answer ({e}); its minimum versions "
                               "are checked again every {s} s", e=e, s=self._poll_interval_s)
            return None
        if self._unreachable_since is not None:
            self._log.info("the login server answers again after {s:.0f} s",
                           s=self._clock.seconds() - self._unreachable_since)
            self._unreachable_since = None
        return link

    async def _look(self, link: RuleLink) -> list[Rule]:
        stored = await self._db.run("stored_min_versions", stored_rules)
        if not stored:
            return []
        held = await link.versions()
        return differing(stored, held.rules)

    async def _tick(self) -> bool:
        try:
            stored = await self._db.run("stored_min_versions", stored_rules)
        except DatabaseUnavailable as e:
            self._database_down(e)
            return False
        self._database_up()
        if not stored:  # nothing to keep: no connection at all
            return False
        link = await self._link()
        if link is None:
            return False
        try:
            first = differing(stored, (await link.versions()).rules)
            if not first:
                return False
            await sleep(self._clock, self._confirm_s)
            again = await self._look(link)
            due = [r for r in again if r in first]  # the same rule both times
            if not due:
                return False
            await send_rules(link, [(r.cohort, r.version, r.handles) for r in due])
        finally:
            link.disconnect()
        await self._db.run("audit_min_versions_sent", _audit_sent, due, self._actor,
                           self._now_ms())
        self.sent += len(due)
        m.MIN_VERSION_RULES_SENT.inc(len(due))
        self._log.info("the login server lacked {n} stored minimum-version rule(s) ({who}); "
                       "sent them again", n=len(due),
                       who=", ".join(f"{r.cohort or 'everyone'} {r.version}" for r in due))
        return False
