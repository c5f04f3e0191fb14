"""The presence reconciler: presence live on one stack and gone, or different, on the other is
corrected according to the merge rule (``cloud.presence``).

The legacy peer API has no presence query: a privileged peer can inject presence, not ask
for a handle's merged status. So the reconciler compares what it *can* observe, the
supernodes' epochs (``PeerConnection.epoch``, new after every restart, when a supernode's
memory is gone) against the bridge's feed checkpoints and against the epochs the previous
completed presence run saw::

    probe every supernode of the directory: its epoch now
    a  cloud side: presence rows of source legacy:<sn>, not offline, and
         expired          past expiry plus the merge rule's grace (the offline that should
                          have followed was lost)
         supernode_gone   <sn> is not in the directory any more
         sn_restarted     <sn>'s epoch differs from the bridge's checkpoint for it: the
                          bridge has not read the restart yet, so the row is from the epoch
                          whose memory (and sessions) the supernode lost
       -> marked offline (expired now); the version is kept, so any newer publish wins
    b  legacy side: accounts with a legacy handle in phase dual or cloud whose cloud presence
       is live and not offline, and whose presence hub (the handle's index owner) may have
       lost the injected copy:
         hub_restarted    the hub's epoch differs from the one the last completed run saw
         no_baseline      no completed run saw this hub yet (the first run)
       -> re-injected at the hub itself (origin cloud, the cloud row's remaining TTL): no
          hop between supernodes that could lose it, and the feed echo is not mirrored back
    second look a moment later: a cloud row that changed (version) or a cloud presence that
       went offline or expired in between is not a problem any more
    each correction: a presence_corrected finding and an audit_log row (aggregated beyond
       max_findings per run); the epochs of this pass are the next run's baseline

Limitations (no presence query in the peer API): a row from before a restart that the bridge
has already read past is left to expire by its TTL (the legacy presence TTL plus grace); an
injection lost on its way by the bridge's presence mirror, while the hub stayed up, is not
seen; a supernode the reconciler cannot reach is skipped (``detail.unreachable``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
import psycopg
from twisted.internet import defer, task

from bridge.ids import LEGACY_PRESENCE_PREFIX
from cloud.presence import GRACE_MS
from cloud.store import coordination as coordination_store
from legacy import wire
from legacy.peer import PeerConnection
from reconcilers.notifications import SAMPLE, record_repair
from reconcilers.runner import RunContext
from servicekit.validators import positive

#: Phases whose accounts' cloud presence is shown to their legacy contacts by the reconciler.
INJECT_PHASES = ("dual", "cloud")
KIND = "presence_corrected"


class LegacyPresenceLinks(Protocol):
    """What the reconciler needs from the legacy side (``bridge.discovery.SupernodeLinks``)."""

    ring: Any                   # index_owner(handle): the handle's presence hub
    directory: Mapping[str, Any]

    async def peer(self, sn_id: str) -> PeerConnection: ...


@attrs.frozen
class PresenceConfig:
    #: Presence rows (or accounts) per page and per repair transaction.
    batch: int = attrs.field(default=500, validator=positive)
    #: Delay before the second look.
    confirm_after_s: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    #: Findings (and audit rows) written one per correction; beyond, one per batch.
    max_findings: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    #: Suspects one run collects at most; the next run resumes after them.
    max_suspects: int = attrs.field(default=50_000, validator=positive)


@attrs.frozen
class LegacyRow:
    """A cloud presence row that came from the legacy stack, and why it looks stale."""

    account_id: uuid.UUID
    source: str
    status: str
    version: int
    reason: str


@attrs.frozen
class CloudPresence:
    """A live cloud presence to show on the legacy side, and why it may be missing there."""

    account_id: uuid.UUID
    handle: str
    status: str
    expires_ms: int
    hub: str
    reason: str = ""


# ---------------------------------------------------------------- transactions

def last_hub_epochs(conn: psycopg.Connection) -> dict[str, str]:
    """The hub epochs the newest completed presence run recorded (empty: none yet)."""
    row = conn.execute(
        "SELECT report->'detail'->'hub_epochs' FROM reconcile_runs "
        "WHERE kind = 'presence' AND state = 'finished' "
        "AND report->'detail' ? 'hub_epochs' ORDER BY run_id DESC LIMIT 1").fetchone()
    return dict(row[0]) if row is not None and row[0] else {}


_LEGACY_STALE = (
    "CASE WHEN expires_ms + %(grace)s <= %(now)s THEN 'expired' "
    "     WHEN NOT (substr(source, %(cut)s) = ANY(%(directory)s)) THEN 'supernode_gone' "
    "     WHEN substr(source, %(cut)s) = ANY(%(restarted)s) THEN 'sn_restarted' END")


def _legacy_params(now_ms: int, directory: Sequence[str],
                   restarted: Sequence[str]) -> dict[str, Any]:
    return {"grace": GRACE_MS, "now": now_ms, "cut": len(LEGACY_PRESENCE_PREFIX) + 1,
            "directory": list(directory), "restarted": list(restarted),
            "prefix": LEGACY_PRESENCE_PREFIX + "%"}


def legacy_rows_page(conn: psycopg.Connection, now_ms: int, directory: Sequence[str],
                     restarted: Sequence[str], after: tuple[uuid.UUID, str] | None,
                     limit: int) -> tuple[int, tuple[uuid.UUID, str] | None, list[LegacyRow]]:
    """First look at one page of legacy-source rows that are not offline: (rows examined,
    the page's last key, the stale ones)."""
    start = after or (uuid.UUID(int=0), "")
    rows = conn.execute(
        f"SELECT account_id, source, status, version, {_LEGACY_STALE} FROM presence "
        "WHERE source LIKE %(prefix)s AND status <> 'offline' "
        "AND (account_id, source) > (%(a)s, %(s)s) "
        "ORDER BY account_id, source LIMIT %(limit)s",
        {**_legacy_params(now_ms, directory, restarted), "a": start[0], "s": start[1],
         "limit": limit}).fetchall()
    last = (rows[-1][0], rows[-1][1]) if rows else None
    return len(rows), last, [LegacyRow(*r) for r in rows if r[4] is not None]


def expire_legacy_rows(conn: psycopg.Connection, rows: Sequence[LegacyRow], now_ms: int,
                       run_id: int | None, *, dry_run: bool,
                       individual_findings: int) -> tuple[list[LegacyRow], int]:
    """Second look and repair: rows unchanged since the first look (same version, still not
    offline) are marked offline and expired now. Returns (confirmed, findings written)."""
    params = ([r.account_id for r in rows], [r.source for r in rows], [r.version for r in rows])
    suspects = "unnest(%s::uuid[], %s::text[], %s::bigint[]) AS s(account_id, source, version)"
    unchanged = ("p.account_id = s.account_id AND p.source = s.source "
                 "AND p.version = s.version AND p.status <> 'offline'")
    if dry_run:
        still = {(r[0], r[1]) for r in conn.execute(
            f"SELECT p.account_id, p.source FROM presence p, {suspects} WHERE {unchanged}",
            params)}
    else:
        still = {(r[0], r[1]) for r in conn.execute(
            "UPDATE presence p SET status = 'offline', expires_ms = least(p.expires_ms, %s), "
            f"updated_at = now() FROM {suspects} WHERE {unchanged} "
            "RETURNING p.account_id, p.source", (now_ms, *params))}
    confirmed = [r for r in rows if (r.account_id, r.source) in still]
    if dry_run:
        return confirmed, 0
    written = 0
    for r in confirmed[:individual_findings]:
        record_repair(conn, run_id, KIND, "repaired",
                      {"side": "cloud", "source": r.source, "was": r.status, "now": "offline",
                       "reason": r.reason}, now_ms, subject=str(r.account_id),
                      account_id=r.account_id)
        written += 1
    rest = confirmed[individual_findings:]
    if rest:
        record_repair(conn, run_id, KIND, "repaired",
                      {"side": "cloud", "aggregated": True, "count": len(rest),
                       "accounts": [str(r.account_id) for r in rest[:SAMPLE]]},
                      now_ms, subject=f"{len(rest)} presence rows")
        written += 1
    return confirmed, written


def close_hub_failures(conn: psycopg.Connection, hubs: Sequence[str], run_id: int | None,
                       now_ms: int) -> int:
    """A completed pass re-injected at these hubs every cloud presence they lacked, without
    a failure: the failed findings of earlier injections there are repaired."""
    return conn.execute(
        "UPDATE reconcile_findings SET state = 'repaired', resolved_ms = %s, "
        "detail = detail || jsonb_build_object('resolved_by_run', %s::bigint) "
        "WHERE kind = %s AND state = 'failed' AND detail->>'side' = 'legacy' "
        "AND detail->>'hub' = ANY(%s) AND created_ms < %s",
        (now_ms, run_id, KIND, list(hubs), now_ms)).rowcount


_CLOUD_LIVE = ("FROM presence p JOIN accounts a USING (account_id) "
               "WHERE p.source = 'cloud' AND p.expires_ms > %(now)s AND p.status <> 'offline' "
               "AND a.legacy_handle IS NOT NULL AND a.phase = ANY(%(phases)s) ")


def count_cloud_live(conn: psycopg.Connection, now_ms: int) -> int:
    return conn.execute("SELECT count(*) " + _CLOUD_LIVE,
                        {"now": now_ms, "phases": list(INJECT_PHASES)}).fetchone()[0]


def cloud_live_page(conn: psycopg.Connection, now_ms: int, after: uuid.UUID | None,
                    limit: int) -> list[tuple[uuid.UUID, str, str, int]]:
    """Live cloud presence to show on legacy: (account, legacy handle, status, expires_ms)."""
    return conn.execute(
        "SELECT a.account_id, a.legacy_handle, p.status, p.expires_ms " + _CLOUD_LIVE
        + "AND a.account_id > %(after)s ORDER BY a.account_id LIMIT %(limit)s",
        {"now": now_ms, "phases": list(INJECT_PHASES), "after": after or uuid.UUID(int=0),
         "limit": limit}).fetchall()


def cloud_live_now(conn: psycopg.Connection, now_ms: int, accounts: Sequence[uuid.UUID]
                   ) -> dict[uuid.UUID, tuple[str, str, int]]:
    """Second look: account -> (handle, status, expires_ms) of those still live."""
    rows = conn.execute(
        "SELECT a.account_id, a.legacy_handle, p.status, p.expires_ms " + _CLOUD_LIVE
        + "AND a.account_id = ANY(%(ids)s)",
        {"now": now_ms, "phases": list(INJECT_PHASES), "ids": list(accounts)}).fetchall()
    return {r[0]: r[1:] for r in rows}


def record_injections(conn: psycopg.Connection, done: Sequence[CloudPresence],
                      failed: Sequence[tuple[CloudPresence, str]], now_ms: int,
                      run_id: int | None, individual_findings: int) -> int:
    """Findings and audit rows for one batch of re-injections; returns findings written."""
    written = 0
    for p in done[:individual_findings]:
        record_repair(conn, run_id, KIND, "repaired",
                      {"side": "legacy", "handle": p.handle, "status": p.status,
                       "hub": p.hub, "reason": p.reason},
                      now_ms, subject=str(p.account_id), account_id=p.account_id)
        written += 1
    rest = done[individual_findings:]
    if rest:
        record_repair(conn, run_id, KIND, "repaired",
                      {"side": "legacy", "aggregated": True, "count": len(rest),
                       "handles": [p.handle for p in rest[:SAMPLE]]},
                      now_ms, subject=f"{len(rest)} accounts")
        written += 1
    by_hub: dict[str, list[tuple[CloudPresence, str]]] = {}
    for p, error in failed:
        by_hub.setdefault(p.hub, []).append((p, error))
    for hub, items in sorted(by_hub.items()):  # one per hub: the next run tries them again
        # names every account it failed for (a batch's worth at most): the gates hold them
        record_repair(conn, run_id, KIND, "failed",
                      {"side": "legacy", "hub": hub, "count": len(items),
                       "handles": [p.handle for p, _ in items[:SAMPLE]],
                       "account_ids": sorted(str(p.account_id) for p, _ in items),
                       "error": items[0][1]}, now_ms, subject=f"hub {hub}")
        written += 1
    return written


# ---------------------------------------------------------------- the run

class PresenceReconciler:
    kind = "presence"

    def __init__(self, links: LegacyPresenceLinks, config: PresenceConfig | None = None) -> None:
        self.links = links
        self.config = config if config is not None else PresenceConfig()

    @classmethod
    def for_cli(cls, links: LegacyPresenceLinks) -> PresenceReconciler:
        return cls(links)

    async def run(self, ctx: RunContext) -> None:
        cfg, report, progress = self.config, ctx.report, ctx.progress
        epochs, unreachable = await self._probe()
        # a resumed pass keeps the epochs its first run saw (they become the baseline)
        start_epochs: dict[str, str] = progress.setdefault("epochs", epochs)
        checkpoints = await ctx.db.run("load_checkpoints", coordination_store.load_checkpoints)
        baseline = await ctx.db.run("last_hub_epochs", last_hub_epochs)
        restarted = sorted(sn for sn, e in epochs.items()
                           if sn in checkpoints and checkpoints[sn].epoch != e)
        compared_sns = sum(1 for sn in epochs if sn in checkpoints)
        report.compared += compared_sns
        report.detail.update({"supernodes": compared_sns, "unreachable": unreachable,
                              "restarted_unread": restarted, "legacy_rows": 0,
                              "cloud_presence": 0, "hub_unreachable": 0})
        stale: list[LegacyRow] = []
        missing: list[CloudPresence] = []
        if progress.get("step", "legacy") == "legacy":
            await self._scan_legacy_rows(ctx, sorted(self.links.directory), restarted, stale)
        if not ctx.interrupted:
            await self._scan_cloud_presence(ctx, epochs, baseline, missing,
                                            budget=cfg.max_suspects - len(stale))
        report.suspects += len(stale) + len(missing)
        report.detail["suspects"] = {
            "cloud_side": len(stale), "legacy_side": len(missing)}
        failed_hubs: set[str] = set(progress.get("failed_hubs", []))
        if stale or missing:
            await task.deferLater(ctx.clock, cfg.confirm_after_s, lambda: None)
            failed_hubs |= await self._second_look_and_repair(ctx, stale, missing)
            progress["failed_hubs"] = sorted(failed_hubs)
        if not ctx.interrupted and not ctx.dry_run:
            end_epochs, _ = await self._probe()
            report.detail["hub_epochs"] = {
                sn: e for sn, e in start_epochs.items()
                if end_epochs.get(sn) == e and sn not in failed_hubs}
            if report.detail["hub_epochs"]:
                report.detail["failures_closed"] = await ctx.db.run(
                    "close_hub_failures", close_hub_failures,
                    sorted(report.detail["hub_epochs"]), report.run_id, ctx.now_ms())

    async def _probe(self) -> tuple[dict[str, str], list[str]]:
        """Every supernode's epoch now (as text, like the checkpoints) and those unreachable."""
        epochs, unreachable = {}, []
        for sn in sorted(self.links.directory):
            try:
                peer = await self.links.peer(sn)
            except defer.CancelledError:
                raise  # the run ended at its deadline (reconcilers.runner)
            except Exception:
                unreachable.append(sn)
                continue
            epochs[sn] = str(peer.epoch)
        return epochs, unreachable

    # -- first look ------------------------------------------------------------------------

    async def _scan_legacy_rows(self, ctx: RunContext, directory: list[str],
                                restarted: list[str], stale: list[LegacyRow]) -> None:
        cfg, report, progress = self.config, ctx.report, ctx.progress
        now = ctx.now_ms()
        after = progress.get("after")
        cursor = (uuid.UUID(after[0]), after[1]) if after else None
        first = True
        while True:
            if not first and ctx.out_of_time():
                return
            first = False
            examined, last, page = await ctx.db.run("legacy_rows_page", legacy_rows_page, now,
                                                    directory, restarted, cursor, cfg.batch)
            if last is None:
                break
            stale += page
            report.compared += examined
            report.detail["legacy_rows"] += examined
            cursor = last
            progress.update({"step": "legacy", "after": [str(last[0]), last[1]]})
            await ctx.save()
            ctx.on_progress(f"presence: {report.detail['legacy_rows']} legacy rows, "
                            f"{len(stale)} stale")
            if len(stale) >= cfg.max_suspects:
                ctx.interrupted = True
                return
        progress.update({"step": "cloud", "after": None})
        await ctx.save()

    async def _scan_cloud_presence(self, ctx: RunContext, epochs: dict[str, str],
                                   baseline: dict[str, str], missing: list[CloudPresence], *,
                                   budget: int) -> None:
        cfg, report, progress = self.config, ctx.report, ctx.progress
        now = ctx.now_ms()
        total = await ctx.db.run("count_cloud_live", count_cloud_live, now)
        after = progress.get("after")
        cursor = uuid.UUID(after) if after else None
        first, seen = True, 0
        while True:
            if not first and ctx.out_of_time():
                return
            first = False
            page = await ctx.db.run("cloud_live_page", cloud_live_page, now, cursor, cfg.batch)
            if not page:
                return
            for account_id, handle, status, expires_ms in page:
                hub = self.links.ring.index_owner(handle)
                if hub not in epochs:
                    report.detail["hub_unreachable"] += 1
                elif baseline.get(hub) != epochs[hub]:
                    reason = "hub_restarted" if hub in baseline else "no_baseline"
                    missing.append(CloudPresence(account_id, handle, status, expires_ms, hub,
                                                 reason))
            seen += len(page)
            report.compared += len(page)
            report.detail["cloud_presence"] += len(page)
            cursor = page[-1][0]
            progress.update({"step": "cloud", "after": str(cursor)})
            await ctx.save()
            ctx.on_progress(f"presence: {min(seen, total)}/{total} cloud presences, "
                            f"{len(missing)} to re-inject")
            if len(missing) >= budget:
                ctx.interrupted = True
                return

    # -- second look and repair ------------------------------------------------------------

    async def _second_look_and_repair(self, ctx: RunContext, stale: list[LegacyRow],
                                      missing: list[CloudPresence]) -> set[str]:
        """Returns the hubs where an injection failed (kept out of the next baseline)."""
        cfg, report, db = self.config, ctx.report, ctx.db
        findings_left = cfg.max_findings
        reasons: dict[str, int] = {}
        for i in range(0, len(stale), cfg.batch):
            confirmed, written = await db.run(
                "expire_legacy_rows", expire_legacy_rows, stale[i:i + cfg.batch], ctx.now_ms(),
                report.run_id, dry_run=ctx.dry_run, individual_findings=findings_left)
            findings_left = max(0, findings_left - written)
            report.confirmed += len(confirmed)
            if not ctx.dry_run:
                report.repaired += len(confirmed)
            for r in confirmed:
                reasons[r.reason] = reasons.get(r.reason, 0) + 1
        failed_hubs: set[str] = set()
        for i in range(0, len(missing), cfg.batch):
            chunk = missing[i:i + cfg.batch]
            now = ctx.now_ms()
            live = await db.run("cloud_live_now", cloud_live_now, now,
                                [p.account_id for p in chunk])
            confirmed = [attrs.evolve(p, handle=live[p.account_id][0],
                                      status=live[p.account_id][1],
                                      expires_ms=live[p.account_id][2])
                         for p in chunk if p.account_id in live]
            report.confirmed += len(confirmed)
            for p in confirmed:
                reasons[p.reason] = reasons.get(p.reason, 0) + 1
            if ctx.dry_run or not confirmed:
                continue
            done, failed, gone = await self._inject(ctx, confirmed)
            report.confirmed -= gone  # expired while the others were injected: nothing to show
            report.repaired += len(done)
            report.failed += len(failed)
            failed_hubs |= {p.hub for p, _ in failed}
            written = await db.run("record_injections", record_injections, done, failed,
                                   ctx.now_ms(), report.run_id, findings_left)
            findings_left = max(0, findings_left - written)
        report.detail["confirmed"] = reasons
        return failed_hubs

    async def _inject(self, ctx: RunContext, items: list[CloudPresence]
                      ) -> tuple[list[CloudPresence], list[tuple[CloudPresence, str]], int]:
        """Inject each at its hub: (done, [(failed, error)], how many expired meanwhile)."""
        done: list[CloudPresence] = []
        failed: list[tuple[CloudPresence, str]] = []
        expired = 0
        for p in items:
            ttl = min(p.expires_ms - ctx.now_ms(), wire.MAX_PRESENCE_TTL_MS)
            if ttl <= 0:
                expired += 1
                continue
            try:
                peer = await self.links.peer(p.hub)
                await peer.inject_presence(p.handle, p.status, ttl, "cloud")
            except defer.CancelledError:
                raise  # the run ended at its deadline: nothing more is injected
            except Exception as e:
                failed.append((p, f"{type(e).__name__}: {e}"))
                continue
            done.append(p)
        return done, failed, expired
